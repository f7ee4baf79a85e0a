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
`<instruct>{instruction}\\n<query>{query}\\n<response>`; a passage is its raw text. They are
packed whole into rows of a bucketed length, and embedded `rows_per_call` rows at a time:
one compiled shape per row-length bucket, however many texts and whatever their lengths.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import transformers
from flax import nnx
from tqdm import tqdm

from jax_iclemb import parallel
from jax_iclemb.data.batch import PackedRows
from jax_iclemb.data.icl import encode_inference_query, encode_passage
from jax_iclemb.data.packing import pack_sequences
from jax_iclemb.data.tokenizer import load_tokenizer
from jax_iclemb.errors import MissingPath
from jax_iclemb.model import load_peft, load_pretrained
from jax_iclemb.model.build import embed_packed
from jax_iclemb.model.hf import download, is_hub_id
from jax_iclemb.model.trained import load_trained
from jax_iclemb.workdir import is_workdir

MIN_ROW_LEN = 64
MODEL_FILES = ("config.json", "adapter_config.json")  # a workdir's or HF model's; a PEFT adapter's


def row_length(longest: int) -> int:
    """Packed row length: the next power of two (at least MIN_ROW_LEN), so few shapes compile."""
    return max(MIN_ROW_LEN, 1 << max(longest - 1, 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling"))
def _embed_rows(state: Any, rows: PackedRows, *, graphdef: nnx.GraphDef, pooling: str) -> jax.Array:
    # One jitted function for every Embedder: a new Embedder of the same model (e.g. each
    # periodic evaluation during training) reuses the compiled shapes instead of recompiling.
    return embed_packed(nnx.merge(graphdef, state), rows, pooling)


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
        max_segments: int = 32,
        mesh: jax.sharding.Mesh | None = None,
        progress: bool = True,
    ):
        self.tokenizer = tokenizer
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len
        self.max_segments = max_segments
        self.progress = progress
        self.mesh = mesh or local_mesh()
        data_shards = parallel.data_parallel_size(self.mesh)
        self.rows_per_call = rows_per_call or 4 * data_shards
        if self.rows_per_call % data_shards:
            raise ValueError(f"rows_per_call must be a multiple of {data_shards} (data shards)")
        model.eval()
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
        ids = [
            encode_inference_query(
                self.tokenizer, q, instruction=instruction, examples=examples,
                max_len=self.query_max_len,
            )
            for q in queries
        ]
        return self.encode_ids(ids)

    def encode_corpus(
        self, passages: Sequence[str], *, instruction: str | None = None
    ) -> np.ndarray:
        """Embeddings [N, D] of passages: raw text, or query-formatted with `instruction`
        (symmetric tasks: STS, clustering)."""
        ids = [
            encode_passage(
                self.tokenizer, p, max_len=self.passage_max_len, instruction=instruction
            )
            for p in passages
        ]
        return self.encode_ids(ids)

    def encode_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Embeddings [N, D] (L2-normalised float32) of token sequences, in input order."""
        if not sequences:
            raise ValueError("nothing to encode")
        arrays, slot = pack_sequences(
            sequences,
            pack_len=row_length(max(len(s) for s in sequences)),
            max_segments=self.max_segments,
            row_multiple=self.rows_per_call,
        )
        rows = arrays["tokens"].shape[0]
        chunks = range(0, rows, self.rows_per_call)
        out = []
        with jax.set_mesh(self.mesh):
            for start in tqdm(chunks, desc="encode", disable=not self.progress or len(chunks) < 8):
                chunk = PackedRows(**{
                    k: jax.device_put(
                        v[start : start + self.rows_per_call],
                        parallel.named_sharding(self.mesh, ("batch",) + (None,) * (v.ndim - 1)),
                    )
                    for k, v in arrays.items()
                })
                emb = self._embed(
                    self._state, chunk, graphdef=self._graphdef, pooling=self._pooling
                )
                out.append(np.asarray(emb, dtype=np.float32))
        return np.concatenate(out)[slot]
