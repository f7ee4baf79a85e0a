"""A step's packed batch onto the mesh, at a shape from a small ladder.

Each step has its own shape (`StepShape`: the row length, the shortest of the pipeline's
`row_lengths` that holds every sequence; rows on `packing.row_bucket`'s ladder; attention tiles
by `block_sparse.padded_tiles`; segment slots per row by `packing.segment_bucket`; queries
padded to the pipeline's maximum), agreed by all processes in one collective, and a function of
the step's own batches only. It runs at that shape or at a larger one of the run's shape plan
(shape_plan.py), so that a resumed run computes exactly what an uninterrupted one does. Each
field of the batch lands where its `PackedBatch` declaration says: rows split over the data
axes, the rest replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jax_iclemb import parallel
from jax_iclemb.data.batch import ROW_FIELDS, SLOTS, PackedBatch
from jax_iclemb.data.packing import pad_batch, segment_bucket
from jax_iclemb.model.block_sparse import block_pairs, most_tiles, pad_pairs, padded_tiles


def attention_tiles(
    model: ml_collections.ConfigDict, batch: PackedBatch, groups: int
) -> np.ndarray | None:
    """The block-sparse attention's tile lists of the batch's rows, one per contiguous row group
    (`block_sparse.block_pairs`), not yet padded; None unless `model.attention_impl` is
    "block_sparse"."""
    if model.attention_impl != "block_sparse":
        return None
    return block_pairs(
        batch.segment_ids, block=model.attention_block, causal=model.attention == "causal",
        groups=groups,
    )


def gather_counts(values: Sequence[int]) -> np.ndarray:
    """int64 [processes, len(values)]: every process's `values`, in one collective."""
    local = np.asarray(values, np.int64)[None]
    if jax.process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def global_max(value: int) -> int:
    """The largest `value` over all processes."""
    return int(gather_counts([value]).max())


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What a step computes, agreed by all processes: its shape decides its executable."""

    rows: int  # packed rows per process
    length: int  # tokens per row
    tiles: int  # block-sparse tiles per row group (0: dense attention)
    segments: int  # segment slots per row: where the last layer computes (`segment_bucket`)
    real_tokens: int  # over all processes
    rows_used: int  # rows holding a token, over all processes (before the ladder)

    @property
    def key(self) -> tuple[int, int, int, int]:
        return self.rows, self.length, self.tiles, self.segments

    def describe(self, processes: int = 1) -> str:
        """The shape for a log line; `processes`: count the rows of that many."""
        return (f"{self.rows * processes} rows x {self.length} tokens, {self.tiles} attention "
                f"tiles per row group, {self.segments} segment slots per row")


def step_shape(
    packed: Mapping[int, tuple[PackedBatch, np.ndarray | None]],
    row_lengths: Sequence[int],
    groups: int,
    model: ml_collections.ConfigDict,
) -> StepShape:
    """The step's shape: its row length, the shortest of `row_lengths` at which every process
    packed its part (`packed`: {row length: (batch, tile lists)}); rows per group as packed there
    (already on `row_bucket`'s ladder), tile lists padded by `padded_tiles`
    (`model.attention_tile_rungs`) and the segment slots of `segment_bucket`, each the largest
    over processes. One collective."""
    counts = []  # per row length: rows per group, tiles, used rows, sequences in the fullest row
    for length in row_lengths:
        batch, tile_lists = packed.get(length, (None, None))
        if batch is None:
            counts += [-1] * 4  # not packed at this length: too short for a sequence
            continue
        tiles = 0 if tile_lists is None else tile_lists.shape[1]
        used = int((batch.segment_ids > 0).any(axis=1).sum())
        counts += [batch.num_rows // groups, tiles, used, batch.segments_held]
    real = int((next(iter(packed.values()))[0].segment_ids > 0).sum())  # any length: the same
    gathered = gather_counts([*counts, real])
    per_length = gathered[:, :-1].reshape(len(gathered), len(row_lengths), 4)
    everywhere = np.flatnonzero((per_length[:, :, 0] >= 0).all(axis=0))
    if not everywhere.size:
        raise ValueError(f"no row length of {list(row_lengths)} holds every process's sequences")
    i = int(everywhere[-1])  # row_lengths is longest first
    length = row_lengths[i]
    per_group, count, _, held = (int(x) for x in per_length[:, i].max(axis=0))
    tiles = 0
    if packed[length][1] is not None:
        most = most_tiles(per_group, length, block=model.attention_block,
                          causal=model.attention == "causal")
        tiles = padded_tiles(count, most, model.attention_tile_rungs)
    return StepShape(
        rows=per_group * groups,
        length=length,
        tiles=tiles,
        segments=segment_bucket(held, packed[length][0].max_segments),
        real_tokens=int(gathered[:, -1].sum()),
        rows_used=int(per_length[:, i, 2].sum()),
    )


def own_shape(
    packed: Mapping[int, PackedBatch],
    row_lengths: Sequence[int],
    model: ml_collections.ConfigDict,
    groups: int,
) -> tuple[dict[int, tuple[PackedBatch, np.ndarray | None]], StepShape]:
    """This process's packed batches with their attention tile lists, and the step's own shape
    (`step_shape`; one collective).

    `packed`: {row length: this process's batch packed at it}, at least at the shortest of
    `row_lengths` that holds its sequences; with several processes at every longer one too, so
    that each has the length all agree on. `groups`: one row group per data shard and
    gradient-cache chunk, each with its own tile list."""
    with_tiles = {n: (b, attention_tiles(model, b, groups)) for n, b in packed.items()}
    return with_tiles, step_shape(with_tiles, row_lengths, groups, model)


def pad_to_shape(
    with_tiles: Mapping[int, tuple[PackedBatch, np.ndarray | None]],
    shape: StepShape,
    model: ml_collections.ConfigDict,
    *,
    groups: int,
    num_queries: int,
    pad_id: int,
) -> PackedBatch:
    """This process's part of the step at `shape` (its own shape or a larger one of its row
    length), with its tile lists."""
    batch, tile_lists = with_tiles[shape.length]
    batch = pad_batch(batch, num_rows=shape.rows, num_queries=num_queries,
                      num_segments=shape.segments, pad_id=pad_id, groups=groups)
    if tile_lists is not None:
        tile_lists = pad_pairs(tile_lists, shape.tiles, shape.length // model.attention_block)
    return dataclasses.replace(batch, block_pairs=tile_lists)


def device_batch(mesh: jax.sharding.Mesh, batch: PackedBatch) -> PackedBatch:
    """This host's packed rows (and their attention tile lists) -> global arrays on the mesh.

    Row fields are split over the data axes; each host contributes its own rows
    (`make_array_from_process_local_data`), which land where its devices' shards are: one block
    or several, depending on the mesh's device order. The small per-query arrays are gathered to
    every host and replicated, with slot indices moved to the global rows their local rows became
    (`parallel.process_rows`). The batch must already have the same shape on every host
    (`pad_batch`).
    """
    global_shape = (batch.num_rows * jax.process_count(), batch.tokens.shape[1])
    rows = parallel.process_rows(
        parallel.named_sharding(mesh, ("batch", None), global_shape), global_shape
    )
    if len(rows) != batch.num_rows:
        raise ValueError(
            f"this process's devices hold {len(rows)} of the step's {global_shape[0]} rows, but "
            f"it packed {batch.num_rows}: the mesh's data axes must split the rows evenly over "
            f"processes (mesh {dict(mesh.shape)})"
        )
    out = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if value is None:
            out[field.name] = None
        elif field.name in ROW_FIELDS:
            spec = ("batch",) + (None,) * (value.ndim - 1)
            shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
            sharding = parallel.named_sharding(mesh, spec, shape)
            out[field.name] = jax.make_array_from_process_local_data(sharding, value, shape)
        else:
            if field.metadata == SLOTS:
                row, segment = np.divmod(value, batch.max_segments)
                value = (rows[row] * batch.max_segments + segment).astype(value.dtype)
            if jax.process_count() > 1 and value.ndim:
                value = multihost_utils.process_allgather(value, tiled=True)
            out[field.name] = jax.device_put(
                value, parallel.named_sharding(mesh, (None,) * value.ndim)
            )
    return PackedBatch(**out)
