"""The packed batch: the one contract between the data pipeline and the model/trainer.

Queries and passages of a step are packed, whole, into rows of `length` tokens. Each row holds up
to `S` sequences ("segments"). The model sees the rows (`PackedRows`: tokens, positions,
segment_ids, where to pool); the pooled embedding of segment `s` of row `r` lands at flat slot
`r * S + s`, and `query_slot` / `passage_slot` say which slot belongs to which query and passage.

Both are pytrees (arrays in, arrays out of `jax.jit`), and each field says how it is laid out
over devices: row fields are split over the data axes with the rows, slot fields are flat slot
indices (moved with their rows, then replicated), the rest is replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

Array = Any  # np.ndarray on the host, jax.Array on the devices
SLOTS = {"layout": "slots"}  # flat slot indices r * S + s
# Process p numbers its rows from p · 2²⁰ (`PackedRows.row_ids`): no process packs that many.
ROW_IDS_PER_PROCESS = 1 << 20


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class PackedRows:
    """What the model sees; every field is split over the data axes with the rows."""

    tokens: Array  # int32 [R, L]
    segment_ids: Array  # int32 [R, L]; 1..n within a row, 0 = padding
    positions: Array  # int32 [R, L]; restart at 0 in every segment, 0 on padding
    last_index: Array  # int32 [R, S]; column of segment s+1's last token (EOS), 0 if unused
    # int32 [groups, P, 3]: the block-sparse attention's tile list of each contiguous row group
    # (`model.block_sparse.block_pairs`); None: the dense mask.
    block_pairs: Array | None = None
    # int32 [R]: each row's id, which numbers it in its LoRA dropout masks, so that a row gets the
    # same masks wherever padding, data shards or gradient-cache chunks place it; None: its index.
    # Rows that `pad_batch` adds share the id -1 (nothing reads their outputs).
    row_ids: Array | None = None

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def max_segments(self) -> int:
        return int(self.last_index.shape[1])

    @property
    def segments_held(self) -> int:
        """The most sequences one row holds (its largest segment id); at most `max_segments`."""
        return int(self.segment_ids.max(initial=0))


ROW_FIELDS = tuple(f.name for f in dataclasses.fields(PackedRows))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class PackedBatch(PackedRows):
    """A step's packed rows and, per query, its passages and loss inputs."""

    query_slot: Array = dataclasses.field(metadata=SLOTS)  # int32 [B]; slot of each query
    # int32 [B, G]; each query's passages, the positive first
    passage_slot: Array = dataclasses.field(metadata=SLOTS)
    passage_mask: Array  # bool [B, G]; False where a group has fewer than G passages
    teacher_scores: Array  # float32 [B, G]; reranker scores, 0 where absent
    has_teacher: Array  # bool [B]; whether the query's group has teacher scores
    in_batch_negatives: Array  # bool []; False: each query is scored against its group only
    query_label: Array  # int32 [B]; -1 = none
    passage_label: Array  # int32 [B, G]; a passage with its query's label >= 0 is no negative

    def rows(self) -> PackedRows:
        return PackedRows(**{name: getattr(self, name) for name in ROW_FIELDS})

    def utilisation(self) -> float:
        """Real tokens / array slots."""
        return float((np.asarray(self.segment_ids) > 0).mean())

    def arrays(self) -> dict[str, Array]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
