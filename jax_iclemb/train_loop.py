"""The training loop: step numbers -> batches -> updates, with compiles ahead of need, logging,
checkpoints, periodic evaluation, signals and NaN checks."""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import queue
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from jax_iclemb import compile_cache, parallel, program_cache
from jax_iclemb import config as config_lib
from jax_iclemb.beir import EvalDataError, load_examples
from jax_iclemb.beir_eval import evaluate_beir
from jax_iclemb.checkpoint import Checkpointer, TrainState, abstract_like
from jax_iclemb.data.batch import PackedBatch
from jax_iclemb.data.pipeline import TrainPipeline
from jax_iclemb.embedder import Embedder, options_from_config
from jax_iclemb.errors import ReportedError
from jax_iclemb.observe import MetricsWriter, peak_flops, wandb_options
from jax_iclemb.retrieval import METRICS, MODES
from jax_iclemb.shape_plan import ShapePlan, compile_cost_tokens, plan_shapes
from jax_iclemb.step_batch import StepShape, device_batch, global_max, own_shape, pad_to_shape


class TrainingError(ReportedError):
    """The run cannot go on (a non-finite loss, out of device memory): the message says why and
    what was kept."""


def out_of_memory_message(
    error: Exception, step: int, shape: StepShape, saved: int | None, workdir: Path
) -> str:
    """What to say when a step runs out of device memory: where, XLA's own line, and what fits."""
    xla_line = str(error).strip().splitlines()[0][:400]
    kept = (
        f"the last checkpoint (step {saved}) is kept in {workdir / 'checkpoints'}"
        if saved is not None else "no checkpoint was saved"
    )
    return (
        f"the device ran out of memory at step {step} (step shape: {shape.describe()}); "
        f"{kept}. XLA said: {xla_line}\n"
        "To fit: fewer queries a step (data.batch_size), gradient-cache chunks "
        "(train.grad_cache_chunks), model.remat=full, or shorter rows (data.*_max_len). Where "
        "the allocator still had room (a CUDA graph or kernel launch out of memory), the GPU "
        "driver needs memory that JAX holds: XLA_PYTHON_CLIENT_PREALLOCATE=false or a lower "
        'XLA_PYTHON_CLIENT_MEM_FRACTION (docs/training.md, "On a GPU").'
    )


class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint after the current step and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum


# Steps past the current one whose batches a loop waiting for a compile may build, to find new
# shapes for idle compile workers (batches are small: token ids and their layout).
IDLE_LOOKAHEAD = 32


