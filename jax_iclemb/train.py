"""`python -m jax_iclemb.train --config configs/tiny.py [--workdir DIR] [--config.KEY=VALUE ...]`

The whole job: build the mesh, tokenizer, datasets, pipeline and model; restore the latest
checkpoint if there is one; then for every step turn the step number into a packed batch, run one
jitted update over the global batch, log, and checkpoint. Everything a step needs is a function of
(config, step), which is what makes resume exact.

One step, from here to the optimizer: `TrainLoop.run` (train_loop.py) asks the pipeline for the
step's packed batch (data/pipeline.py), pads it to its step shape and places it on the mesh
(step_batch.py), and runs the gradient and update programs of train_step.py, which embed the rows
with the model (model/build.py) and score them with the contrastive loss (loss.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import jax
import ml_collections

from jax_iclemb import checkpoint, compile_cache, distributed, host_memory, parallel, xla_flags
from jax_iclemb import config as config_lib
from jax_iclemb.data.pipeline import TrainPipeline, pipeline_from_config
from jax_iclemb.errors import PathExists, add_debug_flag, cli
from jax_iclemb.model.build import instantiate, lora_config, model_source, split_model
from jax_iclemb.model.decoder import abstract_model
from jax_iclemb.observe import flops_per_token, wandb_options
from jax_iclemb.optim import make_optimizer
from jax_iclemb.train_loop import TrainLoop
from jax_iclemb.train_step import (
    StepConfig,
    first_step,
    initial_state,
    make_grad_fn,
    make_update,
)

log = logging.getLogger("jax_iclemb.train")


def total_steps(config: ml_collections.ConfigDict, pipeline: TrainPipeline) -> int:
    """`train.steps`, or one epoch when it is 0."""
    return int(config.train.steps) or int(pipeline.steps_per_epoch)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Train until `train.steps` (resuming from the latest checkpoint); returns a summary.

    Nothing is written to the workdir before the data, tokenizer and model have loaded: a bad
    path, record or config key fails with the workdir as it was."""
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    wandb_options(config.log)  # a missing wandb package stops here, on every process

    cache = compile_cache.enable(config.train.compilation_cache)
    log.info("compiled steps are cached in %s", cache or "(nowhere: cache off)")
    started = time.perf_counter()
    mesh = parallel.make_mesh(config.train.mesh)
    pipeline = pipeline_from_config(
        config,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        # Gradient-cache chunks take equal row blocks from every data shard.
        row_multiple=config.train.grad_cache_chunks
        * max(1, parallel.data_parallel_size(mesh) // jax.process_count()),
    )
    tokenizer = pipeline.tokenizer
    data_ready = time.perf_counter()
    steps = total_steps(config, pipeline)
    updates = max(1, math.ceil(steps / config.optim.accumulate_steps))

    with jax.set_mesh(mesh):
        lora = lora_config(config.lora, config.train.trainable)
        source = model_source(config.model, vocab_size=len(tokenizer))
        # The step's programs compile for the model's shapes while its weights are drawn or
        # loaded (a 7B checkpoint: a minute either way on a GPU host).
        graphdef, params_like, frozen_like = split_model(
            abstract_model(source.config, lora, mesh), config.train.trainable
        )
        tx, schedule = make_optimizer(config.optim, updates)
        step_config = StepConfig.from_config(config)
        loop = TrainLoop(
            config, workdir, pipeline, mesh,
            jax.jit(make_grad_fn(graphdef, step_config)),
            # The new state reuses the old one's buffers; the gradients have no output of their
            # shape left to go to, so donating them only drew a warning.
            jax.jit(make_update(step_config, tx, schedule), donate_argnums=0),
            flops_token=flops_per_token(source.config, lora), graphdef=graphdef,
        )
        start = checkpoint.latest_step(workdir / "checkpoints")
        # What is built so far lives as long as the run: out of the cyclic GC, whose full
        # collections otherwise rescan it while each step shape traces (a third of the tracing).
        gc.freeze()
        loop.start_compiling(
            (params_like, frozen_like, checkpoint.abstract_like(first_step())), start or 0, steps
        )
        try:
            model = instantiate(source, lora, seed=config.seed, mesh=mesh)
            workdir.mkdir(parents=True, exist_ok=True)
            if is_main:
                (workdir / "config.json").write_text(config_lib.to_json(config))
                tokenizer.save_pretrained(workdir / "tokenizer")
                (workdir / "model_config.json").write_text(
                    json.dumps(source.config.to_hf(), indent=2)
                )
            _, params, frozen = split_model(model, config.train.trainable)
            del model
            state = initial_state(params, tx)
            ckpt = checkpoint.Checkpointer(
                workdir / "checkpoints",
                every=config.train.checkpoint_every,
                keep=config.train.keep_checkpoints,
            )
            if start is not None:
                state = ckpt.restore(start, like=state)
                log.info("resumed from step %d", start)
            # Where a short run's time outside its steps goes (on a GPU, seconds:
            # docs/benchmarks.md).
            log.info("set up in %.1f s: data and tokenizer %.1f s, model, optimizer and "
                     "checkpoints %.1f s", time.perf_counter() - started, data_ready - started,
                     time.perf_counter() - data_ready)
            summary = loop.run(state, frozen, steps, ckpt)
        finally:
            loop.close()
            gc.unfreeze()
        closing = time.perf_counter()
        ckpt.close()
        log.info("checkpoints closed in %.1f s", time.perf_counter() - closing)
    return summary



def closing_summary(
    summary: dict[str, Any], workdir: str | Path, config: ml_collections.ConfigDict
) -> str:
    """What a finished (or stopped) run tells its user: where it ended, its final loss and speed,
    where the weights are, and the commands to run next with this workdir filled in."""
    step, steps, losses = summary["step"], summary["steps"], summary["losses"]
    lines = [f"training {summary['reason']}: step {step} of {steps}"]
    if losses:
        first = step - len(losses) + 1
        lines[0] += f", final loss {losses[-1]:.4f} ({losses[0]:.4f} at step {first})"
        tokens, seconds = summary["real_tokens"], summary["seconds"]
        working = seconds - summary["compile_seconds"]
        speed = f"speed: {tokens / seconds:.0f} real tokens/s over this run's {len(losses)} steps"
        if working > 0:
            speed += f" ({tokens / working:.0f} without waiting for compiles)"
        lines.append(speed)
    else:
        lines[0] += " (nothing left to train)"
    work, saved = Path(workdir), summary["checkpoint_step"]
    where = "none saved" if saved is None else work / "checkpoints" / str(saved)
    lines.append(f"checkpoint: {where}")
    if summary["reason"] != "finished":
        lines.append("resume: run the same command again")
    if saved is not None:
        out = work.with_name(work.name + "-merged")
        data = config.eval.data or "BEIR_DIR"
        lines += [
            "next:",
            f"  python -m jax_iclemb.export --workdir {shlex.quote(str(work))} "
            f"--out {shlex.quote(str(out))}",
            f"  python -m jax_iclemb.evaluate --model {shlex.quote(str(work))} "
            f"--data {shlex.quote(data)}",
        ]
        if not config.eval.data:
            lines.append(
                "  (BEIR_DIR: a BEIR folder; make one from records with python -m "
                "jax_iclemb.evaluate --make-beir --from-jsonl FILE.jsonl --out BEIR_DIR)"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m jax_iclemb.train",
        description="Train a few-shot (in-context) text embedder.",
        epilog="Any --config.KEY=VALUE overrides a config field, e.g. --config.train.steps=20.",
    )
    parser.add_argument(
        "--config", required=True, help="a config file, or a recipe name from configs/ (e.g. tiny)"
    )
    parser.add_argument("--workdir", default=None, help="default: runs/<config name>")
    add_debug_flag(parser)
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)}")
    return args, rest


