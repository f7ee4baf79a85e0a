"""Training throughput: jax_iclemb's jitted packed step vs "the PyTorch way", same data, on CPU.

    python bench/train_throughput.py [--data /work/shared/data/reference-sample] [--steps 6] \
        [--warmup 2] [--append docs/benchmarks.md]
    python bench/train_throughput.py --quick        # short lengths, batch 4, 1+1 steps a side
    python bench/train_throughput.py --attention block_sparse   # skip the dense JAX side
    python bench/train_throughput.py --batch 32 --tile 4    # bigger batches: records repeated

Both sides train the same small Mistral-shaped decoder (hidden 256, 4 layers, 8 heads / 4 KV heads,
MLP 768, vocab 32003; fp32; LoRA rank 64 / alpha 32 / dropout 0.1 on all projections) on the same
token sequences (jax_iclemb's pipeline at the paper's lengths: query 2048 with 0-5 examples, passage
512, examples 256/256, group 8, `--batch` queries a step, 8 by default), each side in its own
subprocess so that peak RSS is per side. The JAX side runs once per attention path (`--attention`:
block-sparse tiles and the dense mask by default), builds its step and batches as `train.run`
does, compiles every new batch shape ahead of time (compile time reported apart from step time),
and profiles one step: the XLA CPU trace's op times are attributed to source functions
(attention, projections, rest) through the compiled HLO's metadata. Prints a Markdown report;
`--append FILE` also appends it to FILE. `--tile N` trains on a copy of the data with every JSONL
line repeated N times (the sample has 10 records per dataset, and a batch needs distinct records).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DATA = "/work/shared/data/reference-sample"


def bench_config(
    data_path: str, quick: bool, attention: str = "block_sparse", batch: int = 8
) -> Any:
    from jax_iclemb.config import default_config

    c = default_config()
    c.model.attention_impl = attention
    c.model.arch.update(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        vocab_size=32003,
        max_position_embeddings=4096,
    )
    c.model.dtype = c.model.param_dtype = "float32"
    c.model.remat = "none"  # the torch side keeps activations too (no gradient checkpointing)
    c.model.init = "fan_in"
    c.data.path = data_path
    c.data.batch_size = batch
    if quick:
        c.data.batch_size = 4
        c.data.query_max_len, c.data.passage_max_len = 512, 128
        c.data.example_query_max_len = c.data.example_passage_max_len = 64
    c.optim.warmup_steps = 0
    c.optim.decay = "constant"  # = torch's plain AdamW
    c.train.mesh = (1, 1, 1)
    return c


# ---------------------------------------------------------------------------------------------
# Profile: XLA CPU trace events -> source functions, through the compiled HLO's metadata
# ---------------------------------------------------------------------------------------------

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


def attention_pairs(batch: Any) -> tuple[int, int]:
    """(query-key pairs the causal same-segment mask keeps, pairs the dense rows compute)."""
    kept = 0
    for row in batch.segment_ids:
        _, counts = np.unique(row, return_counts=True)  # padding (0) only sees padding: counted
        kept += int(sum(n * (n + 1) // 2 for n in counts))
    rows, length = batch.tokens.shape
    return kept, rows * length * length


# ---------------------------------------------------------------------------------------------
# The JAX side
# ---------------------------------------------------------------------------------------------


def run_jax(config: Any, steps: int, warmup: int, profile: bool) -> dict[str, Any]:
    import jax

    from jax_iclemb import parallel, train
    from jax_iclemb.data.pipeline import pipeline_from_config
    from jax_iclemb.model import dot_product_attention
    from jax_iclemb.optim import make_optimizer

    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    pipeline = pipeline_from_config(config)
    with jax.set_mesh(mesh):
        model, model_config = train.build_model(config, mesh, len(pipeline.tokenizer))
        graphdef, lora, frozen = train.split_model(model)
        del model
        tx, schedule = make_optimizer(config.optim, warmup + steps)
        state = train.initial_state(lora, tx)
        step_fn = jax.jit(train.make_train_step(graphdef, config, tx, schedule), donate_argnums=0)
        compiled: dict[tuple, Any] = {}
        compile_s: dict[str, float] = {}
        flops: dict[str, float] = {}
        rss_start = _current_rss_mb()
        times, host, real, slots, losses, kept, dense, work = [], [], 0, 0, [], 0, 0, 0.0
        tiles_by_rows: dict[int, int] = {}  # tile high-water mark per row count
        tile_scores = 0
        for step in range(warmup + steps):
            t0 = time.perf_counter()
            batch, info = pipeline.batch(step)
            at_least = tiles_by_rows.get(batch.num_rows, 0)
            tile_list, tiles = train.attention_tiles(config, batch, 1, at_least)
            tiles_by_rows[batch.num_rows] = tiles
            arrays = train.device_batch(mesh, batch, tile_list)
            host_s = time.perf_counter() - t0
            shape = (*batch.tokens.shape, tiles)  # (rows, length, tiles)
            if shape not in compiled:
                t0 = time.perf_counter()
                compiled[shape] = step_fn.lower(state, frozen, arrays).compile()
                compile_s[str(shape)] = time.perf_counter() - t0
                cost = compiled[shape].cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                flops[str(shape)] = float(cost.get("flops", 0.0))
            t0 = time.perf_counter()
            state, metrics = compiled[shape](state, frozen, arrays)
            losses.append(float(metrics["loss"]))  # waits for the step
            seconds = time.perf_counter() - t0
            if step == warmup:  # the step the profile traces again
                profiled = (batch, arrays, compiled[shape])
            if step >= warmup:
                times.append(seconds)
                host.append(host_s)
                real += info["real_tokens"]
                slots += batch.tokens.size
                work += flops[str(shape)]
                k, d = attention_pairs(batch)
                kept, dense = kept + k, dense + d
                tile_scores += tiles * config.model.attention_block**2 if tiles else d
        result = {
            "side": f"jax-{config.model.attention_impl}",
            "attention": config.model.attention_impl,
            "steps": steps,
            "real_tokens": real,
            "tokens_per_s": real / sum(times),
            "step_s": float(np.mean(times)),
            "step_times": times,
            "host_pipeline_s": float(np.mean(host)),
            "utilisation": real / slots,
            "shapes": sorted(compile_s),
            "compile_s": compile_s,
            "flops_per_step": flops,
            "flops_per_real_token": work / real,
            "attention_pairs_kept": kept / max(dense, 1),
            # query-key scores the attention computes / those of the dense rows
            "attention_scores_computed": tile_scores / max(dense, 1),
            "peak_rss_mb": _peak_rss_mb(),
            "rss_before_training_mb": rss_start,
            "losses": losses,
        }
        if profile:
            result["profile"] = _profile(
                *profiled, state, frozen, model_config, dot_product_attention
            )
    return result


def _profile(batch, arrays, executable, state, frozen, model_config, attention):
    """Trace one step again (its batch, device arrays and compiled executable) and time the
    attention core alone on its shapes."""
    import jax
    import jax.numpy as jnp

    sources = hlo_sources(executable.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            t0 = time.perf_counter()
            state, metrics = executable(state, frozen, arrays)
            jax.block_until_ready(metrics)
            traced_s = time.perf_counter() - t0
        split = attribute(trace_op_times(trace_dir), sources)

    # The attention core (scores, mask, softmax, values), forward + backward, on this step's
    # shapes, for every layer.
    c = model_config
    rows, length = batch.tokens.shape
    key = jax.random.key(0)
    q = jax.random.normal(key, (rows, length, c.num_heads, c.head_dim))
    kv = jax.random.normal(key, (rows, length, c.num_kv_heads, c.head_dim))
    seg, pos = jnp.asarray(batch.segment_ids), jnp.asarray(batch.positions)

    def core(q, k, v):
        out = attention(
            q, k, v, seg, pos, causal=True, sliding_window=c.sliding_window,
            impl=c.attention_impl, block_pairs=arrays.get("block_pairs"), block=c.attention_block,
        )
        return jnp.sum(out)

    grad = jax.jit(jax.grad(core, argnums=(0, 1, 2)))
    jax.block_until_ready(grad(q, kv, kv))
    t0 = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(grad(q, kv, kv))
    core_s = (time.perf_counter() - t0) / 3 * c.num_layers
    return {
        "shape": list(batch.tokens.shape),
        "traced_step_s": traced_s,
        "split": split[:12],
        "attention_core_s": core_s,
    }


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmRSS:")).split()[1]) / 1024


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _side(name: str, args: argparse.Namespace, attention: str = "") -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--side", name, "--data", args.data,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    cmd += ["--attention", attention] if attention else []
    cmd += ["--quick"] if args.quick else []
    cmd += ["--no-profile"] if args.no_profile else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(x.split(":", 1)[1].strip() for x in info.splitlines() if "Model name" in x)
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


ATTENTION_NAMES = {"block_sparse": "block-sparse tiles", "xla": "dense mask"}


def report(jax_runs: list[dict], torch_r: dict, command: str) -> str:
    def row(label: str, cells: list[str], torch_cell: str) -> str:
        return f"| {label} | " + " | ".join(cells) + f" | {torch_cell} |"

    def each(fmt) -> list[str]:
        return [fmt(r) for r in jax_runs]

    t = torch_r
    lines = [
        f"Machine: {machine()}. Command: `{command}`. Timed steps: {t['steps']} a side "
        f"(after warm-up), real tokens/step: "
        + " / ".join(f"{r['real_tokens'] / r['steps']:.0f}" for r in [*jax_runs, t])
        + " (same sequences on every side).",
        "",
        "| | " + " | ".join(
            f"jax_iclemb, {ATTENTION_NAMES.get(r['attention'], r['attention'])}" for r in jax_runs
        ) + " | PyTorch way (left-padded, eager) |",
        "|---|" + "---:|" * (len(jax_runs) + 1),
        row("real tokens/s", each(lambda r: f"{r['tokens_per_s']:,.0f}"),
            f"{t['tokens_per_s']:,.0f}"),
        row("ratio", each(lambda r: f"**{r['tokens_per_s'] / t['tokens_per_s']:.2f}×**"), "1×"),
        row("step time (s, mean)", each(lambda r: f"{r['step_s']:.2f}"), f"{t['step_s']:.2f}"),
        row("utilisation (real / array slots)", each(lambda r: f"{r['utilisation']:.1%}"),
            f"{t['utilisation']:.1%}"),
        row("attention scores computed / dense rows'",
            each(lambda r: f"{r['attention_scores_computed']:.1%}"), "–"),
        row("peak RSS (MB)", each(lambda r: f"{r['peak_rss_mb']:,.0f}"),
            f"{t['peak_rss_mb']:,.0f}"),
        row("RSS before training (MB)", each(lambda r: f"{r['rss_before_training_mb']:,.0f}"),
            f"{t['rss_before_training_mb']:,.0f}"),
        row("compile time (s, per shape)", each(
            lambda r: ", ".join(f"{v:.1f}" for v in r["compile_s"].values())), "– (eager)"),
        row("host pipeline per step (s)", each(lambda r: f"{r['host_pipeline_s']:.2f}"),
            "(same pipeline, not timed)"),
        "",
        "JAX compiled steps, MFLOP per real token (XLA cost analysis over the timed steps): "
        + ", ".join(
            f"{ATTENTION_NAMES.get(r['attention'], r['attention'])} "
            f"{r['flops_per_real_token'] / 1e6:.1f}" for r in jax_runs
        )
        + f". The causal same-segment mask keeps {jax_runs[0]['attention_pairs_kept']:.1%} of "
        "the query-key pairs of the dense rows.",
    ]
    for r in jax_runs:
        prof = r.get("profile")
        if not prof:
            continue
        name = ATTENTION_NAMES.get(r["attention"], r["attention"])
        lines += [
            "",
            f"Profile of one JAX step, {name} (rows×length {prof['shape']}, "
            f"{prof['traced_step_s']:.2f} s traced): share of XLA op time by source function",
            "",
            "| phase, source function | share |",
            "|---|---:|",
            *(f"| {label} | {share:.1%} |" for label, share in prof["split"]),
            "",
            f"Attention core alone ({name}: scores + mask + softmax + values, fwd+bwd, all "
            f"layers) on this shape: {prof['attention_core_s']:.2f} s.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="reference-format JSONL dir")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--quick", action="store_true", help="short lengths, batch 4, 1+1 steps")
    parser.add_argument("--batch", type=int, default=8, help="queries per step")
    parser.add_argument("--tile", type=int, default=1, help="repeat every record N times")
    parser.add_argument("--no-profile", action="store_true", help="skip the JAX profile")
    parser.add_argument(
        "--attention", nargs="+", default=["block_sparse", "xla"],
        help="JAX attention paths to run (model.attention_impl values)",
    )
    parser.add_argument("--append", default=None, help="append the report to this Markdown file")
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)  # worker
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 1, 1
    if args.side:
        config = bench_config(args.data, args.quick, args.attention[0], args.batch)
        if args.side == "jax":
            result = run_jax(config, args.steps, args.warmup, profile=not args.no_profile)
        else:
            sys.path.insert(0, str(BENCH_DIR))
            import torch_reference

            result = torch_reference.run(config, args.steps, args.warmup)
        print(json.dumps(result))
        return 0
    command = "python bench/train_throughput.py " + " ".join(argv or sys.argv[1:])
    with tempfile.TemporaryDirectory() as tiled:
        if args.tile > 1:
            args.data = tile_data(Path(args.data), Path(tiled), args.tile)
        return drive(args, command)


def tile_data(source: Path, out: Path, times: int) -> str:
    """A copy of a JSONL data folder with every line repeated `times` times."""
    for path in source.rglob("*.jsonl"):
        target = out / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        target.write_text("".join(lines * times), encoding="utf-8")
    return str(out)


def drive(args: argparse.Namespace, command: str) -> int:
    jax_runs = []
    for attention in args.attention:
        t0 = time.perf_counter()
        jax_runs.append(_side("jax", args, attention))
        print(f"jax ({attention}): {json.dumps(jax_runs[-1])} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    t0 = time.perf_counter()
    torch_r = _side("torch", args)
    print(f"torch: {json.dumps(torch_r)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    text = report(jax_runs, torch_r, command.strip())
    print()
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
