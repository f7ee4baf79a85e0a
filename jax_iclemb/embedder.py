"""`Embedder`: few-shot query and corpus encoding with a trained model.

    from jax_iclemb import Embedder  # or jax_iclemb.embedder
    emb = Embedder.from_pretrained("runs/tiny")  # a workdir, a merged HF folder, or PEFT
    q = emb.encode_queries(
        ["how do I reset my card pin"], instruction="Classify the intent of the query",
        examples=[{"query": "card got stuck in the atm", "response": "card_swallowed"}],
    )
    d = emb.encode_corpus(["To reset your PIN ..."])
    scores = q @ d.T  # rows are L2-normalised float32

Texts are tokenized with the inference templates (the same code that builds training queries):
a query is its examples, each `<instruct>{instruction}\\n<query>{q}\\n<response>{r}\\n\\n`, then
`<instruct>{instruction}\\n<query>{query}\\n<response>`; a passage is its raw text.

Texts are visited longest first, a few thousand at a time: each chunk is tokenized, packed whole
into rows and embedded in device calls of a few shapes (`inference_batch`), with the attention
the model's config names (block-sparse tiles or the dense mask). The host prepares chunk k+1
while the devices run chunk k. Memory: one chunk's token ids and rows, plus the output array.
Few-shot queries share their examples: those are run once, and each query runs only its own
tokens against their cached keys and values (`prefix_cache`).
docs/embedder_internals.md has the shapes, their bound and the measurements.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import transformers
from flax import nnx
from tqdm import tqdm

from jax_iclemb import parallel
from jax_iclemb.data.batch import PackedRows
from jax_iclemb.data.icl import (
    encode_inference_queries,
    encode_passages,
    inference_query_prefix,
)
from jax_iclemb.data.packing import ladder
from jax_iclemb.data.tokenizer import load_tokenizer
from jax_iclemb.errors import MissingPath
from jax_iclemb.inference_batch import (
    CHUNK,
    MIN_ROW_LEN,
    ROW_LENGTH_RUNGS,
    Call,
    CallLayout,
    chunked_calls,
    overlapped,
)
from jax_iclemb.model import load_peft, load_pretrained
from jax_iclemb.model.build import embed_packed
from jax_iclemb.model.decoder import Prefix
from jax_iclemb.model.hf import download, is_hub_id
from jax_iclemb.model.trained import load_trained
from jax_iclemb.workdir import is_workdir

MODEL_FILES = ("config.json", "adapter_config.json")  # a workdir's or HF model's; a PEFT adapter's


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling"))
def _embed_rows(
    state: Any, rows: PackedRows, prefix: Prefix | None, *, graphdef: nnx.GraphDef, pooling: str
) -> jax.Array:
    # One jitted function for every Embedder: a new Embedder of the same model (e.g. each
    # periodic evaluation during training) reuses the compiled shapes instead of recompiling.
    return embed_packed(nnx.merge(graphdef, state), rows, pooling, prefix=prefix)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _run_prefix(state: Any, tokens: jax.Array, length: jax.Array, *, graphdef: nnx.GraphDef):
    """The `Prefix` of the ids `tokens[0, :length]` (one row, padded after them)."""
    positions = jnp.arange(tokens.shape[1])[None]
    model = nnx.merge(graphdef, state)
    _, (keys, values) = model(tokens, positions, (positions < length).astype(jnp.int32),
                              keep_kv=True)  # fmt: skip
    return Prefix(keys[:, 0], values[:, 0], length)


def local_mesh() -> jax.sharding.Mesh:
    """Inference is data-parallel over this host's devices."""
    return parallel.make_mesh((-1, 1, 1), jax.local_devices())


