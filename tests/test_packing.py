"""Packing invariants (hypothesis) and row buckets."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_iclemb.data.packing import (
    first_fit_decreasing,
    ladder,
    pack_batch,
    pad_batch,
    row_bucket,
    row_lengths,
    segment_bucket,
)
from jax_iclemb.model.block_sparse import block_pairs

EOS = 2


@st.composite
def batches(draw):
    pack_len = draw(st.integers(4, 40))
    group = draw(st.integers(1, 4))
    num_queries = draw(st.integers(1, 6))
    length = st.integers(1, pack_len)
    counter = iter(range(10, 10**6))

    def seq(n):  # distinct token values so every sequence is recognisable; EOS last
        return [next(counter) for _ in range(n - 1)] + [EOS]

    queries = [seq(draw(length)) for _ in range(num_queries)]
    passages = [
        [seq(draw(length)) for _ in range(draw(st.integers(1, group)))] for _ in range(num_queries)
    ]
    return dict(
        queries=queries,
        passages=passages,
        group_size=group,
        pack_len=pack_len,
        max_segments=draw(st.integers(1, 5)),
        row_multiple=draw(st.integers(1, 3)),
    )


def segment(batch, slot):
    r, s = divmod(int(slot), batch.max_segments)
    return r, s, np.flatnonzero(batch.segment_ids[r] == s + 1)


@settings(max_examples=150, deadline=None)
@given(batches())
def test_pack_invariants(args):
    b = len(args["queries"])
    g = args["group_size"]
    batch = pack_batch(
        **args,
        teacher_scores=np.zeros((b, g)),
        has_teacher=np.zeros(b, bool),
        in_batch_negatives=True,
        pad_id=0,
    )
    R, L = batch.tokens.shape
    assert args["pack_len"] == L and R % args["row_multiple"] == 0
    slots = [(batch.query_slot[i], q) for i, q in enumerate(args["queries"])]
    for i, group in enumerate(args["passages"]):
        assert batch.passage_mask[i].tolist() == [k < len(group) for k in range(g)]
        slots += [(batch.passage_slot[i, k], p) for k, p in enumerate(group)]
    assert len({int(s) for s, _ in slots}) == len(slots)  # one slot per sequence
    covered = np.zeros((R, L), bool)
    for slot, seq in slots:
        r, s, cols = segment(batch, slot)
        assert s < args["max_segments"]
        assert len(cols) == len(seq) and np.all(np.diff(cols) == 1)  # whole and contiguous
        assert batch.tokens[r, cols].tolist() == seq  # in order
        assert batch.positions[r, cols].tolist() == list(range(len(seq)))
        assert batch.last_index[r, s] == cols[-1] and batch.tokens[r, cols[-1]] == EOS
        assert not covered[r, cols].any()
        covered[r, cols] = True
    # Everything else is padding: segment 0, position 0, pad token.
    assert np.all(batch.segment_ids[~covered] == 0) and np.all(batch.positions[~covered] == 0)
    assert np.all(batch.tokens[~covered] == 0)
    assert np.all((batch.segment_ids > 0) == covered)
    # Segment ids count 1..n along each row.
    for r in range(R):
        ids = batch.segment_ids[r][batch.segment_ids[r] > 0]
        assert np.all(np.diff(ids) >= 0) and set(ids.tolist()) == set(range(1, len(set(ids)) + 1))


@given(st.lists(st.integers(1, 30), min_size=1, max_size=40), st.integers(1, 6))
def test_ffd_matches_direct_first_fit(lengths, max_segments):
    """Against a direct first-fit-decreasing written with plain Python lists."""
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for row in rows:
            if sum(lengths[j] for j in row) + lengths[i] <= 30 and len(row) < max_segments:
                row.append(i)
                break
        else:
            rows.append([i])
    row, _, used = first_fit_decreasing(lengths, pack_len=30, max_segments=max_segments)
    assert used == len(rows)
    assert [sorted(np.flatnonzero(row == r).tolist()) for r in range(used)] == [
        sorted(r) for r in rows
    ]


def test_too_long_sequence_is_an_error():
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens"):
        first_fit_decreasing([3, 9], pack_len=8, max_segments=4)


@given(st.integers(1, 4096), st.integers(0, 4096), st.sampled_from([1, 8, 64]))
def test_row_lengths_halve_pack_len_down_to_the_shortest_in_whole_units(pack_len, shortest, unit):
    lengths = row_lengths(pack_len, shortest, unit)
    assert lengths[0] == pack_len
    for longer, shorter in itertools.pairwise(lengths):
        assert longer == 2 * shorter and shorter >= shortest and shorter % unit == 0
    half = lengths[-1] // 2
    # It stops only where one more half would be too short, not whole, or not wanted.
    assert not shortest or half < shortest or lengths[-1] % (2 * unit)
    assert row_lengths(1024, 256, 64) == (1024, 512, 256) and row_lengths(1024, 0, 64) == (1024,)


def test_row_bucket():
    buckets = {row_bucket(n) for n in range(1, 1025)}
    assert len([b for b in buckets if 256 < b <= 512]) == 8  # 8 shapes per doubling
    for n in range(1, 2000):
        b = row_bucket(n)
        if n < 16:
            assert b == n
        else:
            assert n <= b < n * 1.125 + 1
        for m in (2, 8):
            assert row_bucket(n, m) % m == 0 and row_bucket(n, m) >= b


@pytest.mark.parametrize("per", [1, 2, 4, 8])
def test_ladder_has_per_doubling_rungs_and_bounded_padding(per):
    rungs = {ladder(n, per) for n in range(1, 4097)}
    assert len([r for r in rungs if 1024 < r <= 2048]) == per
    for n in range(1, 4097):
        r = ladder(n, per)
        assert ladder(r, per) == r  # a rung is its own rung
        assert r == n if n < 2 * per else n <= r < n * (1 + 1 / per)
    with pytest.raises(ValueError):
        ladder(5, 3)


def sequence_at(batch, slot: int) -> list[int]:
    row, segment = divmod(int(slot), batch.max_segments)
    return batch.tokens[row][batch.segment_ids[row] == segment + 1].tolist()


@pytest.mark.parametrize("segments", [None, "held", 8])
def test_pad_batch_in_groups_keeps_rows_slots_and_tiles(segments):
    """Padding rows go to the end of each row group: every query and passage slot still points at
    its tokens and its last one, whatever the segment slots per row (as packed, as many as a row
    holds, more), and each group's block-sparse tile list is unchanged."""
    rng = np.random.default_rng(0)
    queries = [rng.integers(3, 50, size=int(n)).tolist() for n in rng.integers(5, 30, size=6)]
    passages = [
        [rng.integers(3, 50, size=int(n)).tolist() for n in rng.integers(2, 20, size=3)]
        for _ in queries
    ]
    batch = pack_batch(
        queries, passages, group_size=3, pack_len=32, max_segments=4,
        teacher_scores=np.zeros((6, 3)), has_teacher=np.zeros(6, bool),
        in_batch_negatives=True, row_multiple=2,
    )  # fmt: skip
    groups, old = 2, batch.num_rows // 2
    held = int(batch.segment_ids.max())
    segments = held if segments == "held" else segments
    padded = pad_batch(batch, num_rows=batch.num_rows + 6, num_queries=8, groups=groups,
                       num_segments=segments)
    assert padded.max_segments == (segments or batch.max_segments)
    new = padded.num_rows // groups
    for g in range(groups):
        np.testing.assert_array_equal(
            padded.tokens[g * new : g * new + old], batch.tokens[g * old : (g + 1) * old]
        )
        assert not padded.segment_ids[g * new + old : (g + 1) * new].any()
    for i, q in enumerate(queries):
        assert sequence_at(padded, padded.query_slot[i]) == q
        for j, p in enumerate(passages[i]):
            assert sequence_at(padded, padded.passage_slot[i, j]) == p
    for slot in [*padded.query_slot[:6], *padded.passage_slot[:6].ravel()]:
        row, segment = divmod(int(slot), padded.max_segments)
        ids = padded.segment_ids[row]
        last = padded.last_index[row, segment]
        assert ids[last] == segment + 1 and (last + 1 == len(ids) or ids[last + 1] != segment + 1)
    # Rows keep their ids (their dropout masks); the padding rows share -1.
    np.testing.assert_array_equal(batch.row_ids, np.arange(batch.num_rows))
    ids = padded.row_ids.reshape(groups, new)
    np.testing.assert_array_equal(ids[:, :old], batch.row_ids.reshape(groups, old))
    assert (ids[:, old:] == -1).all()
    want = block_pairs(batch.segment_ids, block=8, causal=True, groups=groups)
    got = block_pairs(padded.segment_ids, block=8, causal=True, groups=groups)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="row groups"):
        pad_batch(batch, num_rows=batch.num_rows + 3, num_queries=8, groups=groups)
    with pytest.raises(ValueError, match=f"{held} sequences a row"):
        pad_batch(batch, num_rows=batch.num_rows, num_queries=8, num_segments=held - 1)


