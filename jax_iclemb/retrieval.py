"""Retrieval scoring without JAX: the metrics reported, their table, and the tie order of ranked
documents (score descending, then document id descending, as trec_eval).

The ranking itself runs on the devices (`jax_iclemb.device_topk`), the evaluation of an `Embedder`
on a BEIR folder in `jax_iclemb.beir_eval`. Metrics follow `jax_iclemb.ir_metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jax_iclemb.ir_metrics import Qrels, Run, mrr_at_k, ndcg_at_k, recall_at_k

# (name in results, label in the table, metric function, k)
METRICS = (
    ("ndcg@10", "nDCG@10", ndcg_at_k, 10),
    ("mrr@10", "MRR@10", mrr_at_k, 10),
    ("recall@10", "Recall@10", recall_at_k, 10),
    ("recall@100", "Recall@100", recall_at_k, 100),
)
TOP_K = max(k for *_, k in METRICS)
MODES = (("zero", "zero-shot"), ("few", "few-shot"))


def descending_id_rank(doc_ids: Sequence[str]) -> np.ndarray:
    """Rank of each id in descending string order: of two documents with equal scores, trec_eval
    ranks the one with the smaller rank (the larger id) first."""
    rank = np.empty(len(doc_ids), dtype=np.int64)
    rank[sorted(range(len(doc_ids)), key=lambda j: doc_ids[j], reverse=True)] = np.arange(
        len(doc_ids)
    )
    return rank


def retrieval_metrics(qrels: Qrels, run: Run) -> dict[str, float]:
    """The mean of each reported metric (`METRICS`) over the judged queries of `run`."""
    return {name: fn(qrels, run, k)[1] for name, _, fn, k in METRICS}


def markdown_table(result: Mapping[str, Any]) -> str:
    """The metrics of an evaluation result, one column per mode (zero-shot, few-shot)."""
    modes = [(m, label) for m, label in MODES if m in result]
    lines = [
        "| metric | " + " | ".join(label for _, label in modes) + " |",
        "|---" * (len(modes) + 1) + "|",
    ]
    for name, label, *_ in METRICS:
        values = " | ".join(f"{result[m][name]:.4f}" for m, _ in modes)
        lines.append(f"| {label} | {values} |")
    return "\n".join(lines)
