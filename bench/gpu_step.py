"""The paper's training step on one accelerator: step time, real tokens/s and MFU.

    python bench/gpu_step.py [--attention block_sparse|xla|pallas|cudnn] [--batch 16] \
        [--chunk-rows 4]
    python bench/gpu_step.py --tiny            # the same code path, small model, on CPU, < 60 s
    python bench/gpu_step.py --estimate [--rows 32]   # AOT memory of the 7B step, nothing allocated

A random-initialised Mistral-7B-shaped decoder (`MISTRAL_7B_ARCH`; `--layers N` keeps the first N
layers if memory forces it), bf16 weights and compute, LoRA r64 / alpha 32 / dropout 0.1 on all
seven projections, full rematerialisation, the gradient cache (`--chunk-rows` rows per chunk), at
the paper's lengths (query 2048 with 0-5 in-context examples, passage 512, examples 256+256, group
8). Batches come from the real pipeline (sampling, templates, Mistral tokenizer, packing) over a
synthetic retrieval dataset with realistic lengths (queries of ~50-200 tokens, passages of
~150-500), so queries with examples run to ~1-2k tokens. Every batch is padded to one row count,
so the step compiles once (compile time is reported apart). The step is `train.make_train_step`,
the trainer's own. MFU uses `observe.flops_per_token` (4·N_base + 6·N_lora + attention at the
batches' real mean causal context) over the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_iclemb import parallel, train
from jax_iclemb.config import default_config, validate
from jax_iclemb.data.packing import pad_batch
from jax_iclemb.data.pipeline import pipeline_from_config
from jax_iclemb.model import TRAINABLE, ModelConfig, create_model, state_shardings
from jax_iclemb.model.block_sparse import pad_pairs
from jax_iclemb.observe import flops_per_token, peak_flops
from jax_iclemb.optim import make_optimizer

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
    if args.tiny:
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
    batches = [pad_batch(b, num_rows=rows, num_queries=queries, pad_id=pad_id) for b, _ in made]
    return batches, [info for _, info in made], chunks, len(pipeline.tokenizer)


def model_config_of(config: Any, vocab_size: int) -> ModelConfig:
    arch = dict(config.model.arch.to_dict(), vocab_size=vocab_size)
    return ModelConfig.from_hf(arch, **train.model_options(config))


def run(config: Any, args: argparse.Namespace) -> dict[str, Any]:
    mesh = parallel.make_mesh(config.train.mesh)
    shards = parallel.data_parallel_size(mesh)
    batches, infos, chunks, vocab = make_batches(
        config, args.warmup + args.steps, args.chunk_rows, shards
    )
    config.train.grad_cache_chunks = chunks
    with jax.set_mesh(mesh):
        model, model_config = train.build_model(config, mesh, vocab_size=vocab)
        graphdef, params, frozen = train.split_model(model)
        del model
        tx, schedule = make_optimizer(config.optim, 1000)
        state = train.initial_state(params, tx)
        # One tile count for all batches (block_sparse), so the step compiles once.
        tiles = [train.attention_tiles(config, b, chunks * shards) for b in batches]
        count = max((t.shape[1] for t in tiles if t is not None), default=0)
        num_blocks = config.data.pack_len // config.model.attention_block
        device_batches = [
            train.device_batch(mesh, b, None if t is None else pad_pairs(t, count, num_blocks))
            for b, t in zip(batches, tiles)
        ]
        step_fn = jax.jit(train.make_train_step(graphdef, config, tx, schedule), donate_argnums=0)
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, frozen, device_batches[0]).compile()
        compile_s = time.perf_counter() - t0
        times = []
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
    context = float(np.mean([mean_causal_context(b.segment_ids) for b in batches]))
    flops = flops_per_token(model_config, train.lora_config(config), mean_context=context)
    peak = peak_flops(jax.devices()[0]) * jax.device_count()
    tokens_per_s = tokens / seconds
    memory = compiled.memory_analysis()
    return {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "attention": config.model.attention_impl,
        "layers": model_config.num_layers,
        "scan_layers": model_config.scan_layers,
        "queries_per_step": config.data.batch_size,
        "rows": int(batches[0].num_rows),
        "chunks": chunks,
        "utilisation": float(np.mean([(b.segment_ids > 0).mean() for b in batches])),
        "mean_query_tokens_with_examples": _mean_query_tokens(batches),
        "mean_causal_context": context,
        "compile_s": compile_s,
        "step_s": seconds / len(times[measured]),
        "real_tokens_per_s": tokens_per_s,
        "tflop_per_token_model": flops / 1e12,
        "mfu": tokens_per_s * flops / peak if peak else None,
        "temp_gib": _gib(getattr(memory, "temp_size_in_bytes", 0)),
        "argument_gib": _gib(getattr(memory, "argument_size_in_bytes", 0)),
        "last_loss": loss,
    }


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
    lora = train.lora_config(config)
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
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt": opt}
    length, segments = int(config.data.pack_len), int(config.data.max_segments_per_row)
    b, g = int(config.data.batch_size), int(config.data.train_group_size)

    def sds(shape, dtype, row_sharded=False):
        axes = ("batch",) + (None,) * (len(shape) - 1) if row_sharded else (None,) * len(shape)
        return jax.ShapeDtypeStruct(
            shape, dtype, sharding=parallel.named_sharding(mesh, axes, shape)
        )

    batch = {
        "tokens": sds((rows, length), jnp.int32, True),
        "segment_ids": sds((rows, length), jnp.int32, True),
        "positions": sds((rows, length), jnp.int32, True),
        "last_index": sds((rows, segments), jnp.int32, True),
        "query_slot": sds((b,), jnp.int32), "passage_slot": sds((b, g), jnp.int32),
        "passage_mask": sds((b, g), jnp.bool_), "teacher_scores": sds((b, g), jnp.float32),
        "has_teacher": sds((b,), jnp.bool_), "in_batch_negatives": sds((), jnp.bool_),
        "query_label": sds((b,), jnp.int32), "passage_label": sds((b, g), jnp.int32),
    }
    if config.model.attention_impl == "block_sparse":
        # Tile lists per (data shard, chunk) group, at `tiles_per_row` tiles per row.
        groups = chunks * shards
        tiles = rows // groups * tiles_per_row
        batch["block_pairs"] = sds((groups, tiles, 3), jnp.int32, True)
    with jax.set_mesh(mesh):
        step_fn = jax.jit(train.make_train_step(graphdef, config, tx, schedule), donate_argnums=0)
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--attention", default="block_sparse", choices=("block_sparse", "xla", "pallas", "cudnn")
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
    p.add_argument("--tiny", action="store_true", help="small model and lengths, on CPU")
    p.add_argument("--estimate", action="store_true", help="AOT memory only, on abstract inputs")
    p.add_argument("--rows", type=int, default=32, help="--estimate: rows of 2048 in the step")
    p.add_argument(
        "--mesh", default="1,1,1",
        help="--estimate: data,fsdp,tensor (emulate devices with XLA_FLAGS on CPU)",
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.chunk_rows, args.steps, args.warmup = 4, 1, 2, 1
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_data(Path(tmp), records=max(64, 4 * args.batch))
        config = bench_config(args, data)
        if args.estimate:
            mesh = tuple(int(x) for x in args.mesh.split(","))
            result = estimate(config, args.rows, args.chunk_rows, mesh)
        else:
            result = run(config, args)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
