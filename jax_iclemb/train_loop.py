"""The training loop: step numbers -> batches -> updates, with compiles ahead of need, logging,
checkpoints, periodic evaluation, signals and NaN checks."""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from jax_iclemb import compile_cache, program_cache
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
from jax_iclemb.step_batch import StepShape, device_batch, global_max, shape_batch


class TrainingError(ReportedError):
    """The run cannot go on (a non-finite loss): the message says why and what was kept."""


class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint after the current step and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum



def compile_workers(configured: int) -> int:
    """Step shapes compiled at once: `configured`, or for 0 one per 4 host cores (1 to 4)."""
    return configured or min(4, max(1, (os.cpu_count() or 1) // 4))


class StepCompiler:
    """One gradient executable per step shape, compiled on `workers` background threads in the
    order the steps need them, so that compiling a shape that comes up overlaps the steps before
    it (and, with several workers, the other shapes' compiles: XLA compiles without the GIL).

    `grad_step` is the jitted `make_grad_fn` (params, frozen, batch, step). `note` gets a line per
    shape (what it is, compiled or loaded from the persistent cache, how long it took)."""

    def __init__(
        self, grad_step: Any, state: TrainState, frozen: dict, note: Callable, workers: int = 1,
        context: str | None = None,
    ):
        """`context`: the run's `program_cache.run_context`, under which its traced programs are
        kept across runs (None: none kept)."""
        self._grad_step, self._note, self._context = grad_step, note, context
        self._programs = compile_cache.programs_dir() if context is not None else None
        self._params, self._frozen, self._step = abstract_like((state.params, frozen, state.step))
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile")
        # shape key -> future of (executable, whether it came from the persistent cache)
        self._futures: dict[tuple[int, int, int], concurrent.futures.Future] = {}

    @property
    def count(self) -> int:
        """Shapes compiled or being compiled."""
        return len(self._futures)

    @property
    def cache_hits(self) -> int:
        """Executables loaded from the persistent compilation cache so far."""
        return sum(f.result()[1] for f in self._futures.values() if f.done() and not f.exception())

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
        self._note(
            f"step shape {index}: {shape.rows * jax.process_count()} rows x {shape.length} "
            f"tokens, {shape.tiles} attention tiles per row group; "
            f"{'loaded from the compilation cache' if cached else 'compiled'}"
            f"{' (its traced program too)' if kept else ''} in {time.perf_counter() - t0:.1f} s"
        )
        return compiled, cached

    def get(self, shape: StepShape, batch: PackedBatch) -> tuple[Any, float]:
        """The executable for `shape` and the seconds spent waiting for it."""
        self.submit(shape, batch)
        future = self._futures[shape.key]
        if future.done():
            return future.result()[0], 0.0
        t0 = time.perf_counter()
        compiled, _ = future.result()
        return compiled, time.perf_counter() - t0

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class TrainLoop:
    """Step numbers -> batches -> updates, with logging, checkpoints, signals and NaN checks.

    Each step runs at its own shape (`step_shape`: rows, tiles and queries on small ladders), one
    gradient executable per shape; the optimizer update is shape-free (one for the run). The
    batches of the next `train.compile_ahead` steps are built while the device runs the current
    one, and their new shapes compile on a background thread (`StepCompiler`); JAX's persistent
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
        ckpt: Checkpointer,
        *,
        flops_token: float,
        graphdef: nnx.GraphDef,
    ):
        self.config, self.workdir, self.pipeline, self.mesh = config, workdir, pipeline, mesh
        self.grad_step, self.update, self.ckpt = grad_step, update, ckpt
        self.flops_token, self.graphdef = flops_token, graphdef

    def next_batch(self, step: int) -> tuple[PackedBatch, StepShape, dict[str, Any]]:
        """Step `step`'s batch on the mesh, at its step shape."""
        # With several processes, each packs at every row length its sequences fit, so that the
        # one collective in `shape_batch` can settle on the shortest that fits all of them.
        packed, info = self.pipeline.batches(step, every_length=jax.process_count() > 1)
        batch, shape = shape_batch(
            packed,
            self.pipeline.row_lengths,
            self.config.model,
            groups=self.pipeline.row_multiple,  # data shards × gradient-cache chunks
            num_queries=self.pipeline.max_local_queries,
            pad_id=self.pipeline.tokenizer.pad_token_id or 0,
        )
        return device_batch(self.mesh, batch), shape, info

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

    def run(self, state: TrainState, frozen: dict, steps: int) -> dict[str, Any]:
        config, workdir = self.config, self.workdir
        is_main = jax.process_index() == 0
        start = int(state.step)
        stop = _StopFlag()
        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        writer = MetricsWriter(
            workdir, enabled=is_main, total=steps, initial=start, config=config_lib.to_json(config),
            wandb=wandb_options(config.log),
        )
        peak = peak_flops(jax.devices()[0]) * jax.device_count()
        history: list[float] = []
        totals = {"real_tokens": 0, "seconds": 0.0, "compile_seconds": 0.0}  # this run's steps
        reason = "finished"
        workers = compile_workers(int(config.train.compile_workers))
        compiler = StepCompiler(
            self.grad_step, state, frozen, writer.note, workers,
            program_cache.run_context(config, self.graphdef),
        )
        upcoming: collections.deque = collections.deque()  # (batch, shape, info) of next steps
        ahead = max(1, int(config.train.compile_ahead))

        built = start  # the batches of the steps before `built` exist

        def prepare(until: int) -> None:
            """Build the batches of the steps before `until`; queue their new shapes."""
            nonlocal built
            for s in range(built, min(until, steps)):
                upcoming.append(self.next_batch(s))
                compiler.submit(upcoming[-1][1], upcoming[-1][0])
            built = max(built, min(until, steps))

        try:
            # The first steps' shapes are all queued before waiting on any, so that several
            # workers compile them side by side.
            prepare(start + ahead)
            for step in range(start, steps):
                t0 = time.perf_counter()
                prepare(step + 1)
                batch, shape, info = upcoming.popleft()
                compiled, compile_seconds = compiler.get(shape, batch)
                # Dispatched, not awaited:
                (loss, metrics), grads = compiled(state.params, frozen, batch, state.step)
                state, more = self.update(state, grads)
                metrics = dict(metrics, loss=loss, **more)
                # Host work while the device runs this step: the next steps' batches, whose
                # new shapes compile in the background.
                prepare(step + 1 + ahead)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                seconds = time.perf_counter() - t0
                if not all(math.isfinite(v) for v in metrics.values()):
                    raise TrainingError(
                        f"non-finite loss or gradient at step {step + 1} ({metrics}); stopping. "
                        f"The last good checkpoint (step {self.ckpt.latest_step()}) is kept in "
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
                self.ckpt.save(state)
                self.maybe_evaluate(state, frozen, writer, steps)
                # The final save is collective: every process must leave at the same step, even
                # when only some of them were signalled.
                if global_max(int(stop.signal is not None)):
                    reason = f"stopped by signal {stop.signal or 'on another process'}"
                    break
            self.ckpt.save(state, force=True)
        finally:
            compiler.close()
            self.ckpt.wait()
            writer.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if reason != "finished":  # every process says so in its own log
            print(f"{reason}: saved step {int(state.step)} in {workdir}", file=sys.stderr)
        saved = self.ckpt.latest_step()
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
