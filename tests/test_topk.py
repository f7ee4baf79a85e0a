"""Exact top-k on the devices (`device_topk`) against a plain NumPy argsort of the full score
matrix, with trec_eval's tie rule (score descending, then document id descending) written here
from scratch. The tests run on 8 emulated CPU devices, so every block is split over 8 shards.

Test vectors are random but dyadic (multiples of 2**-10 or ±1/16), so every dot product is exact
in float32 whatever the summation order: NumPy's and XLA's scores are then the same numbers, and
duplicated vectors tie exactly on both sides.
"""

import numpy as np
import pytest

from jax_iclemb import device_topk
from jax_iclemb.device_topk import RunningTopK, lex_top_k
from jax_iclemb.retrieval import retrieval_metrics


def reference_run(queries, corpus, k, query_ids, doc_ids, ignore_identical_ids=False):
    """The full [Q, N] matrix, each row argsorted by (score desc, id desc)."""
    scores = queries @ corpus.T
    id_order = np.empty(len(doc_ids), dtype=np.int64)
    id_order[np.argsort(np.array(doc_ids))] = np.arange(len(doc_ids))  # ascending id
    run = {}
    for qid, row in zip(query_ids, scores):
        keep = np.array([not (ignore_identical_ids and d == qid) for d in doc_ids])
        order = np.lexsort((-id_order, -row))  # last key first: score desc, then id desc
        order = order[keep[order]][: min(k, len(doc_ids))]
        run[qid] = {doc_ids[j]: float(row[j]) for j in order}
    return run


def dyadic_unit_vectors(rng, n, dim):
    """Random directions rounded to multiples of 2**-10: norm 1 within 1e-3, exact dot products
    (products have 20 fractional bits and every partial sum stays below 2)."""
    v = rng.normal(size=(n, dim))
    return (np.round(v / np.linalg.norm(v, axis=1, keepdims=True) * 1024) / 1024).astype(
        np.float32
    )


def search(queries, k, query_ids, doc_ids, corpus, chunk, **kwargs):
    topk = RunningTopK(queries, k, query_ids, doc_ids, **kwargs)
    for start in range(0, len(corpus), chunk):
        topk.add(corpus[start : start + chunk])
    return topk.run()


@pytest.fixture(scope="module")
def corpus_20k():
    """20,000 documents, 300 of them exact copies of others (up to 4 copies of one vector), ids in
    shuffled order; 300 queries, 50 of which are documents (ids and vectors) with copies."""
    rng = np.random.default_rng(0)
    corpus = dyadic_unit_vectors(rng, 20_000, 256)
    sources = rng.choice(20_000, size=100, replace=False)
    copies = rng.choice(np.setdiff1d(np.arange(20_000), sources), size=300, replace=False)
    corpus[copies] = corpus[np.repeat(sources, 3)]
    doc_ids = [f"doc{j}" for j in rng.permutation(20_000)]
    queries = dyadic_unit_vectors(rng, 300, 256)
    queries[:50] = corpus[sources[:50]]
    query_ids = [doc_ids[j] for j in sources[:50]] + [f"q{i}" for i in range(250)]
    return queries, corpus, query_ids, doc_ids


@pytest.mark.parametrize("ignore_identical_ids", [False, True])
def test_20k_documents_equal_the_full_matrix_argsort(corpus_20k, ignore_identical_ids):
    queries, corpus, query_ids, doc_ids = corpus_20k
    for k in (1, 3, 100):
        expected = reference_run(queries, corpus, k, query_ids, doc_ids, ignore_identical_ids)
        # Chunks of 3,000 leave part of a 4,096-document block (512 per device) to the next one;
        # 300 queries are 3 blocks of 128, the last padded.
        got = search(queries, k, query_ids, doc_ids, corpus, 3000, query_block=128,
                     doc_block=4096, ignore_identical_ids=ignore_identical_ids)
        assert got == expected
    # The copies of a query's own document tie for the top: the cut-off at k=1 and 3 fell inside
    # such ties. Its own document is in the run only when identical ids are kept.
    top = reference_run(queries[:1], corpus, 4, query_ids[:1], doc_ids)
    assert len(set(top[query_ids[0]].values())) == 1
    assert (query_ids[0] in got[query_ids[0]]) != ignore_identical_ids


def test_heavy_ties_at_every_cut_off():
    """±1/16 vectors in 256 dimensions: exactly unit length, and only 513 possible scores, so
    hundreds of documents share the score at the cut-off of every query."""
    rng = np.random.default_rng(1)
    corpus = (rng.choice([-1, 1], size=(5000, 256)) / 16).astype(np.float32)
    queries = (rng.choice([-1, 1], size=(37, 256)) / 16).astype(np.float32)
    doc_ids = [f"d{j}" for j in rng.permutation(5000)]
    query_ids = [f"q{i}" for i in range(37)]
    for k, doc_block in ((1, 512), (100, 512), (100, 4096), (700, 1024)):
        expected = reference_run(queries, corpus, k, query_ids, doc_ids)
        got = search(queries, k, query_ids, doc_ids, corpus, 999, doc_block=doc_block)
        assert got == expected


