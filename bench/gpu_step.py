"""The paper's training step on one accelerator: compile time, step time, real tokens/s, MFU and
peak memory, for several attention implementations in one command, written as a report.

    python bench/gpu_step.py [--attention block_sparse,cudnn,xla] [--layers N] [--batch 16] \
        [--chunk-rows 4] [--compile-timeout S] [--timeout S] [--serial] [--report DIR]
    python bench/gpu_step.py --smoke           # the same code path, small model, on CPU, ~1 min
    python bench/gpu_step.py --estimate [--rows 32]   # AOT memory of the 7B step, nothing allocated

A random-initialised Mistral-7B-shaped decoder (`MISTRAL_7B_ARCH`; `--layers N` keeps the first N
layers, to bound the compile), bf16 weights and compute, LoRA r64 / alpha 32 / dropout 0.1 on all
seven projections, full rematerialisation, the gradient cache (`--chunk-rows` rows per chunk), at
the paper's lengths (query 2048 with 0-5 in-context examples, passage 512, examples 256+256, group
8). Batches come from the real pipeline (sampling, templates, Mistral tokenizer, packing) over a
synthetic retrieval dataset with realistic lengths (queries of ~50-200 tokens, passages of
~150-500), so queries with examples run to ~1-2k tokens. Every batch is padded to one row count,
so the step compiles once (compile time is reported apart). The step is
`train_step.make_train_step`, the trainer's own. MFU uses `observe.flops_per_token` (4·N_base +
6·N_lora + attention at the batches' real mean causal context) over the device's dense bf16 peak.

Each attention implementation runs in its own process (its own peak memory; a compile that
overruns `--compile-timeout` is killed without stopping the others). The processes compile at
the same time (compiling is mostly host work) but run their steps one at a time, so step times
are the device's alone; `--serial` runs them one after another instead (XLA's autotuning then has
the device to itself too). DIR/gpu_step.json and DIR/gpu_step.md are rewritten as results arrive,
so a run stopped from outside still leaves what it measured; DIR/gpu_step-<attention>.log holds
each process's output.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx

from jax_iclemb import compile_cache, parallel
from jax_iclemb.checkpoint import TrainState
from jax_iclemb.config import default_config, validate
from jax_iclemb.data.batch import PackedBatch
from jax_iclemb.data.packing import pad_batch, segment_bucket
from jax_iclemb.data.pipeline import pipeline_from_config
from jax_iclemb.model import TRAINABLE, ModelConfig, create_model, state_shardings
from jax_iclemb.model.block_sparse import pad_pairs
from jax_iclemb.model.build import build_model, lora_config, model_options, split_model
from jax_iclemb.observe import flops_per_token, peak_flops
from jax_iclemb.optim import make_optimizer
from jax_iclemb.step_batch import attention_tiles, device_batch
from jax_iclemb.train_step import StepConfig, initial_state, make_train_step

SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "vel", "zan", "qui", "bor", "fen", "sa", "dru", "ept")


def synthetic_data(folder: Path, records: int, seed: int = 0) -> Path:
    """A retrieval JSONL dataset with realistic lengths (pseudo-words are ~2-3 tokens each)."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(SYLLABLES, rng.integers(1, 4))) for _ in range(3000)]
    text = lambda lo, hi: " ".join(rng.choice(words, rng.integers(lo, hi)))
    path = folder / "synthetic_retrieval.jsonl"
    with open(path, "w") as f:
        for _ in range(records):
            negatives = [text(60, 220) for _ in range(7)]
            record = {"query": text(20, 80), "pos": [text(60, 220)], "neg": negatives}
            f.write(json.dumps(record) + "\n")
    return path