def compile_workers(configured: int) -> int:
    """Step shapes compiled at once: `configured`, or for 0 one per 4 host cores (1 to 4)."""
    return configured or min(4, max(1, (os.cpu_count() or 1) // 4))


class StepCompiler:
    """One gradient executable per step shape, compiled on `workers` background threads in the
    order the steps need them, so that compiling a shape that comes up overlaps the steps before
    it (and, with several workers, the other shapes' compiles: XLA compiles without the GIL).

    `grad_step` is the jitted `make_grad_fn` (params, frozen, batch, step); `arguments` its
    (params, frozen, step) as abstract arrays with their shardings, so that compiling can start
    before the weights exist. Each shape leaves a line in `notes` (what it is, compiled or loaded
    from the persistent cache, how long it took), for the loop to print from its own thread."""

    def __init__(
        self, grad_step: Any, arguments: tuple, workers: int = 1, context: str | None = None
    ):
        """`context`: the run's `program_cache.run_context`, under which its traced programs are
        kept across runs (None: none kept)."""
        self._grad_step, self._context, self.workers = grad_step, context, workers
        self._programs = compile_cache.programs_dir() if context is not None else None
        self._params, self._frozen, self._step = arguments
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile")
        # StepShape.key -> future of (executable, whether it came from the persistent cache)
        self._futures: dict[tuple[int, ...], concurrent.futures.Future] = {}
        self.notes: queue.SimpleQueue[str] = queue.SimpleQueue()

    @property
    def count(self) -> int:
        """Shapes compiled or being compiled."""
        return len(self._futures)

    @property
    def cache_hits(self) -> int:
        """Executables loaded from the persistent compilation cache so far."""
        return sum(f.result()[1] for f in self._futures.values() if f.done() and not f.exception())

    @property
    def idle(self) -> bool:
        """Whether a worker has nothing to compile."""
        return sum(not f.done() for f in self._futures.values()) < self.workers

    def submit(self, shape: StepShape, batch: PackedBatch) -> None:
        if shape.key not in self._futures:
            self._futures[shape.key] = self._pool.submit(
                self._compile, shape, abstract_like(batch), len(self._futures) + 1
            )

    def _compile(self, shape: StepShape, batch: PackedBatch, index: int) -> tuple[Any, bool]:
        t0, hits = time.perf_counter(), compile_cache.hits()
        args = (self._params, self._frozen, batch, self._step)
        lowered, kept = program_cache.lower(self._grad_step, args, self._programs, self._context)
        compiled = lowered.compile()
        cached = compile_cache.hits() > hits  # counted per thread: other workers' loads apart
        self.notes.put(
            f"step shape {index}: {shape.describe(jax.process_count())}; "
            f"{'loaded from the compilation cache' if cached else 'compiled'}"
            f"{' (its traced program too)' if kept else ''} in {time.perf_counter() - t0:.1f} s"
        )
        return compiled, cached

    def get(
        self, shape: StepShape, batch: PackedBatch, feed: Callable[[], bool]
    ) -> tuple[Any, float]:
        """The executable for `shape` and the seconds spent waiting for it. While waiting, `feed`
        is called whenever a worker is idle, to submit the shapes of steps further ahead; it
        returns False when it has none to offer."""
        self.submit(shape, batch)
        future = self._futures[shape.key]
        if future.done():
            return future.result()[0], 0.0
        t0 = time.perf_counter()
        while not future.done():
            if self.idle and feed():
                continue
            pending = [f for f in self._futures.values() if not f.done()]
            concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        return future.result()[0], time.perf_counter() - t0

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class TrainLoop:
    """Step numbers -> batches -> updates, with logging, checkpoints, signals and NaN checks.

    Each step runs at its own shape (`step_shape`: rows, tiles and queries on small ladders) or at
    a larger one that the run's shape plan merges it into (`plan_run`: short runs compile fewer
    shapes), one gradient executable per shape; the optimizer update is shape-free. The
    batches of the next `train.compile_ahead` steps are built while the device runs the current
    one, and their new shapes compile on background threads (`StepCompiler`); while the loop
    waits for one and a worker is idle, it looks up to `IDLE_LOOKAHEAD` steps ahead for more.
    Compiling can start before the model exists (`start_compiling`). JAX's persistent
    compilation cache keeps the executables across runs.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: Path,
        pipeline: TrainPipeline,
        mesh: jax.sharding.Mesh,
        grad_step: Any,  # the jitted train_step.make_grad_fn
        update: Callable,  # the jitted train_step.make_update
        *,
        flops_token: float,
        graphdef: nnx.GraphDef,
    ):
        self.config, self.workdir, self.pipeline, self.mesh = config, workdir, pipeline, mesh
        self.grad_step, self.update = grad_step, update
        self.flops_token, self.graphdef = flops_token, graphdef
        self._compiler: StepCompiler | None = None
        self._upcoming: collections.deque = collections.deque()  # (batch, shape, info) ahead
        self.plan = ShapePlan()  # every step at its own shape until `plan_run`
        self._sampled: dict[int, tuple] = {}  # step -> `_packed_step`, kept from the plan's sample
        self._start = self._built = self._steps = 0  # the batches of steps before _built exist
        self._ahead = max(1, int(config.train.compile_ahead))

    def _packed_step(self, step: int) -> tuple[dict, StepShape, dict[str, Any]]:
        """Step `step`'s packed batches with their tile lists, its own shape and its info."""
        if step in self._sampled:
            return self._sampled.pop(step)
        # With several processes, each packs at every row length its sequences fit, so that the
        # one collective in `own_shape` can settle on the shortest that fits all of them.
        packed, info = self.pipeline.batches(step, every_length=jax.process_count() > 1)
        with_tiles, shape = own_shape(
            packed, self.pipeline.row_lengths, self.config.model,
            groups=self.pipeline.row_multiple,  # data shards × gradient-cache chunks
        )
        return with_tiles, shape, info

    def next_batch(self, step: int) -> tuple[PackedBatch, StepShape, dict[str, Any]]:
        """Step `step`'s batch on the mesh, at its shape in the run's `plan`."""
        with_tiles, own, info = self._packed_step(step)
        shape = self.plan.cover(own)
        batch = pad_to_shape(
            with_tiles, shape, self.config.model,
            groups=self.pipeline.row_multiple,
            num_queries=self.pipeline.max_local_queries,
            pad_id=self.pipeline.tokenizer.pad_token_id or 0,
        )
        return device_batch(self.mesh, batch), shape, info

    def plan_run(self, start: int, steps: int) -> str | None:
        """Plan the shapes of a run of `steps` steps on its first `train.shape_plan_steps` (from
        step 0 whatever `start` is, so that a resumed run plans the same); keeps the sampled
        batches from `start` on for their steps. Returns a line for the log when the plan merges
        shapes."""
        train = self.config.train
        window = min(steps, int(train.shape_plan_steps))
        tokens = compile_cost_tokens(int(train.compile_cost_tokens), jax.default_backend())
        self.plan, self._sampled = ShapePlan(), {}
        if tokens <= 0 or window <= 1 or start >= steps:  # off, or nothing left to run
            return None
        sample = []
        for s in range(window):
            packed = self._packed_step(s)
            sample.append(packed[1])
            if s >= start:
                self._sampled[s] = packed
        # A shape's slots are this process's; its devices split the rows between them, side by
        # side on accelerators, while a CPU host's devices share its cores.
        devices = 1 if jax.default_backend() == "cpu" else max(
            1, parallel.data_parallel_size(self.mesh) // jax.process_count()
        )
        self.plan = plan_shapes(sample, steps, tokens * devices)
        merged = self.plan.merges(sample, jax.process_count())
        if merged is None:
            return None
        return (f"step shapes planned on the first {window} steps: {merged} "
                f"(train.compile_cost_tokens: a compile costs as much as {tokens} token slots)")

    def maybe_evaluate(
        self, state: TrainState, frozen: dict, writer: MetricsWriter, steps: int
    ) -> None:
        """Every `eval.every` steps and at the last: retrieval metrics of the current weights on
        `eval.data`, logged as {"step", "eval": {"<metric>/<zero|few>": value}}. Every process
        computes (the model is sharded); the writer is a no-op off process 0."""
        every, step = self.config.eval.every, int(state.step)
        if not every or (step % every and step != steps):
            return
        model = nnx.merge(self.graphdef, frozen, state.params)
        metrics = evaluate_model(model, self.pipeline.tokenizer, self.config, self.mesh)
        writer.write({"step": step, "eval": metrics})

    def start_compiling(self, arguments: tuple, start: int, steps: int) -> None:
        """Build the batches of the first steps from `start` and begin compiling their shapes
        for `arguments` ((params, frozen, step) as abstract arrays with their shardings): the
        weights need not exist yet, so that drawing or loading them overlaps the compiles. `run`
        goes on from here."""
        workers = compile_workers(int(self.config.train.compile_workers))
        self._compiler = StepCompiler(
            self.grad_step, arguments, workers,
            program_cache.run_context(self.config, self.graphdef),
        )
        self._start = self._built = start
        self._steps = steps
        self._upcoming.clear()
        planned = self.plan_run(start, steps)
        if planned:
            self._compiler.notes.put(planned)
        # The first steps' shapes are all queued before waiting on any, so that several
        # workers compile them side by side.
        self._prepare(start + self._ahead)
        while self._compiler.idle and self._feed(start):
            pass

    def _prepare(self, until: int) -> None:
        """Build the batches of the steps before `until`; queue their new shapes."""
        for s in range(self._built, min(until, self._steps)):
            self._upcoming.append(self.next_batch(s))
            self._compiler.submit(self._upcoming[-1][1], self._upcoming[-1][0])
        self._built = max(self._built, min(until, self._steps))

    def _feed(self, step: int) -> bool:
        """One more step's batch (and its shape, if new) for an idle compile worker, at most
        `IDLE_LOOKAHEAD` steps past `step`; whether there was one. Only in a single process:
        a batch's shape is agreed in a collective, which every process must reach together,
        and when a worker is idle differs between processes."""
        if jax.process_count() > 1 or self._built >= min(self._steps, step + IDLE_LOOKAHEAD):
            return False
        self._prepare(self._built + 1)
        return True

    def close(self) -> None:
        """Stop compiling: queued shapes are dropped, running compiles finish."""
        if self._compiler is not None:
            self._compiler.close()
            self._compiler = None

    def run(
        self, state: TrainState, frozen: dict, steps: int, ckpt: Checkpointer
    ) -> dict[str, Any]:
        config, workdir = self.config, self.workdir
        is_main = jax.process_index() == 0
        start = int(state.step)
        if self._compiler is None or (self._start, self._steps) != (start, steps):
            raise ValueError(
                f"run(state at step {start}, steps={steps}) needs start_compiling(..., {start}, "
                f"{steps}) first"
            )
        compiler = self._compiler
        stop = _StopFlag()
        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        writer = MetricsWriter(
            workdir, enabled=is_main, total=steps, initial=start, config=config_lib.to_json(config),
            wandb=wandb_options(config.log),
        )

        def print_notes() -> None:
            while not compiler.notes.empty():
                writer.note(compiler.notes.get())

        peak = peak_flops(jax.devices()[0]) * jax.device_count()
        history: list[float] = []
        totals = {"real_tokens": 0, "seconds": 0.0, "compile_seconds": 0.0}  # this run's steps
        reason = "finished"
        try:
            for step in range(start, steps):
                t0 = time.perf_counter()
                self._prepare(step + 1)
                batch, shape, info = self._upcoming.popleft()
                compiled, compile_seconds = compiler.get(
                    shape, batch, feed=lambda step=step: self._feed(step)
                )
                print_notes()
                try:
                    # Dispatched, not awaited:
                    (loss, metrics), grads = compiled(state.params, frozen, batch, state.step)
                    state, more = self.update(state, grads)
                    metrics = dict(metrics, loss=loss, **more)
                    # Host work while the device runs this step: the next steps' batches, whose
                    # new shapes compile in the background.
                    self._prepare(step + 1 + self._ahead)
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                except jax.errors.JaxRuntimeError as e:
                    if "RESOURCE_EXHAUSTED" in str(e):
                        raise TrainingError(
                            out_of_memory_message(e, step + 1, shape, ckpt.latest_step(), workdir)
                        ) from e
                    raise
                seconds = time.perf_counter() - t0
                if not all(math.isfinite(v) for v in metrics.values()):
                    raise TrainingError(
                        f"non-finite loss or gradient at step {step + 1} ({metrics}); stopping. "
                        f"The last good checkpoint (step {ckpt.latest_step()}) is kept in "
                        f"{workdir / 'checkpoints'}."
                    )
                history.append(metrics["loss"])
                totals["real_tokens"] += shape.real_tokens
                totals["seconds"] += seconds
                totals["compile_seconds"] += compile_seconds
                rows = shape.rows * jax.process_count()
                slots = rows * shape.length
                record = {
                    "step": step + 1,
                    **metrics,
                    "dataset": info["dataset"],
                    "tokens_per_s": shape.real_tokens / seconds,
                    "real_tokens": shape.real_tokens,
                    "slots": slots,
                    "utilisation": shape.real_tokens / slots,
                    "rows": rows,
                    "row_length": shape.length,
                    "row_padding": 1 - shape.rows_used / rows,
                    "tiles": shape.tiles,
                    "segments": shape.segments,
                    "step_seconds": seconds,  # wall time of the step, compiles included
                    "compile_seconds": compile_seconds,  # of which waiting for its executable
                    "compiles": compiler.count,  # step shapes so far (some still compiling)
                    "compile_cache_hits": compiler.cache_hits,
                }
                if peak:
                    record["mfu"] = record["tokens_per_s"] * self.flops_token / peak
                if (step + 1) % config.train.log_every == 0 or step + 1 == steps:
                    writer.write(record)
                writer.advance(record)
                ckpt.save(state)
                self.maybe_evaluate(state, frozen, writer, steps)
                # The final save is collective: every process must leave at the same step, even
                # when only some of them were signalled.
                if global_max(int(stop.signal is not None)):
                    reason = f"stopped by signal {stop.signal or 'on another process'}"
                    break
            ckpt.save(state, force=True)
        finally:
            self.close()
            ckpt.wait()
            print_notes()
            writer.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if reason != "finished":  # every process says so in its own log
            print(f"{reason}: saved step {int(state.step)} in {workdir}", file=sys.stderr)
        saved = ckpt.latest_step()
        return {
            "reason": reason,
            "step": int(state.step),
            "steps": steps,
            "losses": history,
            **totals,
            "checkpoint_step": saved,
        }


def evaluate_model(
    model: nnx.Module, tokenizer: Any, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> dict[str, float]:
    """The `eval.*` evaluation of a model during training: {"<metric>/<zero|few>": value}.

    The model is used as it is (the current weights, no checkpoint round trip), with the run's
    sequence lengths and pooling.
    """
    if not config.eval.data:
        raise EvalDataError("eval.every is set but eval.data (a BEIR folder) is empty")
    embedder = Embedder(model, tokenizer, mesh=mesh, progress=False, **options_from_config(config))
    examples = load_examples(config.eval.examples) if config.eval.examples else []
    instruction = config.eval.instruction or config.data.default_prompt
    result = evaluate_beir(embedder, config.eval.data, instruction=instruction, examples=examples)
    return {
        f"{name}/{mode}": result[mode][name]
        for mode, _ in MODES
        if mode in result
        for name, *_ in METRICS
    }
