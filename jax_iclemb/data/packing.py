"""Pack a step's token sequences, whole, into fixed-length rows (first-fit decreasing).

A step's rows are as long as the shortest rung of `row_lengths` that holds its longest sequence
(short texts need not fill rows sized for the longest query a run allows).

Each row holds at most `max_segments` sequences; segment ids run 1..n along a row (0 = padding),
positions restart at 0 in every segment. The row count is rounded up to a rung of a shape ladder
(`row_bucket`) so that jax.jit sees only a few distinct shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jax_iclemb.data.batch import PackedBatch


def ladder(n: int, per_doubling: int) -> int:
    """The smallest rung >= n of a shape ladder with `per_doubling` rungs per doubling: n itself
    below 2 · per_doubling, then m · 2**e with per_doubling <= m < 2 · per_doubling, so a rung
    pads by less than 1 / per_doubling. `per_doubling` is a power of two."""
    if n < 0 or per_doubling < 1 or per_doubling & (per_doubling - 1):
        raise ValueError(f"bad count {n} or rungs per doubling {per_doubling}")
    n = max(n, 1)
    step = 1 << max(n.bit_length() - per_doubling.bit_length(), 0)
    return -(-n // step) * step


ROW_RUNGS = 8  # rows: under 12.5% padding rows; exact below 16


def row_bucket(num_rows: int, multiple: int = 1) -> int:
    """The padded row count: `ladder(num_rows, ROW_RUNGS)` (exact below 16, then 8 shapes per
    doubling, under 12.5% padding rows), then up to a multiple of `multiple` (row shards)."""
    if multiple < 1:
        raise ValueError(f"bad row multiple {multiple}")
    return -(-ladder(num_rows, ROW_RUNGS) // multiple) * multiple


def segment_bucket(count: int, cap: int) -> int:
    """A step's segment slots per row (`PackedRows.last_index`'s width): the power of two at least
    `count`, the most sequences one of its rows holds, and at most `cap`, the packer's limit
    (`data.max_segments_per_row`). The decoder's last layer computes at these slots only, so they
    follow what the rows hold rather than the limit; powers of two keep the shapes few."""
    return min(1 << max(count - 1, 0).bit_length(), cap)


def row_lengths(pack_len: int, shortest: int, unit: int = 1) -> tuple[int, ...]:
    """The row lengths a step may pack into, longest first: `pack_len`, then its halves while a
    half is a whole multiple of `unit` (the attention's block) and at least `shortest`.
    `shortest` 0: `pack_len` alone."""
    lengths = [pack_len]
    while shortest and lengths[-1] % (2 * unit) == 0 and lengths[-1] // 2 >= shortest:
        lengths.append(lengths[-1] // 2)
    return tuple(lengths)


def first_fit_decreasing(
    lengths: Sequence[int], *, pack_len: int, max_segments: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Assign sequences to rows. Returns (row, offset) per sequence and the number of rows.

    Longest first (ties by input order), each into the first row with room and a free segment:
    deterministic, and within 11/9 OPT + 1 rows for the length constraint alone.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n and (lengths.min() < 1 or lengths.max() > pack_len):
        i = int(np.argmax((lengths < 1) | (lengths > pack_len)))
        raise ValueError(
            f"sequence {i} has {lengths[i]} tokens; every sequence needs 1..pack_len={pack_len} "
            f"(pack_len must be >= data.query_max_len and >= data.passage_max_len)"
        )
    room = np.full(n + 1, pack_len, dtype=np.int64)  # free tokens per row; -1 = no free segment
    count = np.zeros(n + 1, dtype=np.int64)
    row = np.zeros(n, dtype=np.int64)
    offset = np.zeros(n, dtype=np.int64)
    used = 0
    for i in np.argsort(-lengths, kind="stable"):
        r = int(np.argmax(room[: used + 1] >= lengths[i]))  # row `used` is empty, so always fits
        used = max(used, r + 1)
        row[i], offset[i] = r, pack_len - room[r]
        room[r] -= lengths[i]
        count[r] += 1
        if count[r] == max_segments:
            room[r] = -1
    return row, offset, used


def pack_sequences(
    seqs: Sequence[Sequence[int]],
    *,
    pack_len: int,
    max_segments: int,
    row_multiple: int = 1,
    pad_id: int = 0,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pack sequences whole into rows. Returns the row arrays (tokens, segment_ids, positions,
    last_index) and each sequence's flat slot `row * max_segments + segment`."""
    lengths = [len(s) for s in seqs]
    row, offset, used = first_fit_decreasing(lengths, pack_len=pack_len, max_segments=max_segments)

    num_rows = row_bucket(used, row_multiple)
    tokens = np.full((num_rows, pack_len), pad_id, dtype=np.int32)
    segment_ids = np.zeros((num_rows, pack_len), dtype=np.int32)
    positions = np.zeros((num_rows, pack_len), dtype=np.int32)
    last_index = np.zeros((num_rows, max_segments), dtype=np.int32)
    slot = np.zeros(len(seqs), dtype=np.int32)
    # Segments are numbered along the row, in order of their offsets.
    for i in np.lexsort((offset, row)):
        r, start, n = int(row[i]), int(offset[i]), lengths[i]
        s = int(segment_ids[r, start - 1]) if start else 0  # index of this segment in the row
        tokens[r, start : start + n] = seqs[i]
        segment_ids[r, start : start + n] = s + 1
        positions[r, start : start + n] = np.arange(n)
        last_index[r, s] = start + n - 1
        slot[i] = r * max_segments + s
    arrays = {
        "tokens": tokens,
        "segment_ids": segment_ids,
        "positions": positions,
        "last_index": last_index,
    }
    return arrays, slot


def pack_batch(
    queries: Sequence[Sequence[int]],
    passages: Sequence[Sequence[Sequence[int]]],
    *,
    group_size: int,
    pack_len: int,
    max_segments: int,
    teacher_scores: np.ndarray,
    has_teacher: np.ndarray,
    in_batch_negatives: bool,
    query_label: np.ndarray | None = None,
    passage_label: np.ndarray | None = None,
    row_multiple: int = 1,
    pad_id: int = 0,
    first_row_id: int = 0,
) -> PackedBatch:
    """Pack queries and their passage groups (positive first, up to `group_size` each).

    `query_label` [B] and `passage_label` [B, G] (int, -1 = none): a passage labelled like a query
    is not one of its negatives. Without `passage_label`, positives carry their query's label.
    The rows' ids (`PackedRows.row_ids`) count from `first_row_id`."""
    num_queries = len(queries)
    if len(passages) != num_queries:
        raise ValueError(f"{num_queries} queries but {len(passages)} passage groups")
    for i, group in enumerate(passages):
        if not 1 <= len(group) <= group_size:
            raise ValueError(f"query {i} has {len(group)} passages; needs 1..{group_size}")
    seqs = [*queries, *(p for group in passages for p in group)]
    arrays, slot = pack_sequences(
        seqs,
        pack_len=pack_len,
        max_segments=max_segments,
        row_multiple=row_multiple,
        pad_id=pad_id,
    )
    passage_slot = np.zeros((num_queries, group_size), dtype=np.int32)
    passage_mask = np.zeros((num_queries, group_size), dtype=bool)
    k = num_queries
    for i, group in enumerate(passages):
        passage_slot[i, : len(group)] = slot[k : k + len(group)]
        passage_mask[i, : len(group)] = True
        k += len(group)
    teacher_scores = np.asarray(teacher_scores, dtype=np.float32)
    query_label = (
        np.full(num_queries, -1, np.int32)
        if query_label is None
        else np.asarray(query_label, dtype=np.int32).reshape(num_queries)
    )
    if passage_label is None:
        passage_label = np.full((num_queries, group_size), -1, np.int32)
        passage_label[:, 0] = query_label
    passage_label = np.asarray(passage_label, dtype=np.int32).reshape(num_queries, group_size)
    return PackedBatch(
        **arrays,
        row_ids=first_row_id + np.arange(len(arrays["tokens"]), dtype=np.int32),
        query_slot=slot[:num_queries],
        passage_slot=passage_slot,
        passage_mask=passage_mask,
        teacher_scores=teacher_scores.reshape(num_queries, group_size),
        has_teacher=np.asarray(has_teacher, dtype=bool).reshape(num_queries),
        in_batch_negatives=np.asarray(in_batch_negatives, dtype=bool),
        query_label=query_label,
        passage_label=passage_label,
    )


def pad_batch(
    batch: PackedBatch,
    *,
    num_rows: int,
    num_queries: int,
    num_segments: int | None = None,
    pad_id: int = 0,
    groups: int = 1,
) -> PackedBatch:
    """Append empty rows (all padding) and padding queries (no valid passage, so no loss) up to
    the given counts, and give each row `num_segments` segment slots (None: as many as it has),
    at least as many as a row holds: fixed shapes across steps and hosts, hence few compiles.

    Rows are `groups` contiguous groups (data shards × gradient-cache chunks); each group gets its
    share of the new rows at its end, so a row keeps its index within its group (and the
    block-sparse tile lists, which index rows within their group, stay valid)."""
    extra_queries = num_queries - len(batch.query_slot)
    uneven = batch.num_rows % groups or num_rows % groups
    segments = batch.max_segments if num_segments is None else num_segments
    if num_rows < batch.num_rows or extra_queries < 0 or uneven or segments < batch.segments_held:
        raise ValueError(
            f"cannot pad {batch.num_rows} rows / {len(batch.query_slot)} queries / "
            f"{batch.segments_held} sequences a row to {num_rows} / {num_queries} / {segments} "
            f"in {groups} row groups"
        )
    old, new = batch.num_rows // groups, num_rows // groups
    last_index = np.zeros((batch.num_rows, segments), batch.last_index.dtype)
    width = min(segments, batch.max_segments)
    last_index[:, :width] = batch.last_index[:, :width]

    def grow_rows(a: np.ndarray, fill: int = 0) -> np.ndarray:
        out = np.full((groups, new, *a.shape[1:]), fill, dtype=a.dtype)
        out[:, :old] = a.reshape(groups, old, *a.shape[1:])
        return out.reshape(num_rows, *a.shape[1:])

    def grow(a: np.ndarray, fill: int | bool | float = 0) -> np.ndarray:
        return np.concatenate([a, np.full((extra_queries, *a.shape[1:]), fill, dtype=a.dtype)])

    def move(slot: np.ndarray) -> np.ndarray:  # flat slot row * S + segment, in the new layout
        row, segment = np.divmod(slot, batch.max_segments)
        group, index = np.divmod(row, old)
        return ((group * new + index) * segments + segment).astype(slot.dtype)

    return dataclasses.replace(
        batch,
        tokens=grow_rows(batch.tokens, pad_id),
        segment_ids=grow_rows(batch.segment_ids),
        positions=grow_rows(batch.positions),
        last_index=grow_rows(last_index),
        row_ids=None if batch.row_ids is None else grow_rows(batch.row_ids, -1),
        query_slot=grow(move(batch.query_slot)),
        passage_slot=grow(move(batch.passage_slot)),
        passage_mask=grow(batch.passage_mask, False),
        teacher_scores=grow(batch.teacher_scores),
        has_teacher=grow(batch.has_teacher, False),
        query_label=grow(batch.query_label, -1),
        passage_label=grow(batch.passage_label, -1),
    )