def bench_config(args: argparse.Namespace, data_path: Path) -> Any:
    c = default_config()  # Mistral-7B shape, bf16, LoRA r64/a32/0.1 on all projections, remat full
    c.model.attention_impl = args.attention
    c.model.remat = args.remat
    c.model.scan_layers = not args.unrolled
    c.data.path = str(data_path)
    c.data.batch_size = args.batch
    c.data.pack_len = 2048
    c.optim.warmup_steps = 1
    if args.layers:
        c.model.arch.num_hidden_layers = args.layers
    if args.smoke:
        c.model.arch.update(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16,
        )
        c.model.dtype = c.model.param_dtype = "float32"
        c.lora.rank = 8
        c.data.query_max_len, c.data.passage_max_len, c.data.pack_len = 512, 128, 512
        c.data.example_query_max_len = c.data.example_passage_max_len = 64
        c.data.train_group_size = 4
    validate(c)
    return c


def chunk_layout(rows: int, chunk_rows: int, data_shards: int) -> tuple[int, int]:
    """(padded rows, chunks): chunks of `chunk_rows` rows (0: one chunk, no gradient cache),
    rounded up to a multiple of the data shards."""
    chunk_rows = math.ceil((chunk_rows or rows) / data_shards) * data_shards
    padded = math.ceil(rows / chunk_rows) * chunk_rows
    return padded, padded // chunk_rows


def mean_causal_context(segment_ids: np.ndarray) -> float:
    """Keys a real token attends to on average: (n+1)/2 over a segment of n, token-weighted."""
    lengths = [np.bincount(row[row > 0])[1:] for row in segment_ids]
    n = np.concatenate(lengths).astype(np.float64)
    n = n[n > 0]
    return float((n * (n + 1) / 2).sum() / n.sum())


def make_batches(config: Any, count: int, chunk_rows: int, data_shards: int):
    """`count` packed batches from the pipeline, padded to one shape; (batches, infos, chunks)."""
    pipeline = pipeline_from_config(config)
    made = [pipeline.batch(step) for step in range(count)]
    rows, chunks = chunk_layout(max(b.num_rows for b, _ in made), chunk_rows, data_shards)
    pad_id = pipeline.tokenizer.pad_token_id or 0
    queries = pipeline.max_local_queries
    # The trainer's segment slots: what the fullest row holds, on segment_bucket's ladder.
    segments = segment_bucket(max(b.segments_held for b, _ in made), made[0][0].max_segments)
    batches = [pad_batch(b, num_rows=rows, num_queries=queries, num_segments=segments,
                         pad_id=pad_id) for b, _ in made]
    return batches, [info for _, info in made], chunks, len(pipeline.tokenizer)


def model_config_of(config: Any, vocab_size: int) -> ModelConfig:
    arch = dict(config.model.arch.to_dict(), vocab_size=vocab_size)
    return ModelConfig.from_hf(arch, **model_options(config.model))


