"""An `Embedder` as an `mteb` model (mteb 2.x `EncoderProtocol`, checked against mteb 2.26).

    import mteb
    from jax_iclemb.mteb_model import MTEBEmbedder
    model = MTEBEmbedder.from_pretrained("runs/tiny")  # the paper's protocol, few-shot
    mteb.evaluate(model, mteb.get_benchmark("MTEB(eng, v1)"))

As the paper evaluates: each task has an instruction and fixed in-context examples, by default
the paper's (`jax_iclemb.mteb_protocol`), `examples="none"` for zero-shot, a folder of
`<task name>.json` files or a `tasks` mapping to use others. Queries are encoded few-shot with
them, the documents of retrieval and reranking tasks as plain passages, and the texts of every
other task (classification, clustering, STS, pair classification, ...: `prompt_type` None) as
queries, on both sides. Embeddings are L2-normalised, so cosine similarity is the dot product.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jax_iclemb import mteb_protocol
from jax_iclemb.beir import load_examples
from jax_iclemb.embedder import Embedder
from jax_iclemb.errors import BadValue, MissingPath

EXAMPLES = ("paper", "none")


@dataclasses.dataclass(frozen=True)
class TaskPrompt:
    instruction: str
    examples: tuple[Mapping[str, str], ...] = ()


class MTEBEmbedder:
    """Duck-typed `mteb.models.EncoderProtocol`: `encode`, `similarity`, `similarity_pairwise`,
    `mteb_model_meta`. `mteb` itself is imported only for the metadata."""

    def __init__(
        self,
        embedder: Any,
        tasks: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        examples: str = "paper",
        examples_dir: str | Path | None = None,
        name: str = "jax_iclemb/embedder",
        revision: str | None = None,
    ):
        """`examples`: "paper" (the paper's in-context examples) or "none" (zero-shot);
        `examples_dir`: a folder of `<task name>.json` example files, used for the tasks it has
        a file for; `tasks`: {task name: {"instruction": str, "examples": path to
        [{"query", "response"}]}} (either key optional), used before anything else."""
        if examples not in EXAMPLES:
            raise BadValue(f"examples={examples!r}: expected one of {', '.join(EXAMPLES)}")
        self.embedder, self.name, self.revision = embedder, name, revision
        self.examples = examples
        self.examples_dir = Path(examples_dir) if examples_dir is not None else None
        if self.examples_dir is not None and not self.examples_dir.is_dir():
            raise MissingPath(f"examples_dir {str(self.examples_dir)!r}: no such folder")
        self.tasks = dict(tasks or {})
        for task, spec in self.tasks.items():
            unknown = set(spec) - {"instruction", "examples"}
            if unknown:
                raise BadValue(f"tasks[{task!r}]: unknown keys {sorted(unknown)}; "
                               "expected 'instruction' and/or 'examples'")
        self._prompts: dict[str, TaskPrompt] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> MTEBEmbedder:
        keys = ("tasks", "examples", "examples_dir", "name", "revision")
        own = {k: kwargs.pop(k) for k in keys if k in kwargs}
        own.setdefault("name", f"jax_iclemb/{Path(path).resolve().name}")
        return cls(Embedder.from_pretrained(path, **kwargs), **own)

    def task_prompt(self, task_name: str, task_type: str) -> TaskPrompt:
        """The instruction and examples used for a task of an mteb task type (loaded once)."""
        if task_name not in self._prompts:
            spec = self.tasks.get(task_name, {})
            instruction = spec.get("instruction") or mteb_protocol.instruction(
                task_name, task_type
            )
            if not instruction:
                raise BadValue(
                    f"no instruction for MTEB task {task_name!r} (type {task_type}): the "
                    f"paper's protocol does not cover it; pass "
                    f"tasks={{{task_name!r}: {{'instruction': ...}}}}"
                )
            self._prompts[task_name] = TaskPrompt(
                instruction, tuple(self._examples(task_name, task_type, spec))
            )
        return self._prompts[task_name]

    def _examples(
        self, task_name: str, task_type: str, spec: Mapping[str, Any]
    ) -> list[dict[str, str]]:
        if "examples" in spec:
            return load_examples(spec["examples"])
        own = self.examples_dir / f"{task_name}.json" if self.examples_dir is not None else None
        if own is not None and own.is_file():
            return load_examples(own)
        if self.examples == "none":
            return []
        paper = mteb_protocol.examples(task_name, task_type)
        if paper is None:
            # Zero-shot rather than failing: BitextMining and C-MTEB tasks have an instruction only.
            warnings.warn(
                f"MTEB task {task_name!r}: the paper's protocol has no in-context examples for "
                "it; its queries are encoded zero-shot", stacklevel=3,
            )
            return []
        return paper

    def encode(
        self,
        inputs: Iterable[Mapping[str, Any]],
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embeddings [N, D] of every `batch["text"]` of the data loader, in order."""
        texts = [text for batch in inputs for text in batch["text"]]
        if prompt_type == "document":  # mteb's PromptType is a str enum
            return self.embedder.encode_corpus(texts)
        prompt = self.task_prompt(task_metadata.name, task_metadata.type)
        return self.embedder.encode_queries(
            texts, instruction=prompt.instruction, examples=prompt.examples
        )

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Any:
        import torch

        a, b = np.atleast_2d(np.asarray(embeddings1)), np.atleast_2d(np.asarray(embeddings2))
        return torch.from_numpy(a @ b.T)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Any:
        import torch

        a, b = np.asarray(embeddings1), np.asarray(embeddings2)
        return torch.from_numpy(np.sum(a * b, axis=-1))

    @property
    def mteb_model_meta(self) -> Any:
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        return ModelMeta.create_empty(
            {
                "name": self.name,
                "revision": self.revision,
                "similarity_fn_name": ScoringFunction.COSINE,
                "use_instructions": True,
                # Zero- and few-shot runs of one model get their own results folders.
                "experiment_kwargs": {"examples": self.examples},
            }
        )
