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

Key = tuple[int, int, int, int]  # `StepShape.key`: (rows, row length, tiles, segment slots)

# What a compile costs, in token slots of step compute on one accelerator or CPU host, for
# `train.compile_cost_tokens=-1`. On 2 CPU cores (two CPU devices) the comparison work of
# docs/benchmarks.md compiles a shape in 5-6 s and computes a slot in ~0.19 ms: ~30k slots. On an
# H200 a shape took 3.7-5.2 s against ~10 us a slot (~400k); a third of that leaves room for
# larger models.
PLATFORM_COMPILE_COST_TOKENS = {"cpu": 32_768}
ACCELERATOR_COMPILE_COST_TOKENS = 131_072


def compile_cost_tokens(configured: int, platform: str) -> int:
    """`train.compile_cost_tokens`, with -1 resolved for `platform` (`jax.default_backend()`)."""
    if configured >= 0:
        return configured
    return PLATFORM_COMPILE_COST_TOKENS.get(platform, ACCELERATOR_COMPILE_COST_TOKENS)


@dataclasses.dataclass(frozen=True)
class ShapePlan:
    """The shapes steps run at: a step runs at the cheapest target that holds its own shape
    (same row length, at least its rows, tiles and segment slots), or at its own shape when none
    does."""

    targets: tuple[Key, ...] = ()  # cheapest first

    def cover(self, shape: StepShape) -> StepShape:
        for rows, length, tiles, segments in self.targets:
            if (length == shape.length and rows >= shape.rows and tiles >= shape.tiles
                    and segments >= shape.segments):
                return dataclasses.replace(shape, rows=rows, tiles=tiles, segments=segments)
        return shape

    def merges(self, sample: Sequence[StepShape], processes: int) -> str | None:
        """What the plan does to `sample` (shapes, share of the token slots used), or None when
        it runs every sampled step at its own shape."""
        planned = [self.cover(s) for s in sample]
        before, after = ({s.key for s in shapes} for shapes in (sample, planned))
        if len(after) == len(before):
            return None
        real = sum(s.real_tokens for s in sample)  # over all processes; rows are per process
        used = [real / (processes * sum(_slots(s.key) for s in shapes))
                for shapes in (sample, planned)]
        return (f"their {len(before)} shapes run as {len(after)}, {used[0]:.1%} -> {used[1]:.1%} "
                "of the token slots used")


def _slots(key: Key) -> int:
    return key[0] * key[1]


def plan_shapes(sample: Sequence[StepShape], run_steps: int, compile_slots: float) -> ShapePlan:
    """The targets that minimise `compile_slots` × (number of shapes) + the token slots the run
    computes, the sample's taken `run_steps / len(sample)` times: a compile is taken to cost as
    much time as computing `compile_slots` token slots (rows × row length, per process).

    `sample`: the own shapes of the run's first steps. Shapes of one row length, sorted by rows,
    tiles and segment slots, are split into consecutive groups (dynamic programming over the
    split points), each run at its largest rows, tiles and segment slots; shapes of different row
    lengths never merge (a batch is packed for its length). Segment slots are not counted as
    cost: only the last layer computes at them, a few columns of each row. `compile_slots` 0
    keeps every shape."""
    if compile_slots <= 0 or not sample:
        return ShapePlan()
    counts = collections.Counter(s.key for s in sample)
    repeats = max(1.0, run_steps / len(sample))  # each sampled step stands for this many
    targets = []
    for length in sorted({k[1] for k in counts}):
        keys = sorted(k for k in counts if k[1] == length)  # by rows, tiles, segment slots
        # best[j]: the cheapest grouping of keys[:j]; choice[j]: where its last group starts.
        best, choice = [0.0] + [float("inf")] * len(keys), [0] * (len(keys) + 1)
        for j in range(1, len(keys) + 1):
            steps = 0
            for i in range(j, 0, -1):  # the last group is keys[i-1:j]
                steps += counts[keys[i - 1]]
                cost = best[i - 1] + compile_slots + repeats * steps * _slots(keys[j - 1])
                if cost < best[j]:
                    best[j], choice[j] = cost, i - 1
        j = len(keys)
        while j:
            group = keys[choice[j]:j]
            targets.append((group[-1][0], length, max(k[2] for k in group),
                            max(k[3] for k in group)))
            j = choice[j]
    return ShapePlan(tuple(sorted(targets, key=lambda k: (_slots(k), k[2]))))
