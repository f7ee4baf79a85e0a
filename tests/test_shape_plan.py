"""The shape plan (jax_iclemb/shape_plan.py) against an exhaustive search: on samples whose tiles
grow with their rows (as a batch's tile count does), no grouping of the shapes costs less than the
plan's, counted by a direct formula; every step runs at a shape that holds its own."""

import itertools
import random

import pytest

from jax_iclemb.shape_plan import ShapePlan, compile_cost_tokens, plan_shapes
from jax_iclemb.step_batch import StepShape


def shape(rows: int, length: int = 256, tiles: int | None = None, segments: int = 16) -> StepShape:
    return StepShape(rows=rows, length=length, tiles=10 * rows if tiles is None else tiles,
                     segments=segments, real_tokens=rows * length // 2, rows_used=rows)


def cost(steps, repeats, compile_slots, run_at) -> float:
    """compile_slots per distinct shape the steps run at (`run_at(shape)`) + their token slots,
    `repeats` times over."""
    at = [run_at(s) for s in steps]
    return compile_slots * len({s.key for s in at}) + repeats * sum(s.rows * s.length for s in at)


def partitions(items):
    """Every way to split `items` into groups."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for smaller in partitions(rest):
        yield [[first], *smaller]
        for i in range(len(smaller)):
            yield [*smaller[:i], [first, *smaller[i]], *smaller[i + 1:]]


def best_grouping(sample, repeats, compile_slots) -> float:
    """The cheapest split of each row length's shapes into groups, over every partition, each
    group run at its largest rows, tiles and segment slots."""
    total = 0.0
    for length in {s.length for s in sample}:
        steps = [s for s in sample if s.length == length]
        choices = []
        for groups in partitions(sorted({s.key for s in steps})):
            target = {k: (max(g)[0], max(x[2] for x in g), max(x[3] for x in g))
                      for g in groups for k in g}
            choices.append(cost(
                steps, repeats, compile_slots,
                lambda s, t=target: shape(t[s.key][0], s.length, *t[s.key][1:]),
            ))
        total += min(choices)
    return total


@pytest.mark.parametrize("seed", range(12))
def test_no_grouping_costs_less_than_the_plan(seed):
    rng = random.Random(seed)
    lengths = [256] if seed % 2 else [128, 256]
    # Segment slots follow the rows loosely (not monotonically), as a row's fill varies; one
    # value per row count keeps the exhaustive search small.
    sample = [shape(r, rng.choice(lengths), segments=8 << (r % 3))
              for r in rng.choices([2, 3, 4, 6, 7, 8, 10, 12], k=rng.randint(8, 40))]
    run_steps = rng.choice([len(sample), 3 * len(sample), 100])
    compile_slots = rng.choice([256, 1024, 4096, 16384])
    plan = plan_shapes(sample, run_steps, compile_slots)
    repeats = max(1.0, run_steps / len(sample))
    planned = cost(sample, repeats, compile_slots, plan.cover)
    assert planned == pytest.approx(best_grouping(sample, repeats, compile_slots))
    for s in sample:  # each step runs at a shape that holds its own
        t = plan.cover(s)
        assert (t.length, t.real_tokens, t.rows_used) == (s.length, s.real_tokens, s.rows_used)
        assert t.rows >= s.rows and t.tiles >= s.tiles and t.segments >= s.segments


def test_a_short_run_merges_and_a_long_one_keeps_every_shape():
    # The built-in comparison work's first 30 steps (rows of 256 tokens, 10 tiles a row).
    rows = [7, 6, 7, 8, 7, 3, 2, 4, 4, 6, 10, 6, 3, 7, 6, 3, 4, 3, 3, 6, 8, 4, 6, 4, 6, 7, 6,
            3, 3, 6]
    sample = [shape(r) for r in rows]
    short = plan_shapes(sample, run_steps=30, compile_slots=16384)
    assert 1 < len({short.cover(s).key for s in sample}) < len(set(rows))
    # Ten thousand steps: the padding is paid 333 times over, a compile once.
    long = plan_shapes(sample, run_steps=10_000, compile_slots=16384)
    assert all(long.cover(s) == s for s in sample)
    assert all(plan_shapes(sample, 30, 0).cover(s) == s for s in sample)  # 0: planning off


def test_the_platform_default_and_a_configured_cost():
    assert compile_cost_tokens(-1, "cpu") == 32768
    assert compile_cost_tokens(-1, "gpu") == compile_cost_tokens(-1, "tpu") == 131072
    assert compile_cost_tokens(0, "gpu") == 0 and compile_cost_tokens(5000, "cpu") == 5000


def test_a_shape_no_target_holds_runs_as_it_is():
    plan = ShapePlan(targets=((6, 256, 60, 16), (10, 256, 100, 32)))
    assert plan.cover(shape(4)).key == (6, 256, 60, 16)
    assert plan.cover(shape(8)).key == (10, 256, 100, 32)
    assert plan.cover(shape(12)) == shape(12)  # larger than every target
    assert plan.cover(shape(4, length=128)) == shape(4, length=128)  # another row length
    assert plan.cover(shape(5, tiles=70)).key == (10, 256, 100, 32)  # too many tiles for (6, 60)
    assert plan.cover(shape(5, segments=32)).key == (10, 256, 100, 32)  # too many segments


def test_the_log_line_counts_shapes_and_the_slots_used():
    plan = ShapePlan(targets=((6, 256, 60, 16),))
    sample = [shape(4), shape(6), shape(6)]  # real tokens: half of each one's slots
    # 2,048 real tokens in 16 rows of 256, then in 18 (the 4-row step runs at 6).
    assert plan.merges(sample, processes=1) == (
        "their 2 shapes run as 1, 50.0% -> 44.4% of the token slots used"
    )
    # Rows are per process, real tokens over all: two processes compute twice the slots.
    assert plan.merges(sample, processes=2) == (
        "their 2 shapes run as 1, 25.0% -> 22.2% of the token slots used"
    )
    assert ShapePlan().merges(sample, processes=1) is None


def test_shapes_that_differ_in_segment_slots_alone_merge_at_the_most():
    # Only the last layer computes at the segment slots: no padding counted, a compile saved.
    sample = [shape(4, segments=8), shape(4, segments=32), shape(4, segments=16)]
    plan = plan_shapes(sample, run_steps=10_000, compile_slots=1)
    assert {plan.cover(s).key for s in sample} == {(4, 256, 40, 32)}


def test_partitions_counts_every_grouping():
    assert [sum(1 for _ in partitions(list(range(n)))) for n in range(6)] == [1, 1, 2, 5, 15, 52]
    assert all(sorted(itertools.chain(*p)) == [0, 1, 2] for p in partitions([0, 1, 2]))
