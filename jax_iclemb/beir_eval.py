"""Retrieval evaluation of an `Embedder` on BEIR data, zero-shot and few-shot side by side.

The judged queries are encoded zero-shot and, given examples, few-shot; the corpus is then
encoded in chunks, each chunk ranked for both at once on the devices (`device_topk`), so that
host memory holds one chunk of embeddings and each query's best documents, whatever the corpus
size. Metrics follow `jax_iclemb.ir_metrics` (trec_eval conventions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jax_iclemb.beir import BeirData, load_beir
from jax_iclemb.device_topk import RunningTopK
from jax_iclemb.embedder import Embedder
from jax_iclemb.retrieval import TOP_K, retrieval_metrics

CORPUS_CHUNK = 50_000  # documents per encode call: 800 MB of float32 embeddings at D = 4096


def evaluate_beir(
    embedder: Embedder,
    data: str | Path | BeirData,
    *,
    instruction: str,
    examples: Sequence[Mapping[str, str]] = (),
    split: str = "test",
    keep_runs: bool = False,
    ignore_identical_ids: bool = True,
    corpus_chunk: int = CORPUS_CHUNK,
) -> dict[str, Any]:
    """Zero-shot (and, given `examples`, few-shot) retrieval metrics of an `Embedder` on a BEIR
    folder (or its loaded `BeirData`): {"zero": {metric: value}, "few": {...}, plus counts and
    settings}. With `keep_runs`, also "runs": {mode: {query: {doc: score}}}, the top 10 ranked.
    A document with the query's own id is not retrieved unless `ignore_identical_ids` is False
    (on by default, as in BEIR and mteb). The corpus is encoded `corpus_chunk` texts at a time."""
    if corpus_chunk < 1:
        raise ValueError(f"corpus_chunk must be >= 1, got {corpus_chunk}")
    source = "" if isinstance(data, BeirData) else str(data)
    if not isinstance(data, BeirData):
        data = load_beir(data, split)
    shots = {"zero": ()} | ({"few": examples} if examples else {})
    searches = {
        mode: RunningTopK(
            embedder.encode_queries(data.query_texts, instruction=instruction, examples=shot),
            TOP_K, data.query_ids, data.corpus_ids, ignore_identical_ids=ignore_identical_ids,
        )
        for mode, shot in shots.items()
    }
    for start in range(0, len(data.corpus_texts), corpus_chunk):
        chunk = embedder.encode_corpus(data.corpus_texts[start : start + corpus_chunk])
        for search in searches.values():
            search.add(chunk)
    result: dict[str, Any] = {
        "data": source,
        "split": split,
        "num_queries": len(data.query_ids),
        "num_documents": len(data.corpus_ids),
        "instruction": instruction,
        "num_examples": len(examples),
        "ignore_identical_ids": ignore_identical_ids,
    }
    for mode, search in searches.items():
        run = search.run()
        result[mode] = retrieval_metrics(data.qrels, run)
        if keep_runs:
            result.setdefault("runs", {})[mode] = {
                qid: dict(sorted(docs.items(), key=lambda d: (d[1], d[0]), reverse=True)[:10])
                for qid, docs in run.items()
            }
    return result