def options_from_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `Embedder` options of a run's config: its sequence lengths and pooling (the one
    mapping from a training config to inference)."""
    return {
        "query_max_len": config.data.query_max_len,
        "passage_max_len": config.data.passage_max_len,
        "pooling": config.model.pooling,
    }


class Embedder:
    """Encodes queries (few-shot) and passages with a model, data-parallel over `mesh`.

    `query_max_len` bounds a query with its instruction, not its examples, which are kept whole
    in front of it (as the published bge-en-icl model card does); in training, `data.
    query_max_len` bounds the query and its examples together. A workdir's value is used as is
    (`options_from_config`), so a trained query is never cut shorter at inference.

    `rows_per_call` and `max_segments` fix the rows per device call and the sequences per row;
    by default both follow the row length (`inference_batch.CallLayout`). `chunk_size` texts are
    tokenized and packed at a time (host memory).

    `prefix_cache`: few-shot queries run their shared start (BOS, examples, instruction) once and
    then only their own tokens, against its cached keys and values: the same embeddings (causal
    attention: nothing in the prefix sees what follows it) for a fraction of the work. Used with
    last-token pooling and causal attention whose window (if any) spans the prefix and a query.
    """

    def __init__(
        self,
        model: nnx.Module,
        tokenizer: transformers.PreTrainedTokenizerBase,
        *,
        query_max_len: int = 512,
        passage_max_len: int = 512,
        pooling: str = "last_token",
        rows_per_call: int | None = None,
        max_segments: int | None = None,
        chunk_size: int = CHUNK,
        mesh: jax.sharding.Mesh | None = None,
        progress: bool = True,
        prefix_cache: bool = True,
    ):
        self.tokenizer = tokenizer
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len
        self.progress = progress
        self.chunk_size = chunk_size
        self.prefix_cache = prefix_cache
        self.mesh = mesh or local_mesh()
        config = model.config
        self.layout = CallLayout(
            shards=parallel.data_parallel_size(self.mesh),
            block=config.attention_block if config.attention_impl == "block_sparse" else None,
            causal=config.attention == "causal",
            rows_per_call=rows_per_call,
            max_segments=max_segments,
        )
        model.eval()
        self._config = config
        self._graphdef, self._state = nnx.split(model)
        self._pooling = pooling
        self._embed = _embed_rows

    # ---- construction ----

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        step: int | None = None,
        dtype: str = "float32",
        revision: str | None = None,
        **kwargs: Any,
    ) -> Embedder:
        """A training workdir (latest or given step), a merged HF folder, a PEFT folder, or a
        Hugging Face Hub id of either (at `revision`). Nothing is written to `path`."""
        path = Path(path)
        if not path.is_dir() and not is_hub_id(path):
            raise MissingPath(
                f"{path}: no such folder (a training workdir, a merged or PEFT export, or a "
                f"Hugging Face Hub id owner/name)"
            )
        if not path.is_dir():  # a Hub id: its model or adapter files, the tokenizer among them
            path = download(str(path), revision=revision)
        if path.is_dir() and not any((path / f).is_file() for f in MODEL_FILES):
            raise MissingPath(
                f"{path}: neither a training workdir nor a model folder (it has none of "
                f"{', '.join(MODEL_FILES)})"
            )
        mesh = kwargs.setdefault("mesh", local_mesh())
        if is_workdir(path):
            model, _, tokenizer, config, _ = load_trained(path, step, mesh=mesh)
            return cls(model, tokenizer, **(options_from_config(config) | kwargs))
        tokenizer = load_tokenizer(str(path))
        options = {"dtype": dtype, "param_dtype": dtype, "vocab_size": len(tokenizer), "mesh": mesh}
        is_adapter = (path / "adapter_config.json").is_file()
        model, _ = (load_peft if is_adapter else load_pretrained)(path, **options)
        return cls(model, tokenizer, **kwargs)

    # ---- encoding ----

    def encode_queries(
        self,
        queries: Sequence[str],
        *,
        instruction: str,
        examples: Sequence[Mapping[str, str]] = (),
    ) -> np.ndarray:
        """Embeddings [N, D] of queries, each preceded by the same task `examples` (few-shot)."""

        def ids(positions: np.ndarray) -> list[list[int]]:
            return encode_inference_queries(
                self.tokenizer, [queries[i] for i in positions], instruction=instruction,
                examples=examples, max_len=self.query_max_len,
            )

        keys = [len(q) for q in queries]
        if not (examples and self.prefix_cache):
            return self._encode(keys, ids)
        shared = inference_query_prefix(self.tokenizer, instruction=instruction, examples=examples)
        prefix = self._prefix(shared)
        if prefix is None:
            return self._encode(keys, ids)

        def own_ids(positions: np.ndarray) -> list[list[int]]:
            sequences = ids(positions)
            if any(s[: len(shared)] != shared for s in sequences):
                raise AssertionError("a query does not start with its examples' ids")
            return [s[len(shared) :] for s in sequences]

        return self._encode(keys, own_ids, prefix)

    def _prefix(self, ids: Sequence[int]) -> Prefix | None:
        """The cached keys and values of `ids`, which every query continues; None when they
        cannot stand in for running the ids with each query (see `prefix_cache`)."""
        config = self._config
        width = ladder(max(len(ids), MIN_ROW_LEN), ROW_LENGTH_RUNGS)
        window = config.sliding_window
        if not (
            self._pooling == "last_token"
            and config.attention == "causal"
            and (window is None or window >= width + self.layout.row_length(self.query_max_len))
        ):
            return None
        tokens = np.zeros((1, width), np.int32)
        tokens[0, : len(ids)] = ids
        with jax.set_mesh(self.mesh):
            return _run_prefix(
                self._state, tokens, jnp.int32(len(ids)), graphdef=self._graphdef
            )

    def encode_corpus(
        self, passages: Sequence[str], *, instruction: str | None = None
    ) -> np.ndarray:
        """Embeddings [N, D] of passages: raw text, or query-formatted with `instruction`
        (symmetric tasks: STS, clustering)."""

        def ids(positions: np.ndarray) -> list[list[int]]:
            return encode_passages(
                self.tokenizer, [passages[i] for i in positions], max_len=self.passage_max_len,
                instruction=instruction,
            )

        return self._encode([len(p) for p in passages], ids)

    def encode_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Embeddings [N, D] (L2-normalised float32) of token sequences, in input order."""
        lengths = [len(s) for s in sequences]
        if 0 in lengths:
            raise ValueError(f"sequence {lengths.index(0)} is empty: nothing to embed")
        return self._encode(lengths, lambda positions: [sequences[i] for i in positions])

    def _encode(
        self,
        keys: Sequence[int],
        ids: Callable[[np.ndarray], list[Sequence[int]]],
        prefix: Prefix | None = None,
    ) -> np.ndarray:
        """Embeddings of the inputs in input order; `keys` orders them (longest first), `ids`
        gives the token ids of some of them, a chunk at a time, each continuing `prefix` if
        given."""
        if not keys:
            raise ValueError("nothing to encode")
        out = None  # [N, D], allocated when the first call is back
        bar = tqdm(total=len(keys), desc="encode", leave=False,
                   disable=not self.progress or len(keys) < 1000)

        def start(calls: list[Call]) -> list[tuple[Call, jax.Array]]:
            return [(call, self._embed_call(call, prefix)) for call in calls]

        def finish(running: list[tuple[Call, jax.Array]]) -> None:
            nonlocal out
            for call, emb in running:
                emb = np.asarray(emb)  # waits for this call only
                if out is None:
                    out = np.empty((len(keys), emb.shape[-1]), np.float32)
                out[call.index] = emb[call.slot]
                bar.update(len(call.index))

        # A prefix is computed by the dense path, which takes no tile lists.
        layout = self.layout if prefix is None else dataclasses.replace(self.layout, block=None)
        calls = chunked_calls(np.asarray(keys), ids, layout, chunk=self.chunk_size)
        with jax.set_mesh(self.mesh), bar:
            overlapped(calls, start, finish)
        return out

    def _embed_call(self, call: Call, prefix: Prefix | None = None) -> jax.Array:
        """Dispatch one call (asynchronously): its rows split over the data shards."""
        rows = jax.tree.map(
            lambda v: jax.device_put(
                v, parallel.named_sharding(self.mesh, ("batch",) + (None,) * (v.ndim - 1))
            ),
            call.rows,
        )
        return self._embed(
            self._state, rows, prefix, graphdef=self._graphdef, pooling=self._pooling
        )
