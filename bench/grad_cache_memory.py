"""Peak memory of the training step vs global batch, without and with the gradient cache.

    python bench/grad_cache_memory.py [--rows 4 8 16 32 64] [--chunk-rows 4] [--remat full]

For each global batch of R packed rows, the trainer's step (`train_step.make_train_step`) is
compiled ahead of time on abstract inputs (nothing is allocated) once with `grad_cache_chunks = 1`
and once with C = R / chunk_rows, and XLA's `memory_analysis()` gives the temporary (activations
and other scratch) and argument bytes. Model: a small Mistral-shaped decoder (hidden 512, 4
layers, 8 heads / 4 KV heads, MLP 1536, vocab 32003), fp32, LoRA r16 on all projections, rows of
512 tokens, one query and 3 passages per row. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys

import jax
from gpu_step import estimate  # bench/ is the script's folder, so it is on sys.path

from jax_iclemb.config import default_config


def small_config(remat: str):
    c = default_config()
    c.model.arch.update(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, vocab_size=32000,
    )
    c.model.dtype = c.model.param_dtype = "float32"
    c.model.remat = remat
    c.lora.rank, c.lora.alpha = 16, 32.0
    c.data.query_max_len, c.data.passage_max_len, c.data.pack_len = 512, 128, 512
    c.data.max_segments_per_row = 16
    c.data.train_group_size = 3
    return c


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--chunk-rows", type=int, default=4)
    p.add_argument("--remat", default="full", choices=("none", "full", "dots", "dots_no_batch"))
    args = p.parse_args(argv)
    mib = lambda gib: f"{gib * 1024:,.0f}"
    lines = [
        f"backend {jax.default_backend()}, remat {args.remat}, chunk = {args.chunk_rows} rows "
        "of 512 tokens",
        "",
        "| rows (tokens) | temp MiB, C=1 | temp MiB, grad cache (C) | arguments MiB |",
        "|---|---|---|---|",
    ]
    for rows in args.rows:
        config = small_config(args.remat)
        config.data.batch_size = rows
        plain = estimate(config, rows, chunk_rows=0)
        cached = estimate(config, rows, chunk_rows=args.chunk_rows)
        lines.append(
            f"| {rows} ({rows * 512:,}) | {mib(plain['temp_gib'])} | "
            f"{mib(cached['temp_gib'])} ({cached['chunks']}) | {mib(plain['argument_gib'])} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