@pytest.mark.parametrize("count, cap, want", [
    (0, 128, 1), (1, 128, 1), (2, 128, 2), (3, 128, 4), (21, 128, 32), (32, 128, 32),
    (33, 128, 64), (100, 128, 128), (21, 24, 24),
])
def test_segment_bucket_is_the_next_power_of_two_up_to_the_cap(count, cap, want):
    assert segment_bucket(count, cap) == want


def test_pad_batch_adds_empty_rows_and_padding_queries():
    batch = pack_batch(
        [[5, 2]],
        [[[6, 7, 2]]],
        group_size=1,
        pack_len=8,
        max_segments=2,
        teacher_scores=np.zeros((1, 1)),
        has_teacher=np.zeros(1, bool),
        in_batch_negatives=False,
    )
    padded = pad_batch(batch, num_rows=4, num_queries=3)
    assert padded.tokens.shape == (4, 8) and padded.last_index.shape == (4, 2)
    assert np.all(padded.segment_ids[1:] == 0) and padded.utilisation() == 5 / 32
    np.testing.assert_array_equal(padded.tokens[:1], batch.tokens)
    # Padding queries have no valid passage (the loss gives them no weight).
    assert padded.query_slot.shape == (3,) and padded.passage_slot.shape == (3, 1)
    assert padded.passage_mask.tolist() == [[True], [False], [False]]
    assert padded.has_teacher.tolist() == [False, False, False]
    with pytest.raises(ValueError):
        pad_batch(padded, num_rows=2, num_queries=3)
