"""The host side of inference: sequences in order of length, a chunk at a time, packed into device
calls whose shapes come from a small ladder (docs/embedder_internals.md).

Inputs are visited longest first, `chunk` at a time, so host memory holds one chunk's token ids
and packed rows, never the whole corpus. Each sequence goes to rows of its own row length, packed
whole (`pack_sequences`, first-fit decreasing), so rows carry little padding. A call's shape is a
function of its row length and its tile count only:

- row length: the smallest rung at least the sequence's length of a ladder with 2 rungs per
  doubling (64, 96, 128, 192, ...; at least `MIN_ROW_LEN`, or
  `SPARSE_ROW_LEN` under block-sparse attention, whose cost follows the kept tiles, not L², so
  that many short texts share a row);
- rows per call: `TOKENS_PER_SHARD // length` per data shard (or the user's `rows_per_call`), so
  every call does about the same work; what a chunk leaves of a partly filled call waits for the
  next chunk, and only the input's last call of each row length is smaller (a power of two rows
  per data shard, `CallLayout.last_rows`);
- segments per row: `length // TOKENS_PER_SEGMENT` (or the user's `max_segments`);
- block-sparse tiles per row group: on a ladder of `TILE_RUNGS` rungs per doubling between a full
  diagonal and every tile (`CallLayout.shapes` lists them all).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from jax_iclemb.data.batch import PackedRows
from jax_iclemb.data.packing import ladder, pack_sequences
from jax_iclemb.model.block_sparse import block_pairs, most_tiles, pad_pairs, padded_tiles

MIN_ROW_LEN = 64
SPARSE_ROW_LEN = 512  # many short texts per row; attention work follows the real tiles
TOKENS_PER_SHARD = 8192  # per call and data shard: big enough that dispatch is not the cost
TOKENS_PER_SEGMENT = 8  # a row holds up to length / 8 sequences
# Row lengths 64, 96, 128, 192, 256, 384, ...: a sequence pads its row by under a third (a
# 517-token few-shot query alone in a row of 1,024 wasted half of it). Each rung is one more
# compile per row count.
ROW_LENGTH_RUNGS = 2
# 2 rungs per doubling (under 50% padding tiles, not training's 4): each rung is one more compile,
# and attention is a small part of a real model's inference work at these row lengths.
TILE_RUNGS = 2
CHUNK = 4096  # sequences per packing round: bounds host memory

T = TypeVar("T")
U = TypeVar("U")


@dataclasses.dataclass(frozen=True)
class CallLayout:
    """What fixes call shapes besides the sequences: the data shards, the model's attention, and
    the user's overrides of rows per call and segments per row."""

    shards: int = 1
    block: int | None = None  # block-sparse attention's tile size; None: the dense mask
    causal: bool = True
    rows_per_call: int | None = None
    max_segments: int | None = None

    def __post_init__(self) -> None:
        if self.rows_per_call is not None and (
            self.rows_per_call < 1 or self.rows_per_call % self.shards
        ):
            raise ValueError(
                f"rows_per_call must be a positive multiple of {self.shards} (data shards), "
                f"got {self.rows_per_call}"
            )
        if self.max_segments is not None and self.max_segments < 1:
            raise ValueError(f"max_segments must be >= 1, got {self.max_segments}")

    def row_length(self, longest: int) -> int:
        """Tokens per row for sequences of up to `longest` tokens."""
        floor = MIN_ROW_LEN if self.block is None else SPARSE_ROW_LEN
        length = max(floor, ladder(longest, ROW_LENGTH_RUNGS))
        if self.block is not None:
            length = -(-length // self.block) * self.block
        return length

    def rows(self, length: int) -> int:
        """Rows of a full call."""
        return self.rows_per_call or self.shards * max(1, TOKENS_PER_SHARD // length)

    def last_rows(self, used: int, length: int) -> int:
        """Rows of the last call of a row length when it needs `used` rows: a power of two per
        data shard, so a small input is not padded to a full call."""
        per_shard = -(-used // self.shards)
        return min(self.rows(length), self.shards * (1 << (per_shard - 1).bit_length()))

    def row_counts(self, length: int) -> list[int]:
        """Every row count a call of this row length can have."""
        counts, per_shard = {self.rows(length)}, 1
        while self.shards * per_shard < self.rows(length):
            counts.add(self.shards * per_shard)
            per_shard *= 2
        return sorted(counts)

    def segments(self, length: int) -> int:
        return self.max_segments or max(1, length // TOKENS_PER_SEGMENT)

    def tile_range(self, rows: int, length: int) -> tuple[int, int]:
        """(fewest, most) tiles a row group's list is padded to: a full diagonal per row, and
        every tile a row can need (the lower triangle when causal)."""
        per_group = rows // self.shards
        most = most_tiles(per_group, length, block=self.block, causal=self.causal)
        return per_group * (length // self.block), most

    def tiles(self, count: int, rows: int, length: int) -> int:
        """The padded tile count of a call whose largest row group needs `count` tiles."""
        fewest, most = self.tile_range(rows, length)
        return padded_tiles(max(count, fewest), most, TILE_RUNGS)

    def shapes(self, longest: int) -> set[tuple[int, int, int, int]]:
        """Every call shape (rows, length, segments, tiles) that sequences of up to `longest`
        tokens can produce: the bound on compiled executables."""
        keys = set()
        length = self.row_length(1)
        while True:
            segments = self.segments(length)
            for rows in self.row_counts(length):
                if self.block is None:
                    keys.add((rows, length, segments, 0))
                    continue
                count, most = self.tile_range(rows, length)
                while count <= most:
                    keys.add((rows, length, segments, self.tiles(count, rows, length)))
                    count = self.tiles(count, rows, length) + 1
            if length >= self.row_length(longest):
                return keys
            length = self.row_length(length + 1)


@dataclasses.dataclass(frozen=True)
class Call:
    """One device call: its packed rows (host arrays) and where its embeddings go."""

    rows: PackedRows
    index: np.ndarray  # int64 [n]: input position of each sequence embedded here
    slot: np.ndarray  # int64 [n]: its row in the call's output [rows * segments, D]

    @property
    def key(self) -> tuple[int, int, int, int]:
        tiles = 0 if self.rows.block_pairs is None else self.rows.block_pairs.shape[1]
        return self.rows.num_rows, self.rows.tokens.shape[1], self.rows.max_segments, tiles


def _take_rows(arrays: dict[str, np.ndarray], start: int, count: int) -> dict[str, np.ndarray]:
    """Rows [start, start + count) of the packed arrays, empty rows (all padding) past their end."""
    out = {}
    for name, value in arrays.items():
        part = value[start : start + count]
        empty = np.zeros((count - len(part), *value.shape[1:]), value.dtype)
        out[name] = np.concatenate([part, empty])
    return out


def pack_calls(
    seqs: Sequence[Sequence[int]], index: np.ndarray, layout: CallLayout, *, last: bool
) -> tuple[list[Call], np.ndarray]:
    """Pack `seqs` (input positions `index`) into full calls. Returns the calls and which of
    `seqs` they left out (those of a partly filled last call), to pack with the next chunk; with
    `last`, nothing is left out and the last call has `layout.last_rows`."""
    length = layout.row_length(max(len(s) for s in seqs))
    rows, segments = layout.rows(length), layout.segments(length)
    arrays, slot = pack_sequences(seqs, pack_len=length, max_segments=segments)
    call = slot // (rows * segments)
    used = int(slot.max()) // segments + 1
    num_calls = -(-used // rows) if last else used // rows
    calls = []
    for c in range(num_calls):
        count = min(rows, layout.last_rows(used - c * rows, length))
        part = _take_rows(arrays, c * rows, count)
        pairs = None
        if layout.block is not None:
            pairs = block_pairs(
                part["segment_ids"], block=layout.block, causal=layout.causal,
                groups=layout.shards,
            )
            tiles = layout.tiles(pairs.shape[1], count, length)
            pairs = pad_pairs(pairs, tiles, length // layout.block)
        mine = call == c
        calls.append(Call(
            rows=PackedRows(**part, block_pairs=pairs),
            index=index[mine],
            slot=slot[mine].astype(np.int64) - c * rows * segments,
        ))
    return calls, np.flatnonzero(call >= num_calls)


def chunked_calls(
    keys: np.ndarray,
    fetch: Callable[[np.ndarray], list[Sequence[int]]],
    layout: CallLayout,
    *,
    chunk: int = CHUNK,
) -> Iterator[list[Call]]:
    """The calls that embed every input, a chunk's worth at a time. Inputs are visited in
    decreasing `keys` (their lengths, or a proxy such as characters), `chunk` at a time;
    `fetch(positions)` gives their token ids, only when their chunk is packed. Each sequence goes
    to rows of its own row length; what a chunk leaves of a row length waits for the next."""
    order = np.argsort(-np.asarray(keys), kind="stable")
    waiting: dict[int, tuple[list[int], list[Sequence[int]]]] = {}  # by row length
    for start in range(0, len(order), chunk):
        index = order[start : start + chunk]
        for i, seq in zip(index, fetch(index)):
            positions, seqs = waiting.setdefault(layout.row_length(len(seq)), ([], []))
            positions.append(i)
            seqs.append(seq)
        last = start + chunk >= len(order)
        calls = []
        for length in sorted(waiting, reverse=True):
            positions, seqs = waiting.pop(length)
            done, left = pack_calls(seqs, np.asarray(positions), layout, last=last)
            calls += done
            if len(left):
                waiting[length] = ([positions[i] for i in left], [seqs[i] for i in left])
        if calls:
            yield calls


def overlapped(
    batches: Iterable[T], start: Callable[[T], U], finish: Callable[[U], None]
) -> None:
    """`start` each batch and `finish` it one batch later: JAX dispatch is asynchronous, so while
    the device works through batch k, the host produces batch k+1 (`batches` is lazy) and
    `finish` waits only for batch k-1."""
    running = None
    for batch in batches:
        started = start(batch)
        if running is not None:
            finish(running)
        running = started
    if running is not None:
        finish(running)
