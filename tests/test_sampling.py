"""Pure sampling: epoch layout, wrap-around, negatives, k ~ U{0..5}, examples."""

import collections
import math

import numpy as np
import pytest
from scipy import stats

from jax_iclemb.config import paper_recipe
from jax_iclemb.data import sampling
from jax_iclemb.data.records import TASK_TYPES
from jax_iclemb.errors import BadValue


def test_batch_size_overrides_most_specific_wins():
    overrides = {"*": 256, "retrieval/*": 512, "retrieval/msmarco": 64}
    assert sampling.batch_size_for("retrieval/msmarco", 8, overrides) == 64
    assert sampling.batch_size_for("retrieval/nq", 8, overrides) == 512
    assert sampling.batch_size_for("sts/x", 8, overrides) == 256
    assert sampling.batch_size_for("sts/x", 8, {}) == 8


def test_epoch_covers_every_record_and_wraps_around():
    layout = sampling.layout_for(["a", "b", "c"], [10, 7, 4], 4, {"b": 3})
    assert layout.batches_per_dataset == (3, 3, 1)
    assert layout.steps_per_epoch == 7
    for epoch in range(2):
        seen = collections.defaultdict(list)
        for s in range(epoch * 7, epoch * 7 + 7):
            where = sampling.locate_step(5, s, layout)
            assert where.epoch == epoch
            assert len(where.records) == layout.batch_sizes[where.dataset]
            assert len(set(where.records.tolist())) == len(where.records)  # distinct in a batch
            seen[where.dataset] += where.records.tolist()
        for d, n in enumerate(layout.sizes):
            counts = collections.Counter(seen[d])
            assert set(counts) == set(range(n))  # every record at least once
            b = layout.batch_sizes[d]
            assert sum(c - 1 for c in counts.values()) == math.ceil(n / b) * b - n  # the fill only
    first = [sampling.locate_step(5, s, layout).records.tolist() for s in range(7)]
    second = [sampling.locate_step(5, s, layout).records.tolist() for s in range(7, 14)]
    assert first != second  # reshuffled


def test_datasets_weighted_by_size():
    layout = sampling.layout_for(["big", "small"], [900, 100], 10, {})
    counts = collections.Counter(sampling.locate_step(0, s, layout).dataset for s in range(100))
    assert counts == {0: 90, 1: 10}


def test_too_small_dataset_is_an_error():
    with pytest.raises(ValueError, match="'tiny' has 3 records but batch size 4"):
        sampling.layout_for(["tiny"], [3], 4, {})


def test_negatives_distinct_or_evenly_repeated():
    rng = np.random.default_rng(0)
    assert len(set(sampling.sample_negatives(rng, 25, 7))) == 7
    few = collections.Counter(sampling.sample_negatives(rng, 3, 7))
    assert set(few) == {0, 1, 2} and max(few.values()) <= math.ceil(7 / 3)
    assert sampling.sample_negatives(rng, 0, 7) == ()


def test_k_uniform_and_examples_valid():
    counts = np.zeros(6, dtype=np.int64)
    for step in range(200):
        for slot in range(16):
            q = sampling.sample_query(
                0, step, slot, num_pos=2, num_neg=9, num_negatives=7, max_examples=5, batch_size=16
            )
            counts[q.k] += 1
            assert len(q.examples) == q.k and slot not in q.examples
            assert len(set(q.examples)) == q.k and all(0 <= j < 16 for j in q.examples)
            assert q.pos == sampling.positive_index(0, step, slot, 2)
            assert len(set(q.neg)) == 7
    assert stats.chisquare(counts).pvalue > 0.001


def test_fewer_examples_than_k_never_crash():
    ks = set()
    for step in range(30):
        q = sampling.sample_query(
            1, step, 0, num_pos=1, num_neg=1, num_negatives=7, max_examples=5, batch_size=2
        )
        assert q.examples == (() if q.k == 0 else (1,))
        ks.add(q.k)
    assert max(ks) > 1


def test_pure_in_seed_and_step():
    kw = dict(num_pos=3, num_neg=20, num_negatives=7, max_examples=5, batch_size=32)
    assert sampling.sample_query(4, 9, 3, **kw) == sampling.sample_query(4, 9, 3, **kw)
    others = {sampling.sample_query(s, 9, 3, **kw) for s in range(5)}
    assert len(others) > 1


def test_batch_size_by_kind_after_name_overrides():
    kinds = {"retrieval": 512, "symmetric": 0}
    assert sampling.batch_size_for("nq", 256, {}, kinds, "retrieval") == 512
    assert sampling.batch_size_for("sts/x", 256, {}, kinds, "symmetric") == 256  # 0: default
    assert sampling.batch_size_for("nq", 256, {"nq": 64}, kinds, "retrieval") == 64


def test_override_patterns_must_match_a_dataset():
    names = ["retrieval/msmarco", "sts/x"]
    sampling.check_patterns(names, {"retrieval/*": 8, "sts/x": 4})
    with pytest.raises(BadValue, match=r"\['retreival/\*', 'nq'\] match no dataset.*'sts/x'"):
        sampling.check_patterns(names, {"retreival/*": 8, "nq": 4, "sts/*": 2})
    with pytest.raises(BadValue, match="match no dataset"):
        sampling.layout_for(names, [10, 10], 4, {"nq": 4})


def test_paper_recipe_split_by_kind_equals_the_old_file_name_rule_on_the_reference_layout():
    """The reference data's layout (retrieval/ holds the retrieval sets, the other tasks live
    elsewhere): the task-kind rule gives what the old name patterns gave; nq.jsonl at the root,
    which the patterns sent to 256, now gets 512."""
    data = paper_recipe("unused", "unused").data
    layout = {
        "retrieval/msmarco": "normal", "retrieval/nq": "normal", "retrieval/fever": "only_1neg",
        "sts/stsbenchmark": "symmetric_sts",
        "classification-no_in_batch_neg/Banking77": "symmetric_class",
        "clustering-no_in_batch_neg/arXiv_title": "symmetric_clustering",
    }
    names = list(layout)
    kinds = [TASK_TYPES[t].kind for t in layout.values()]
    new = sampling.layout_for(
        names, [1000] * len(names), data.batch_size, dict(data.batch_size_overrides), kinds,
        dict(data.batch_size_by_kind),
    ).batch_sizes
    old = [sampling.batch_size_for(n, 256, {"retrieval*": 512, "*msmarco*": 512}) for n in names]
    assert list(new) == old == [512, 512, 512, 256, 256, 256]
    root = sampling.layout_for(["nq"], [1000], data.batch_size, {}, ["retrieval"],
                               dict(data.batch_size_by_kind))
    assert root.batch_sizes == (512,)
