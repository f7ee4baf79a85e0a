"""Retrieval metrics with trec_eval / BEIR definitions (NumPy, host-side).

Conventions (those of trec_eval, which BEIR calls through pytrec_eval):
- ranking: score descending, ties broken by document id descending (string order);
- relevant = judged relevance >= 1; nDCG gain is the relevance itself (linear, trec_eval's
  `ndcg_cut`), negative judgements count as gain 0; the ideal ranking uses all judged documents;
- queries: every query in `qrels` is evaluated; a query missing from `run` scores 0 (trec_eval -c);
  run queries without judgements are ignored; a judged query with no relevant document scores 0 on
  every metric and is included in the mean (what pytrec_eval returns and BEIR averages).
Each metric returns (per-query values, mean over the evaluated queries).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]
PerQuery = dict[str, float]


def _ranked(docs: dict[str, float], k: int) -> list[str]:
    """The top `k` document ids in trec_eval order (score desc, then docid desc)."""
    for docid, score in docs.items():
        if math.isnan(score):
            raise ValueError(f"run score of document {docid!r} is NaN")
    return sorted(docs, key=lambda d: (docs[d], d), reverse=True)[:k]


def _evaluate(qrels: Qrels, run: Run, k: int, per_query_fn) -> tuple[PerQuery, float]:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values = {
        qid: float(per_query_fn(judged, _ranked(run.get(qid, {}), k)))
        for qid, judged in qrels.items()
    }
    mean = float(np.mean(list(values.values()))) if values else 0.0
    return values, mean


def ndcg_at_k(qrels: Qrels, run: Run, k: int) -> tuple[PerQuery, float]:
    """nDCG@k with graded relevance and linear gain (trec_eval `ndcg_cut.k`)."""
    return _evaluate(qrels, run, k, lambda judged, ranked: _ndcg_cut(judged, ranked, k))


def _ndcg_cut(judged: dict[str, int], ranked: list[str], k: int) -> float:
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    gains = np.array([max(judged.get(d, 0), 0) for d in ranked], dtype=np.float64)
    ideal = np.sort(np.maximum(np.fromiter(judged.values(), np.float64), 0.0))[::-1][:k]
    idcg = float(ideal @ discounts[: len(ideal)])
    return float(gains @ discounts[: len(gains)]) / idcg if idcg > 0 else 0.0


def mrr_at_k(qrels: Qrels, run: Run, k: int) -> tuple[PerQuery, float]:
    """Reciprocal rank of the first relevant document within the top k (0 if none)."""

    def reciprocal_rank(judged: dict[str, int], ranked: list[str]) -> float:
        return next((1.0 / r for r, d in enumerate(ranked, 1) if judged.get(d, 0) >= 1), 0.0)

    return _evaluate(qrels, run, k, reciprocal_rank)


def recall_at_k(qrels: Qrels, run: Run, k: int) -> tuple[PerQuery, float]:
    """Relevant documents in the top k / all relevant documents (trec_eval `recall.k`)."""

    def recall(judged: dict[str, int], ranked: list[str]) -> float:
        num_relevant = sum(rel >= 1 for rel in judged.values())
        found = sum(judged.get(d, 0) >= 1 for d in ranked)
        return found / num_relevant if num_relevant else 0.0

    return _evaluate(qrels, run, k, recall)


def top_k_from_scores(
    scores: np.ndarray, k: int, query_ids: Sequence[str], doc_ids: Sequence[str]
) -> Run:
    """A run holding each query's top-k documents of a [Q, N] score matrix.

    Selection uses the metrics' order (score desc, docid desc), so ties at the cut-off keep the
    documents trec_eval would rank first.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != (len(query_ids), len(doc_ids)):
        raise ValueError(
            f"scores shape {scores.shape} does not match {len(query_ids)} query ids x "
            f"{len(doc_ids)} doc ids"
        )
    if np.isnan(scores).any():
        raise ValueError(
            f"scores hold NaN at (query, doc) {tuple(np.argwhere(np.isnan(scores))[0])}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("doc_ids hold duplicates; a run needs unique document ids")
    k = min(k, scores.shape[1])
    # Rank of each doc id in descending string order: a smaller rank wins a tie.
    doc_rank = np.empty(len(doc_ids), dtype=np.int64)
    doc_rank[sorted(range(len(doc_ids)), key=lambda j: doc_ids[j], reverse=True)] = np.arange(
        len(doc_ids)
    )
    run: Run = {}
    for qid, row in zip(query_ids, scores, strict=True):
        threshold = row[np.argpartition(-row, k - 1)[k - 1]]  # the k-th largest score
        above = np.flatnonzero(row > threshold)
        tied = np.flatnonzero(row == threshold)
        tied = tied[np.argsort(doc_rank[tied])][: k - len(above)]
        run[qid] = {doc_ids[j]: float(row[j]) for j in np.concatenate([above, tied])}
    return run
