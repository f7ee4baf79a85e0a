"""An `Embedder` as an `mteb` model (mteb 2.x `EncoderProtocol`, checked against mteb 2.26).

    import mteb
    from jax_iclemb.mteb_model import MTEBEmbedder
    model = MTEBEmbedder.from_pretrained(
        "runs/tiny", examples_dir="eval_examples",
        tasks={"MyTask": {"instruction": "...", "examples": "x.json"}},
    )
    mteb.evaluate(model, mteb.get_tasks(tasks=["Banking77Classification"]))

As the paper evaluates: each task has an instruction (the paper's for common MTEB tasks, or the
`tasks` mapping) and optional in-context examples; queries are encoded few-shot with them, the
documents of retrieval and reranking tasks as plain passages, and the texts of every other task
(classification, clustering, STS, pair classification, ...: `prompt_type` None) as queries, on
both sides. Embeddings are L2-normalised, so cosine similarity is the dot product.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jax_iclemb.beir import load_examples

# The paper's evaluation instructions (those of e5-mistral) for a few common tasks.
DEFAULT_INSTRUCTIONS = {
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query.",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim.",
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question.",
    "ArguAna": "Given a claim, find documents that refute the claim.",
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question.",
    "Banking77Classification": "Given a online banking query, find the corresponding intents.",
    "ArxivClusteringS2S": (
        "Identify the main and secondary category of Arxiv papers based on the titles."
    ),
    "AskUbuntuDupQuestions": "Retrieve duplicate questions from AskUbuntu forum.",
    "SprintDuplicateQuestions": "Retrieve duplicate questions from Sprint forum.",
}
# Task types whose instruction does not depend on the task.
TYPE_INSTRUCTIONS = {
    "STS": "Retrieve semantically similar text.",
    "Summarization": "Given a news summary, retrieve other semantically similar summaries.",
    "BitextMining": "Retrieve parallel sentences.",
}


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
        examples_dir: str | Path | None = None,
        name: str = "jax_iclemb/embedder",
        revision: str | None = None,
    ):
        """`tasks`: {task name: {"instruction": str, "examples": path to [{"query", "response"}]}}
        (either key optional); `examples_dir`: a folder of `<task name>.json` example files."""
        self.embedder, self.name, self.revision = embedder, name, revision
        self.examples_dir = Path(examples_dir) if examples_dir is not None else None
        self.tasks = dict(tasks or {})
        for task, spec in self.tasks.items():
            unknown = set(spec) - {"instruction", "examples"}
            if unknown:
                raise ValueError(f"tasks[{task!r}]: unknown keys {sorted(unknown)}; "
                                 "expected 'instruction' and/or 'examples'")
        self._prompts: dict[str, TaskPrompt] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> MTEBEmbedder:
        from jax_iclemb.embedder import Embedder

        keys = ("tasks", "examples_dir", "name", "revision")
        own = {k: kwargs.pop(k) for k in keys if k in kwargs}
        own.setdefault("name", f"jax_iclemb/{Path(path).resolve().name}")
        return cls(Embedder.from_pretrained(path, **kwargs), **own)

    def task_prompt(self, task_name: str, task_type: str | None = None) -> TaskPrompt:
        """The instruction and examples used for a task (loaded once)."""
        if task_name in self._prompts:
            return self._prompts[task_name]
        spec = self.tasks.get(task_name, {})
        instruction = (
            spec.get("instruction")
            or DEFAULT_INSTRUCTIONS.get(task_name)
            or TYPE_INSTRUCTIONS.get(task_type or "")
        )
        if not instruction:
            raise KeyError(
                f"no instruction for MTEB task {task_name!r} (type {task_type}); pass "
                f"tasks={{{task_name!r}: {{'instruction': ...}}}}"
            )
        examples_path = spec.get("examples")
        if examples_path is None and self.examples_dir is not None:
            candidate = self.examples_dir / f"{task_name}.json"
            examples_path = candidate if candidate.is_file() else None
        examples = tuple(load_examples(examples_path)) if examples_path else ()
        self._prompts[task_name] = TaskPrompt(instruction, examples)
        return self._prompts[task_name]

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
        prompt = self.task_prompt(task_metadata.name, getattr(task_metadata, "type", None))
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
            }
        )