def device_info() -> dict[str, Any]:
    """The card and the software that measured."""
    return {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def peak_memory_gib() -> float | None:
    """The device allocator's peak since the process started (None where JAX reports none, as
    on CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return _gib(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


@contextlib.contextmanager
def alone_on_device(lock: Path | None):
    """Hold `lock` (an flock) while timing, so that steps of concurrent runs never overlap."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run(config: Any, args: argparse.Namespace, note=lambda result: None) -> dict[str, Any]:
    """Compile and time the step for `config`'s attention; `note` gets the result so far after
    the compile and at the end."""
    mesh = parallel.make_mesh(config.train.mesh)
    shards = parallel.data_parallel_size(mesh)
    batches, infos, chunks, vocab = make_batches(
        config, args.warmup + args.steps, args.chunk_rows, shards
    )
    config.train.grad_cache_chunks = chunks
    with jax.set_mesh(mesh):
        model, model_config = build_model(
            config.model, lora_config(config.lora, config.train.trainable), seed=config.seed,
            mesh=mesh, vocab_size=vocab,
        )
        graphdef, params, frozen = split_model(model)
        del model
        tx, schedule = make_optimizer(config.optim, 1000)
        state = initial_state(params, tx)
        # One tile count for all batches (block_sparse), so the step compiles once.
        tiles = [attention_tiles(config.model, b, chunks * shards) for b in batches]
        count = max((t.shape[1] for t in tiles if t is not None), default=0)
        num_blocks = config.data.pack_len // config.model.attention_block
        device_batches = [
            device_batch(mesh, dataclasses.replace(
                b, block_pairs=None if t is None else pad_pairs(t, count, num_blocks)
            ))
            for b, t in zip(batches, tiles)
        ]
        context = float(np.mean([mean_causal_context(b.segment_ids) for b in batches]))
        result: dict[str, Any] = {
            **device_info(),
            "attention": config.model.attention_impl,
            "layers": model_config.num_layers,
            "scan_layers": model_config.scan_layers,
            "queries_per_step": config.data.batch_size,
            "rows": int(batches[0].num_rows),
            "chunks": chunks,
            "utilisation": float(np.mean([(b.segment_ids > 0).mean() for b in batches])),
            "mean_query_tokens_with_examples": _mean_query_tokens(batches),
            "mean_causal_context": context,
        }
        step_fn = jax.jit(
            make_train_step(graphdef, StepConfig.from_config(config), tx, schedule),
            donate_argnums=0,
        )
        t0, hits = time.perf_counter(), compile_cache.hits()
        compiled = step_fn.lower(state, frozen, device_batches[0]).compile()
        memory = compiled.memory_analysis()
        result.update(
            status="compiled",
            compile_s=time.perf_counter() - t0,
            compile_cache_hit=compile_cache.hits() > hits,  # then compile_s is a load
            temp_gib=_gib(getattr(memory, "temp_size_in_bytes", 0)),
            argument_gib=_gib(getattr(memory, "argument_size_in_bytes", 0)),
        )
        note(result)
        times = []
        with alone_on_device(args.step_lock):
            for batch in device_batches:
                t0 = time.perf_counter()
                state, metrics = compiled(state, frozen, batch)
                loss = float(metrics["loss"])
                times.append(time.perf_counter() - t0)
                if not math.isfinite(loss):
                    raise RuntimeError(f"non-finite loss {loss} at step {len(times)}")
    measured = slice(args.warmup, None)
    seconds = float(np.sum(times[measured]))
    tokens = sum(i["real_tokens"] for i in infos[measured])
    flops = flops_per_token(
        model_config, lora_config(config.lora, config.train.trainable), mean_context=context
    )
    peak = peak_flops(jax.devices()[0]) * jax.device_count()
    tokens_per_s = tokens / seconds
    result.update(
        status="ok",
        step_s=seconds / len(times[measured]),
        real_tokens_per_s=tokens_per_s,
        tflop_per_token_model=flops / 1e12,
        mfu=tokens_per_s * flops / peak if peak else None,
        peak_memory_gib=peak_memory_gib(),
        last_loss=loss,
    )
    note(result)
    return result


def _mean_query_tokens(batches) -> float:
    """Mean length of the query segments (the ones `query_slot` points at)."""
    lengths = []
    for b in batches:
        counts = np.stack([np.bincount(r, minlength=b.max_segments + 1)[1:] for r in b.segment_ids])
        flat = counts.reshape(-1)
        lengths.extend(flat[b.query_slot[b.passage_mask.any(axis=1)]])
    return float(np.mean(lengths))


def _gib(n: int) -> float:
    return n / 2**30


def estimate(
    config: Any,
    rows: int,
    chunk_rows: int,
    mesh_shape: tuple[int, int, int] = (1, 1, 1),
    tiles_per_row: int = 200,
) -> dict[str, Any]:
    """Memory of the compiled step for the configured model on abstract inputs (nothing is
    allocated): `memory_analysis()` of the step compiled for this host's backend, per device.
    With a mesh, parameters carry their rule-table shardings and rows are split over the data
    axes, as in training. Block-sparse attention is sized at `tiles_per_row` tiles per row (of a
    2048-token row's 528 causal 64×64 tiles; `run`'s synthetic batches need 190-205 per row)."""
    mesh = parallel.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    shards = parallel.data_parallel_size(mesh)
    chunks = max(1, rows // (chunk_rows * shards)) if chunk_rows else 1
    config.train.grad_cache_chunks = chunks
    vocab = int(config.model.arch.vocab_size) + 3
    model_config = model_config_of(config, vocab)
    lora = lora_config(config.lora, config.train.trainable)
    abstract = nnx.eval_shape(lambda: create_model(model_config, lora, seed=0))
    graphdef, params_state, frozen_state = nnx.split(abstract, TRAINABLE, ...)

    def placed(state: nnx.State) -> dict:
        shardings = nnx.to_pure_dict(state_shardings(state, mesh))
        return jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
            nnx.to_pure_dict(state), shardings,
        )

    params, frozen = placed(params_state), placed(frozen_state)
    tx, schedule = make_optimizer(config.optim, 1000)
    opt = jax.eval_shape(tx.init, params)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt=opt)
    length, segments = int(config.data.pack_len), int(config.data.max_segments_per_row)
    b, g = int(config.data.batch_size), int(config.data.train_group_size)

    def sds(shape, dtype, row_sharded=False):
        axes = ("batch",) + (None,) * (len(shape) - 1) if row_sharded else (None,) * len(shape)
        return jax.ShapeDtypeStruct(
            shape, dtype, sharding=parallel.named_sharding(mesh, axes, shape)
        )

    block_pairs = None
    if config.model.attention_impl == "block_sparse":
        # Tile lists per (data shard, chunk) group, at `tiles_per_row` tiles per row.
        groups = chunks * shards
        block_pairs = sds((groups, rows // groups * tiles_per_row, 3), jnp.int32, True)
    batch = PackedBatch(
        tokens=sds((rows, length), jnp.int32, True),
        segment_ids=sds((rows, length), jnp.int32, True),
        positions=sds((rows, length), jnp.int32, True),
        last_index=sds((rows, segments), jnp.int32, True),
        block_pairs=block_pairs,
        query_slot=sds((b,), jnp.int32), passage_slot=sds((b, g), jnp.int32),
        passage_mask=sds((b, g), jnp.bool_), teacher_scores=sds((b, g), jnp.float32),
        has_teacher=sds((b,), jnp.bool_), in_batch_negatives=sds((), jnp.bool_),
        query_label=sds((b,), jnp.int32), passage_label=sds((b, g), jnp.int32),
    )
    with jax.set_mesh(mesh):
        step_fn = jax.jit(
            make_train_step(graphdef, StepConfig.from_config(config), tx, schedule),
            donate_argnums=0,
        )
        t0 = time.perf_counter()
        memory = step_fn.lower(state, frozen, batch).compile().memory_analysis()
    lora_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return {
        "backend": jax.default_backend(),
        "mesh": dict(mesh.shape),
        "layers": model_config.num_layers,
        "scan_layers": model_config.scan_layers,
        "rows": rows,
        "chunks": chunks,
        "remat": config.model.remat,
        "attention": config.model.attention_impl,
        "compile_s": time.perf_counter() - t0,
        "lora_params_m": sum(x.size for x in jax.tree.leaves(params)) / 1e6,
        "lora_gib": _gib(lora_bytes),
        "argument_gib": _gib(memory.argument_size_in_bytes),
        "temp_gib": _gib(memory.temp_size_in_bytes),
        "output_gib": _gib(memory.output_size_in_bytes),
        "alias_gib": _gib(memory.alias_size_in_bytes),
    }


# ---------------------------------------------------------------------------------------------
# One process per attention implementation, and the report
# ---------------------------------------------------------------------------------------------

ATTENTIONS = ("block_sparse", "xla", "pallas", "cudnn")
REPORT_COLUMNS = (
    ("attention", "attention", "{}"),
    ("status", "status", "{}"),
    ("compile_s", "compile s", "{:.1f}"),
    ("step_s", "step s", "{:.3f}"),
    ("real_tokens_per_s", "real tokens/s", "{:,.0f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("peak_memory_gib", "peak GiB", "{:.2f}"),
    ("temp_gib", "XLA temp GiB", "{:.2f}"),
)


def child_command(args: argparse.Namespace, attention: str, result: Path, lock: Path) -> list[str]:
    """This script, measuring one attention implementation, with the suite's settings."""
    cmd = [
        sys.executable, __file__, "--attention", attention, "--remat", args.remat,
        "--batch", str(args.batch), "--chunk-rows", str(args.chunk_rows),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--layers", str(args.layers),
        "--result", str(result), "--step-lock", str(lock),
    ]
    return cmd + ["--unrolled"] * args.unrolled + ["--smoke"] * args.smoke


def run_suite(args: argparse.Namespace, attentions: list[str], report: Path) -> list[dict]:
    """Each attention in its own process (at most one at a time with --serial), killed when its
    compile overruns --compile-timeout (from its start) or the suite overruns --timeout; the
    report is rewritten whenever something changes."""
    report.mkdir(parents=True, exist_ok=True)
    lock = report / "gpu_step.lock"
    start = time.monotonic()
    env = dict(os.environ)
    if not args.serial:  # several processes share the device: allocate on demand
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    pending = list(attentions)
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    results = {a: {"attention": a, "status": "not started"} for a in attentions}

    def read(path: Path, attention: str) -> dict:
        """What the process wrote so far (nothing before its compile ends)."""
        if path.exists():
            return json.loads(path.read_text())
        return {"attention": attention, "status": "compiling"}

    while pending or running:
        if time.monotonic() - start > args.timeout:
            for attention in pending:
                results[attention]["status"] = f"not started in the suite's {args.timeout:.0f} s"
            pending = []
        if pending and (not args.serial or not running):
            attention = pending.pop(0)
            result = report / f"gpu_step-{attention}.json"
            result.unlink(missing_ok=True)
            with open(report / f"gpu_step-{attention}.log", "w") as log:
                proc = subprocess.Popen(
                    child_command(args, attention, result, lock), env=env, stdout=log,
                    stderr=subprocess.STDOUT,
                )
            running[attention] = (proc, time.monotonic(), result)
        now = time.monotonic()
        for attention, (proc, started, result) in list(running.items()):
            got = read(result, attention)
            compiled = got.get("status") in ("compiled", "ok")
            if proc.poll() is not None:
                if proc.returncode and got.get("status") != "ok":
                    log = (report / f"gpu_step-{attention}.log").read_text()
                    got["status"] = f"failed: {last_error(log)}"
                del running[attention]
            elif not compiled and now - started > args.compile_timeout:
                got["status"] = f"compile not done in {args.compile_timeout:.0f} s: killed"
                proc.kill()
                proc.wait()
                del running[attention]
            elif now - start > args.timeout:
                got["status"] = (
                    f"{'steps' if compiled else 'compile'} not done when the suite's "
                    f"{args.timeout:.0f} s ran out: killed"
                )
                proc.kill()
                proc.wait()
                del running[attention]
            elif compiled:
                got["status"] = "running steps"
            results[attention] = got
        write_report(report, list(results.values()), args)
        time.sleep(0.5)
    lock.unlink(missing_ok=True)
    return list(results.values())


def last_error(log: str) -> str:
    """The exception a process died of (its last "SomeError: ..." line), else its last line."""
    lines = log.strip().splitlines() or ["no output"]
    errors = [x for x in lines if re.match(r"\w+(Error|Exception|Interrupt)\b", x)]
    return (errors or lines)[-1][:200]


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    """The report: one row per attention implementation, the setting above it."""
    first = next((r for r in results if "device" in r), {})
    lines = [
        "# bench/gpu_step.py",
        "",
        f"- device: {first.get('device', '?')} ({first.get('platform', '?')}); jax "
        f"{first.get('jax', '?')}, jaxlib {first.get('jaxlib', '?')}; "
        f"XLA_FLAGS: `{first.get('xla_flags') or '(none)'}`",
        f"- model: {first.get('layers', '?')} layers "
        f"({'scanned' if first.get('scan_layers', True) else 'unrolled'}), "
        f"{'smoke (tiny, fp32)' if args.smoke else 'Mistral-7B width, bf16'}, LoRA r"
        f"{'8' if args.smoke else '64'}, remat {args.remat}",
        f"- step: {first.get('queries_per_step', '?')} queries, {first.get('rows', '?')} rows in "
        f"{first.get('chunks', '?')} gradient-cache chunks, {args.warmup} warm-up + {args.steps} "
        f"timed steps; compiles {'one after another' if args.serial else 'concurrent'}, steps "
        "alone on the device",
        "",
        "| " + " | ".join(title for _, title, _ in REPORT_COLUMNS) + " |",
        "|" + "---|" * len(REPORT_COLUMNS),
    ]
    for r in results:
        cells = [
            fmt.format(r[key]).replace("|", "\\|") if r.get(key) is not None else "–"
            for key, _, fmt in REPORT_COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: Path, results: list[dict], args: argparse.Namespace) -> None:
    write_atomically(report / "gpu_step.json", json.dumps(results, indent=2) + "\n")
    write_atomically(report / "gpu_step.md", markdown(results, args))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--attention", default=None,
        help=f"comma-separated, of {', '.join(ATTENTIONS)} "
        "[block_sparse,cudnn,xla; --smoke: block_sparse,xla]",
    )
    p.add_argument("--remat", default="full", choices=("none", "full", "dots", "dots_no_batch"))
    p.add_argument("--batch", type=int, default=16, help="queries per step (each with 8 passages)")
    p.add_argument("--chunk-rows", type=int, default=4, help="rows per gradient-cache chunk")
    p.add_argument("--steps", type=int, default=3, help="measured steps")
    p.add_argument("--warmup", type=int, default=1, help="steps run before measuring")
    p.add_argument("--layers", type=int, default=0, help="keep only N layers (0 = all 32)")
    p.add_argument(
        "--unrolled", action="store_true", help="model.scan_layers=False (compile-time comparison)"
    )
    p.add_argument("--smoke", action="store_true", help="small model and lengths, on CPU")
    p.add_argument(
        "--compile-timeout", type=float, default=600,
        help="seconds from an implementation's start until its step must have compiled [600]",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run [3600]")
    p.add_argument("--serial", action="store_true", help="one implementation at a time")
    p.add_argument("--report", type=Path, default=Path("runs") / "gpu_step", help="[runs/gpu_step]")
    p.add_argument("--estimate", action="store_true", help="AOT memory only, on abstract inputs")
    p.add_argument("--rows", type=int, default=32, help="--estimate: rows of 2048 in the step")
    p.add_argument(
        "--mesh", default="1,1,1",
        help="--estimate: data,fsdp,tensor (emulate devices with XLA_FLAGS on CPU)",
    )
    # One implementation's process, started by the suite.
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--step-lock", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    default = "block_sparse,xla" if args.smoke else "block_sparse,cudnn,xla"
    args.attentions = (args.attention or default).split(",")
    unknown = [a for a in args.attentions if a not in ATTENTIONS]
    if unknown:
        p.error(f"unknown attention {', '.join(unknown)}; known: {', '.join(ATTENTIONS)}")
    if args.result and len(args.attentions) != 1:
        p.error("--result measures one attention")
    args.attention = args.attentions[0]
    if args.smoke:
        args.batch, args.chunk_rows, args.steps, args.warmup = 4, 1, 2, 1
    return args


def main(argv: list[str] | None = None) -> list[dict] | dict:
    args = parse_args(argv)
    if not (args.estimate or args.result):
        results = run_suite(args, args.attentions, args.report)
        print(markdown(results, args))
        print(f"report: {args.report / 'gpu_step.md'}, {args.report / 'gpu_step.json'}")
        return results
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp), records=max(64, 4 * args.batch))
        config = bench_config(args, data)
        if args.estimate:
            mesh = tuple(int(x) for x in args.mesh.split(","))
            result = estimate(config, args.rows, args.chunk_rows, mesh)
            print(json.dumps(result, indent=2))
            return result
        return run(config, args, note=lambda r: write_atomically(args.result, json.dumps(r)))


def write_atomically(path: Path, text: str) -> None:
    """Readers (the suite, polling) see the old text or the new, never half of it."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    part.replace(path)


if __name__ == "__main__":
    out = main(sys.argv[1:])
    # The suite fails unless every implementation measured.
    sys.exit(isinstance(out, list) and any(r.get("status") != "ok" for r in out))