def set_process_options(config: ml_collections.ConfigDict) -> None:
    """The process-wide options the train command takes from the config, set before JAX starts
    its threads and its backend (which reads XLA_FLAGS once): glibc malloc for
    `train.reuse_host_memory`, and the XLA flags of `xla_flags` (`train.gpu_triton_gemm`,
    `train.cpu_devices`). Also for tools that run the trainer's step in their own process
    (bench/profile_step.py)."""
    if config.train.reuse_host_memory:
        applied = host_memory.keep_freed_memory()
        log.info("train.reuse_host_memory: glibc malloc set by %s", ", ".join(applied) or
                 "nothing (not glibc, or the environment already chose)")
    triton = "true" if config.train.gpu_triton_gemm else "false"
    xla_flags.set_default("xla_gpu_enable_triton_gemm", triton)
    devices = xla_flags.cpu_devices(config.train.cpu_devices)
    xla_flags.set_default("xla_force_host_platform_device_count", str(devices))


@cli
def main(argv: Sequence[str], *, command: bool = False) -> int:
    """The job; `command`: run as the process's command (`script`), which may then also set
    process-wide options the config asks for."""
    args, overrides = parse_args(argv)
    config = config_lib.load_config(args.config, overrides)
    if command:
        set_process_options(config)
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    if workdir.exists() and not workdir.is_dir():
        raise PathExists(f"--workdir {workdir} exists and is not a folder")
    distributed.initialize()
    summary = run(config, workdir)
    if jax.process_index() == 0:
        print(closing_summary(summary, workdir, config), flush=True)
    return 0


def log_to_stderr() -> None:
    """The CLI's logging: our INFO lines, other libraries' warnings. `force`: importing orbax
    already gave the root logger absl's handler, at WARNING (so a plain basicConfig did nothing)."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("jax_iclemb").setLevel(logging.INFO)


def script() -> int:
    """The command (`python -m jax_iclemb.train`, `jax-iclemb-train`): `main` with the CLI's
    logging and process-wide settings, which a caller of `main` in-process keeps its own of."""
    log_to_stderr()
    return main(command=True)


def command() -> NoReturn:
    """The process's entry point: `script`, then the exit without the interpreter's teardown.
    A run closes what it opened itself (checkpoints, metrics, wandb, the compile workers), so
    what is left is freeing JAX's runtime and compiled programs one by one: half a second of every
    run's wall on a CPU host. Several processes exit normally (JAX's shutdown barrier runs at
    exit)."""
    code = script()
    if jax.distributed.is_initialized():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    command()
