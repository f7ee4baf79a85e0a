"""The trainer's compile queue: shapes compile in the order steps need them, and a loop waiting
for one gives idle workers the shapes of steps further ahead (on a GPU host several workers
compile a cold run's shapes side by side)."""

import threading

import jax
import jax.numpy as jnp
import pytest
from conftest import TINY_OVERRIDES
from test_train import REPO

from jax_iclemb import parallel
from jax_iclemb.config import load_config
from jax_iclemb.data.builtin import builtin_data_dir
from jax_iclemb.data.pipeline import pipeline_from_config
from jax_iclemb.step_batch import StepShape
from jax_iclemb.train_loop import IDLE_LOOKAHEAD, StepCompiler, TrainLoop


class HeldCompiles:
    """A stand-in for the jitted gradient step whose compiles finish only when released: each
    lowering's `compile()` waits for its own event. `lowered` lists the batches, in order."""

    def __init__(self):
        self.lowered, self.release, self.released = [], [], False

    def lower(self, params, frozen, batch, step):
        event = threading.Event()
        self.lowered.append(batch)
        self.release.append(event)
        if self.released:  # after the append: release_all sets the flag, then the events
            event.set()
        return self._Lowered(event, len(self.lowered))

    class _Lowered:
        def __init__(self, event, index):
            self.event, self.index = event, index

        def compile(self):
            assert self.event.wait(timeout=60), "never released"
            return f"executable {self.index}"

    def release_all(self):
        self.released = True
        for event in self.release:
            event.set()


def shape(rows: int) -> StepShape:
    return StepShape(rows=rows, length=64, tiles=0, segments=8, real_tokens=rows * 64,
                     rows_used=rows)


ARGS = (jnp.zeros(2), jnp.zeros(2), jnp.zeros((), jnp.int32))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_waiting_get_feeds_idle_workers_only(workers):
    grad = HeldCompiles()
    compiler = StepCompiler(grad, ARGS, workers)
    calls = []

    def feed():
        calls.append(len(calls))
        if len(calls) == 2:
            grad.release_all()  # the awaited compile ends while the loop looks ahead
        return len(calls) < 3

    if workers == 1:  # never idle while it compiles the awaited shape: released from outside
        threading.Timer(0.5, grad.release_all).start()
    try:
        executable, waited = compiler.get(shape(4), jnp.zeros((4, 64)), feed)
        assert executable == "executable 1" and waited > 0
        assert (len(calls) >= 2) if workers == 2 else calls == []
        again, waited = compiler.get(shape(4), jnp.zeros((4, 64)), feed)
        assert again == "executable 1" and waited == 0.0 and compiler.count == 1
        assert compiler.notes.get_nowait().startswith("step shape 1: 4 rows x 64 tokens")
    finally:
        grad.release_all()
        compiler.close()


def steps_of(loop: TrainLoop) -> list[int]:
    return [info["step"] for _, _, info in loop._upcoming]


@pytest.mark.parametrize("workers", [1, 2])
def test_start_compiling_looks_ahead_only_for_idle_workers(workers):
    """One step ahead (`compile_ahead=1`): one worker compiles the first step's shape and the
    loop builds nothing more; with two, it builds batches until a second shape is compiling.
    Every step at its own shape (no shape plan), so that the next shapes differ."""
    config = load_config(
        REPO / "configs" / "tiny.py",
        [*TINY_OVERRIDES, f"--config.data.path={builtin_data_dir()}",
         "--config.train.compile_ahead=1", f"--config.train.compile_workers={workers}",
         "--config.train.compile_cost_tokens=0"],
    )
    pipeline = pipeline_from_config(config)
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    grad = HeldCompiles()
    loop = TrainLoop(config, REPO, pipeline, mesh, grad, None, flops_token=0.0, graphdef=None)
    try:
        loop.start_compiling(ARGS, start=3, steps=100)
        built = steps_of(loop)
        assert built[0] == 3
        if workers == 1:
            assert built == [3] and loop._compiler.count == 1
        else:
            # Steps 3.. up to the first whose shape differs from step 3's: two compiling.
            assert loop._compiler.count == 2 and 2 <= len(built) <= IDLE_LOOKAHEAD + 1
            shapes = [loop.next_batch(s)[1].key for s in built]
            assert len(set(shapes[:-1])) == 1 and shapes[-1] != shapes[0]
    finally:
        grad.release_all()
        loop.close()
