"""Retrieval evaluation of an `Embedder` on BEIR data, zero-shot and few-shot side by side.

The corpus is encoded once, the judged queries zero-shot and, given examples, few-shot; documents
are ranked by dot product (the embeddings are L2-normalised), in blocks so that memory stays
bounded on large corpora. Metrics follow `jax_iclemb.ir_metrics` (trec_eval conventions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_iclemb.beir import BeirData, load_beir
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


def _select_top_k(scores: np.ndarray, ranks: np.ndarray, k: int) -> np.ndarray:
    """Column indices [Q, k] of each row's k best entries by (score desc, rank asc)."""
    kth = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k][:, None]
    above = scores >= kth
    counts = above.sum(axis=1)
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    exact = counts == k  # the common case: no tie straddles the cut-off
    out[exact] = np.nonzero(above[exact])[1].reshape(-1, k)
    for row in np.flatnonzero(~exact):
        cols = np.flatnonzero(above[row])
        order = np.lexsort((ranks[row, cols], -scores[row, cols]))
        out[row] = cols[order[:k]]
    return out


def blocked_top_k(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    *,
    ignore_identical_ids: bool = False,
    query_block: int = 1024,
    doc_block: int = 16384,
) -> Run:
    """Each query's top-k documents by dot product, as `metrics.top_k_from_scores` selects them
    from the full [Q, N] matrix, but holding at most [query_block, k + doc_block] scores at once.

    `ignore_identical_ids`: a document whose id is the query's is never retrieved (BEIR's exact
    search and mteb do this: in ArguAna and Quora the queries are also in the corpus)."""
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"embedding shapes do not match: queries {queries.shape}, "
                         f"corpus {corpus.shape}")
    if (len(query_ids), len(doc_ids)) != (len(queries), len(corpus)):
        raise ValueError(f"{len(query_ids)} query ids / {len(doc_ids)} doc ids for "
                         f"{len(queries)} / {len(corpus)} embeddings")
    k = min(k, len(doc_ids))
    id_rank = descending_id_rank(doc_ids)
    column = {doc: j for j, doc in enumerate(doc_ids)} if ignore_identical_ids else {}
    run: Run = {}
    for q0 in range(0, len(queries), query_block):
        q = queries[q0 : q0 + query_block]
        same = [(i, column[qid]) for i, qid in enumerate(query_ids[q0 : q0 + len(q)])
                if qid in column]
        best_scores = np.empty((len(q), 0), dtype=np.float32)
        best_cols = np.empty((len(q), 0), dtype=np.int64)
        for d0 in range(0, len(corpus), doc_block):
            block = q @ corpus[d0 : d0 + doc_block].T
            if np.isnan(block).any():
                raise ValueError("embeddings produced NaN scores")
            for i, j in same:
                if d0 <= j < d0 + block.shape[1]:
                    block[i, j - d0] = -np.inf  # ranked last, and dropped below
            cols = np.concatenate(
                [best_cols, np.broadcast_to(np.arange(d0, d0 + block.shape[1]), block.shape)], 1
            )
            scores = np.concatenate([best_scores, block], axis=1)
            keep = _select_top_k(scores, id_rank[cols], min(k, scores.shape[1]))
            best_scores = np.take_along_axis(scores, keep, axis=1)
            best_cols = np.take_along_axis(cols, keep, axis=1)
        for i, qid in enumerate(query_ids[q0 : q0 + query_block]):
            run[qid] = {
                doc_ids[j]: float(s) for j, s in zip(best_cols[i], best_scores[i]) if s > -np.inf
            }
    return run


def retrieval_metrics(qrels: Qrels, run: Run) -> dict[str, float]:
    return {name: fn(qrels, run, k)[1] for name, _, fn, k in METRICS}


def evaluate_beir(
    embedder: Any,
    data: str | Path | BeirData,
    *,
    instruction: str,
    examples: Sequence[Mapping[str, str]] = (),
    split: str = "test",
    keep_runs: bool = False,
    ignore_identical_ids: bool = True,
) -> dict[str, Any]:
    """Zero-shot (and, given `examples`, few-shot) retrieval metrics of an `Embedder` on a BEIR
    folder (or its loaded `BeirData`): {"zero": {metric: value}, "few": {...}, plus counts and
    settings}. With `keep_runs`, also "runs": {mode: {query: {doc: score}}}, the top 10 ranked.
    A document with the query's own id is not retrieved unless `ignore_identical_ids` is False
    (on by default, as in BEIR and mteb)."""
    source = "" if isinstance(data, BeirData) else str(data)
    if not isinstance(data, BeirData):
        data = load_beir(data, split)
    corpus = embedder.encode_corpus(data.corpus_texts)
    result: dict[str, Any] = {
        "data": source,
        "split": split,
        "num_queries": len(data.query_ids),
        "num_documents": len(data.corpus_ids),
        "instruction": instruction,
        "num_examples": len(examples),
        "ignore_identical_ids": ignore_identical_ids,
    }
    shots = {"zero": ()} | ({"few": examples} if examples else {})
    for mode, mode_examples in shots.items():
        queries = embedder.encode_queries(
            data.query_texts, instruction=instruction, examples=mode_examples
        )
        run = blocked_top_k(
            queries, corpus, TOP_K, data.query_ids, data.corpus_ids,
            ignore_identical_ids=ignore_identical_ids,
        )
        result[mode] = retrieval_metrics(data.qrels, run)
        if keep_runs:
            result.setdefault("runs", {})[mode] = {
                qid: dict(sorted(docs.items(), key=lambda d: (d[1], d[0]), reverse=True)[:10])
                for qid, docs in run.items()
            }
    return result


def markdown_table(result: Mapping[str, Any]) -> str:
    modes = [(m, label) for m, label in MODES if m in result]
    lines = [
        "| metric | " + " | ".join(label for _, label in modes) + " |",
        "|---" * (len(modes) + 1) + "|",
    ]
    for name, label, *_ in METRICS:
        values = " | ".join(f"{result[m][name]:.4f}" for m, _ in modes)
        lines.append(f"| {label} | {values} |")
    return "\n".join(lines)
