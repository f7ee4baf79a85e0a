"""Fewer step shapes for short runs: ladder shapes merge when the compiles they save outweigh the
padding they add.

Each step runs at a shape from small ladders (`step_batch.step_shape`), and each new shape costs a
compile. Over a long run a compile is paid once and a step's padding at every step, so each step
keeps its own shape; over a short one (tens of steps, an empty compilation cache) the compiles
are most of the wall. `plan_shapes` weighs the two on the run's first steps, a sample that is a
function of the config and the data only: a resumed run plans the same shapes, and computes
exactly what an uninterrupted one does.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

from jax_iclemb.step_batch import StepShape

Key = tuple[int, int, int]  # `StepShape.key`: (rows, row length, attention tiles)


@dataclasses.dataclass(frozen=True)
class ShapePlan:
    """The shapes steps run at: a step runs at the cheapest target that holds its own shape
    (same row length, at least its rows and tiles), or at its own shape when none does."""

    targets: tuple[Key, ...] = ()  # cheapest first

    def cover(self, shape: StepShape) -> StepShape:
        for rows, length, tiles in self.targets:
            if length == shape.length and rows >= shape.rows and tiles >= shape.tiles:
                return dataclasses.replace(shape, rows=rows, tiles=tiles)
        return shape


def _slots(key: Key) -> int:
    return key[0] * key[1]


def plan_shapes(sample: Sequence[StepShape], run_steps: int, compile_steps: float) -> ShapePlan:
    """The targets that minimise `compile_steps` × (number of shapes) + the run's computed token
    slots, in units of the sample's mean step, with the sample's padding taken `run_steps /
    len(sample)` times.

    `sample`: the own shapes of the run's first steps. Shapes of one row length, sorted by rows
    then tiles, are split into consecutive groups (dynamic programming over the split points),
    each run at its largest rows and tiles; shapes of different row lengths never merge (a batch
    is packed for its length). `compile_steps` 0 keeps every shape."""
    if compile_steps <= 0 or not sample:
        return ShapePlan()
    counts = collections.Counter(s.key for s in sample)
    unit = sum(_slots(s.key) for s in sample) / len(sample)
    weight = max(1.0, run_steps / len(sample)) / unit  # per sampled step, per computed slot
    targets = []
    for length in sorted({k[1] for k in counts}):
        keys = sorted(k for k in counts if k[1] == length)  # by rows, then tiles
        # best[j]: the cheapest grouping of keys[:j]; choice[j]: where its last group starts.
        best, choice = [0.0] + [float("inf")] * len(keys), [0] * (len(keys) + 1)
        for j in range(1, len(keys) + 1):
            steps = 0
            for i in range(j, 0, -1):  # the last group is keys[i-1:j]
                steps += counts[keys[i - 1]]
                cost = best[i - 1] + compile_steps + weight * steps * _slots(keys[j - 1])
                if cost < best[j]:
                    best[j], choice[j] = cost, i - 1
        j = len(keys)
        while j:
            group = keys[choice[j]:j]
            targets.append((group[-1][0], length, max(k[2] for k in group)))
            j = choice[j]
    return ShapePlan(tuple(sorted(targets, key=lambda k: (_slots(k), k[2]))))
