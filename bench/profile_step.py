"""Where a training step's time goes: one step of the trainer, traced with the XLA profiler.

    python bench/profile_step.py --config configs/tiny.py [--step 0] [--config.KEY=VALUE ...]

The step is the trainer's own: the process takes the train command's options (CPU devices, XLA
flags, malloc: `train.set_process_options`), `TrainLoop.next_batch` builds step `--step`'s batch
at its own ladder shape (a short run's shape plan may run it at a larger one: docs/training.md)
and `StepCompiler` compiles its gradient program (the shape-dependent part of a step; the
optimizer update is a separate, tiny program), as `python -m jax_iclemb.train` does. It runs
twice untraced, then once under `jax.profiler.trace`; each XLA op's time (summed over the
runtime's threads) is attributed to the innermost jax_iclemb function behind it through the
compiled HLO's metadata, split into forward and backward. A diagnostic, not a benchmark: speed is
compared in `bench/vs_flagembedding.py`. Prints a Markdown report.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*metadata=\{([^}]*)\}")


def _fields(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> 'phase file:function' of the innermost project frame behind it.

    Uses the compiled module's stack-frame tables (FileNames, FunctionNames, FileLocations,
    StackFrames); the phase is "bwd" for ops under a `transpose(...)` (the backward pass).
    """
    tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
    section, instructions = "", []
    for raw in hlo_text.splitlines():
        if raw in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = raw
            continue
        row = _TABLE_ROW.match(raw)
        if section and row:
            tables[section][int(row.group(1))] = row.group(2).strip('"')
            continue
        section = ""
        m = _INSTR.match(raw)
        if m:
            instructions.append((m.group(1), m.group(2)))

    def frame_label(frame: int) -> str:
        fallback, seen = "", set()
        while frame in tables["StackFrames"] and frame not in seen:
            seen.add(frame)
            f = _fields(tables["StackFrames"][frame])
            loc = _fields(tables["FileLocations"].get(f["file_location_id"], ""))
            path = tables["FileNames"].get(loc.get("file_name_id", -1), "?")
            label = f"{Path(path).name}:{tables['FunctionNames'].get(loc.get('function_name_id'))}"
            if "jax_iclemb" in path:
                return label
            fallback = fallback or label
            frame = f["parent_frame_id"]
        return fallback

    out = {}
    for name, meta in instructions:
        op = re.search(r'op_name="([^"]*)"', meta)
        op_name = op.group(1) if op else ""
        frame = re.search(r"stack_frame_id=(\d+)", meta)
        label = frame_label(int(frame.group(1))) if frame else ""
        phase = "bwd" if "transpose(" in op_name else "fwd"
        out[name] = f"{phase} {label or op_name.rsplit('/', 1)[-1] or '?'}"
    return out


def trace_op_times(trace_dir: str) -> collections.Counter:
    """Total duration (ns) of each XLA op over the CPU threads of a trace (summed over threads)."""
    import jax

    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    times: collections.Counter = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if "XLA" not in line.name:  # XLA executor and Eigen pool threads
                continue
            for event in line.events:
                if dict(event.stats).get("hlo_op"):
                    times[event.name] += event.duration_ns
    return times


def attribute(times: collections.Counter, sources: dict[str, str]) -> list[tuple[str, float]]:
    """Share of the traced op time per (phase, file:function), largest first."""
    grouped: collections.Counter = collections.Counter()
    for op, ns in times.items():
        grouped[sources.get(op, f"? {op}")] += ns
    total = sum(grouped.values())
    return [(k, v / total) for k, v in grouped.most_common()]


def profile(config_path: str, overrides: list[str], step: int, top: int) -> str:
    from jax_iclemb import config as config_lib
    from jax_iclemb import parallel
    from jax_iclemb.checkpoint import abstract_like
    from jax_iclemb.data.pipeline import pipeline_from_config
    from jax_iclemb.model.build import build_model, lora_config, split_model
    from jax_iclemb.optim import make_optimizer
    from jax_iclemb.train import set_process_options
    from jax_iclemb.train_loop import StepCompiler, TrainLoop
    from jax_iclemb.train_step import StepConfig, initial_state, make_grad_fn

    config = config_lib.load_config(config_path, overrides)
    set_process_options(config)  # the train command's devices, XLA flags and malloc
    mesh = parallel.make_mesh(config.train.mesh)
    pipeline = pipeline_from_config(
        config,
        row_multiple=config.train.grad_cache_chunks * parallel.data_parallel_size(mesh),
    )
    with jax.set_mesh(mesh):
        model, _ = build_model(
            config.model, lora_config(config.lora, config.train.trainable), seed=config.seed,
            mesh=mesh, vocab_size=len(pipeline.tokenizer),
        )
        graphdef, params, frozen = split_model(model, config.train.trainable)
        del model
        tx, _ = make_optimizer(config.optim, max(step + 1, 100))
        state = initial_state(params, tx)
        grad_step = jax.jit(make_grad_fn(graphdef, StepConfig.from_config(config)))
        loop = TrainLoop(
            config, Path(tempfile.mkdtemp()), pipeline, mesh, grad_step, None,
            flops_token=0.0, graphdef=graphdef,
        )
        batch, shape, info = loop.next_batch(step)
        compiler = StepCompiler(grad_step, abstract_like((state.params, frozen, state.step)))
        executable, compile_s = compiler.get(shape, batch, feed=lambda: False)
        compiler.close()
        args = (state.params, frozen, batch, state.step)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            jax.block_until_ready(executable(*args))
            times.append(time.perf_counter() - t0)
        sources = hlo_sources(executable.as_text())
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                jax.block_until_ready(executable(*args))
            op_times = trace_op_times(trace_dir)
    total = sum(op_times.values())
    kinds: collections.Counter = collections.Counter()
    for op, ns in op_times.items():
        kinds[re.sub(r"\.\d+$", "", op)] += ns
    lines = [
        f"Step {step} ({info['dataset']}) on {jax.device_count()} {jax.default_backend()} "
        f"device(s): {shape.describe()}, {shape.real_tokens} real tokens "
        f"({shape.real_tokens / (shape.rows * shape.length):.1%} of the slots). Compile "
        f"{compile_s:.1f} s; step {min(times):.3f} s (best of 2); traced op time "
        f"{total / 1e9:.2f} s summed over threads.",
        "",
        "| share of op time | phase and function |",
        "|---:|---|",
        *(f"| {share:.1%} | {name} |" for name, share in attribute(op_times, sources)[:top]),
        "",
        "| share of op time | XLA op kind |",
        "|---:|---|",
        *(f"| {ns / total:.1%} | {kind} |" for kind, ns in kinds.most_common(top)),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a configs/*.py file")
    parser.add_argument("--step", type=int, default=0, help="which step's batch")
    parser.add_argument("--top", type=int, default=12, help="rows per table")
    args, overrides = parser.parse_known_args(argv)
    print(profile(args.config, overrides, args.step, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