def test_corpus_smaller_than_k_and_a_corpus_in_one_call():
    rng = np.random.default_rng(2)
    corpus = rng.integers(-2, 3, size=(53, 6)).astype(np.float32)
    corpus[40:] = corpus[:13]
    queries = rng.integers(-2, 3, size=(11, 6)).astype(np.float32)
    doc_ids = [f"d{j}" for j in rng.permutation(53)]
    query_ids = [f"q{i}" for i in range(11)]
    for k in (5, 53, 100):
        got = search(queries, k, query_ids, doc_ids, corpus, 53, query_block=4, doc_block=16)
        assert got == reference_run(queries, corpus, k, query_ids, doc_ids)
    assert all(len(docs) == 53 for docs in got.values())


def test_two_rank_keys_past_float32_integers(monkeypatch):
    """Above 2**24 documents an id rank is split into two exact float32 keys; with RANK_BITS = 3
    a 60-document corpus takes that path."""
    monkeypatch.setattr(device_topk, "RANK_BITS", 3)
    assert device_topk.rank_keys(np.arange(60)).shape == (2, 60)
    rng = np.random.default_rng(3)
    corpus = rng.integers(-1, 2, size=(60, 4)).astype(np.float32)  # 81 vectors: many ties
    queries = rng.integers(-1, 2, size=(9, 4)).astype(np.float32)
    doc_ids = [f"d{j:02d}" for j in rng.permutation(60)]
    query_ids = [f"q{i}" for i in range(9)]
    for k in (1, 7, 30):
        got = search(queries, k, query_ids, doc_ids, corpus, 25, doc_block=16)
        assert got == reference_run(queries, corpus, k, query_ids, doc_ids)


def test_lex_top_k_is_a_lexicographic_selection():
    rng = np.random.default_rng(4)
    keys = rng.integers(0, 3, size=(3, 40, 50)).astype(np.float32)  # ties on every level
    for k in (1, 10, 49, 50):
        got = np.sort(np.asarray(lex_top_k(list(keys), k)), axis=1)
        for row in range(40):
            # np.lexsort sorts by its last key first. The k-th and (k+1)-th entries may tie on
            # all three keys, so the key values are compared, not the columns.
            order = np.lexsort((-keys[2, row], -keys[1, row], -keys[0, row]))
            chosen = sorted(map(tuple, keys[:, row, got[row]].T), reverse=True)
            assert chosen == sorted(map(tuple, keys[:, row, order[:k]].T), reverse=True)
            assert len(set(got[row])) == k


def test_identical_ids_are_not_retrieved_as_in_beir():
    """BEIR's exact search (and mteb) skip a document whose id is the query's; a judgement on the
    query's own id can then no longer be met, and the score falls as in BEIR."""
    rng = np.random.default_rng(5)
    corpus = dyadic_unit_vectors(rng, 30, 8)
    doc_ids = [f"d{j}" for j in range(30)]
    query_ids = ["d3", "d17", "q2", "d29"]  # three queries are also documents (as in ArguAna)
    queries = corpus[[3, 17, 5, 29]]
    plain = search(queries, 30, query_ids, doc_ids, corpus, 30, doc_block=8)
    got = search(queries, 30, query_ids, doc_ids, corpus, 30, doc_block=8,
                 ignore_identical_ids=True)
    assert got == reference_run(queries, corpus, 30, query_ids, doc_ids, True)
    assert [len(got[q]) for q in query_ids] == [29, 29, 30, 29]
    assert "d3" in plain["d3"] and "d3" not in got["d3"]
    qrels = {"d3": {"d3": 1}, "d17": {"d17": 1}}
    assert retrieval_metrics(qrels, {q: plain[q] for q in qrels})["recall@100"] == 1.0
    assert retrieval_metrics(qrels, {q: got[q] for q in qrels})["recall@100"] == 0.0


def test_misuse_is_an_error_naming_it():
    queries, docs = np.ones((2, 4), np.float32), np.ones((5, 4), np.float32)
    with pytest.raises(ValueError, match="do not match 3 query ids"):
        RunningTopK(queries, 10, ["a", "b", "c"], ["d"] * 5)
    topk = RunningTopK(queries, 10, ["a", "b"], [f"d{j}" for j in range(5)])
    with pytest.raises(ValueError, match=r"\(5, 3\) do not match the queries' dimension 4"):
        topk.add(np.ones((5, 3), np.float32))
    topk.add(docs[:3])
    with pytest.raises(ValueError, match="3 documents added for 5 doc ids"):
        topk.run()
    with pytest.raises(ValueError, match="6 documents added for 5 doc ids"):
        topk.add(np.ones((3, 4), np.float32))
    nan = RunningTopK(queries, 10, ["a", "b"], [f"d{j}" for j in range(5)], doc_block=8)
    nan.add(np.where(np.arange(4) == 2, np.nan, docs))  # less than a block: ranked at run()
    with pytest.raises(ValueError, match="NaN scores"):
        nan.run()
    with pytest.raises(ValueError, match="NaN scores"):  # a whole block: at once
        nan = RunningTopK(queries, 10, ["a", "b"], [f"d{j}" for j in range(8)], doc_block=8)
        nan.add(np.full((8, 4), np.nan, np.float32))
