"""The packed batch: the one contract between the data pipeline and the model/trainer.

Queries and passages of a step are packed, whole, into rows of `length` tokens. Each row holds up
to `S` sequences ("segments"). The model sees (tokens, positions, segment_ids); the pooled embedding
of segment `s` of row `r` lands at flat slot `r * S + s`, and `query_slot` / `passage_slot` say
which slot belongs to which query and passage.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    tokens: np.ndarray  # int32 [R, L]
    segment_ids: np.ndarray  # int32 [R, L]; 1..n within a row, 0 = padding
    positions: np.ndarray  # int32 [R, L]; restart at 0 in every segment, 0 on padding
    last_index: np.ndarray  # int32 [R, S]; column of segment s+1's last token (EOS), 0 if unused
    query_slot: np.ndarray  # int32 [B]; flat slot r*S+s of each query
    passage_slot: np.ndarray  # int32 [B, G]; each query's passages, the positive first
    passage_mask: np.ndarray  # bool [B, G]; False where a group has fewer than G passages
    teacher_scores: np.ndarray  # float32 [B, G]; reranker scores, 0 where absent
    has_teacher: np.ndarray  # bool [B]; whether the query's group has teacher scores
    in_batch_negatives: np.ndarray  # bool []; False: each query is scored against its group only
    query_label: np.ndarray  # int32 [B]; -1 = none
    passage_label: np.ndarray  # int32 [B, G]; a passage with its query's label >= 0 is no negative

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def max_segments(self) -> int:
        return int(self.last_index.shape[1])

    def utilisation(self) -> float:
        """Real tokens / array slots."""
        return float((self.segment_ids > 0).mean())

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
