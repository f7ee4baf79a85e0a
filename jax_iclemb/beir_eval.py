"""Retrieval evaluation of an `Embedder` on BEIR data, zero-shot and few-shot side by side.

The judged queries are encoded zero-shot and, given examples, few-shot; the corpus is then
encoded in chunks (or read, shard by shard, from an embedding store that `python -m
jax_iclemb.encode` wrote), each chunk ranked for both at once on the devices (`device_topk`), so
that host memory holds one chunk of embeddings and each query's best documents, whatever the
corpus size. Metrics follow `jax_iclemb.ir_metrics` (trec_eval conventions).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_iclemb.beir import BeirData, load_beir
from jax_iclemb.device_topk import RunningTopK
from jax_iclemb.embedder import Embedder
from jax_iclemb.embedding_store import read_store
from jax_iclemb.errors import BadValue
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
    corpus_store: str | Path | None = None,
) -> dict[str, Any]:
    """Zero-shot (and, given `examples`, few-shot) retrieval metrics of an `Embedder` on a BEIR
    folder (or its loaded `BeirData`): {"zero": {metric: value}, "few": {...}, plus counts and
    settings}. With `keep_runs`, also "runs": {mode: {query: {doc: score}}}, the top 10 ranked.
    A document with the query's own id is not retrieved unless `ignore_identical_ids` is False
    (on by default, as in BEIR and mteb). The corpus is encoded `corpus_chunk` texts at a time, or
    read from the complete embedding store `corpus_store`, whose ids must be the corpus's, in
    order (`python -m jax_iclemb.encode --input` the same BEIR folder writes them so)."""
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
    if corpus_store is None:
        chunks = _encoded_corpus(embedder, data.corpus_texts, corpus_chunk)
    else:
        chunks = _stored_corpus(corpus_store, data.corpus_ids)
    for chunk in chunks:
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


def _encoded_corpus(embedder: Embedder, texts: Sequence[str], chunk: int) -> Iterator[np.ndarray]:
    for start in range(0, len(texts), chunk):
        yield embedder.encode_corpus(texts[start : start + chunk])


def _stored_corpus(folder: str | Path, corpus_ids: Sequence[str]) -> Iterator[np.ndarray]:
    """The store's embeddings, shard by shard, once its ids are checked against the corpus's."""
    start = 0
    for ids, embeddings in read_store(folder):
        want = list(corpus_ids[start : start + len(ids)])
        if ids != want:
            at = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), len(want))
            found = ids[at] if at < len(ids) else "nothing"
            expected = want[at] if at < len(want) else "the end of the corpus"
            raise BadValue(
                f"{folder}: row {start + at} is document {found!r}, but the corpus has "
                f"{expected!r} there: the store is not of this corpus (encode it from the same "
                "BEIR folder)"
            )
        start += len(ids)
        yield embeddings
    if start != len(corpus_ids):
        raise BadValue(
            f"{folder}: {start} documents, but the corpus has {len(corpus_ids)}: the store is not "
            "of this corpus"
        )
