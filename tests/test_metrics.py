"""Retrieval metrics: hand-worked cases, and pytrec_eval (trec_eval itself) on random runs."""

import math

import numpy as np
import pytest

from jax_iclemb.ir_metrics import mrr_at_k, ndcg_at_k, recall_at_k, top_k_from_scores

QRELS = {
    "q1": {"d1": 2, "d2": 1, "d3": 0},
    "q2": {"d4": 1},
    "q3": {"d5": 0},  # judged, nothing relevant, and missing from the run
}
RUN = {
    # trec_eval order: d3 (0.9), then the 0.5 tie by docid descending: d2, d1; then d9.
    "q1": {"d3": 0.9, "d1": 0.5, "d2": 0.5, "d9": 0.1},
    "q2": {"d1": 0.3},
    "q4": {"d4": 1.0},  # not judged: ignored
}


def test_hand_worked_case():
    ndcg, mean = ndcg_at_k(QRELS, RUN, 3)
    log3 = math.log2(3)
    want_q1 = (0 + 1 / log3 + 2 / 2) / (2 + 1 / log3)  # gains 0,1,2 at ranks 1..3 vs ideal 2,1,0
    assert set(ndcg) == {"q1", "q2", "q3"}
    assert ndcg["q1"] == pytest.approx(want_q1)
    assert (ndcg["q2"], ndcg["q3"]) == (0.0, 0.0)
    assert mean == pytest.approx(want_q1 / 3)

    assert ndcg_at_k(QRELS, RUN, 1)[0]["q1"] == 0.0
    assert mrr_at_k(QRELS, RUN, 1)[0]["q1"] == 0.0
    assert mrr_at_k(QRELS, RUN, 3) == ({"q1": 0.5, "q2": 0.0, "q3": 0.0}, pytest.approx(0.5 / 3))
    assert recall_at_k(QRELS, RUN, 2)[0] == {"q1": 0.5, "q2": 0.0, "q3": 0.0}
    assert recall_at_k(QRELS, RUN, 3)[0]["q1"] == 1.0


def test_top_k_breaks_ties_by_docid_descending():
    scores = np.array([[0.1, 0.5, 0.5, 0.9], [0.2, 0.2, 0.2, 0.2]])
    run = top_k_from_scores(scores, 2, ["qa", "qb"], ["a", "b", "c", "d"])
    assert run == {"qa": {"d": 0.9, "c": 0.5}, "qb": {"d": 0.2, "c": 0.2}}
    with pytest.raises(ValueError, match="doc ids"):
        top_k_from_scores(scores, 2, ["qa", "qb"], ["a", "b", "c"])


def _random_case(seed, num_queries=30, num_docs=25):
    rng = np.random.default_rng(seed)
    doc_ids = [f"d{j}" for j in rng.permutation(num_docs)]
    query_ids = [f"q{i}" for i in range(num_queries)]
    scores = rng.integers(0, 6, size=(num_queries, num_docs)) / 5.0  # many ties
    qrels = {}
    for qid in query_ids:
        judged = rng.choice(num_docs, size=rng.integers(1, 8), replace=False)
        qrels[qid] = {doc_ids[j]: int(rng.integers(-1, 4)) for j in judged}
    return qrels, scores, query_ids, doc_ids


def test_top_k_run_ranks_like_the_full_run():
    qrels, scores, query_ids, doc_ids = _random_case(0)
    full = {
        q: dict(zip(doc_ids, row, strict=True)) for q, row in zip(query_ids, scores, strict=True)
    }
    for k in (1, 4, 10):
        top = top_k_from_scores(scores, k, query_ids, doc_ids)
        assert all(len(docs) == k for docs in top.values())
        for metric in (ndcg_at_k, mrr_at_k, recall_at_k):
            assert metric(qrels, top, k) == metric(qrels, full, k)


@pytest.mark.parametrize("seed", [1, 2])
def test_matches_pytrec_eval(seed):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    qrels, scores, query_ids, doc_ids = _random_case(seed)
    run = {
        q: dict(zip(doc_ids, map(float, row), strict=True))
        for q, row in zip(query_ids, scores, strict=True)
    }
    ks = (1, 3, 10)
    measures = {
        f"ndcg_cut.{','.join(map(str, ks))}",
        f"recall.{','.join(map(str, ks))}",
        "recip_rank",
    }
    want = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    for k in ks:
        ndcg, _ = ndcg_at_k(qrels, run, k)
        recall, _ = recall_at_k(qrels, run, k)
        mrr, _ = mrr_at_k(qrels, run, k)
        for qid in query_ids:
            assert ndcg[qid] == pytest.approx(want[qid][f"ndcg_cut_{k}"], abs=1e-9)
            assert recall[qid] == pytest.approx(want[qid][f"recall_{k}"], abs=1e-9)
            # MRR@k from the uncut reciprocal rank: kept when the first hit is within k.
            rr = want[qid]["recip_rank"]
            assert mrr[qid] == pytest.approx(rr if rr >= 1 / k - 1e-12 else 0.0, abs=1e-9)
