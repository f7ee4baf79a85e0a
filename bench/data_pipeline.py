"""Data pipeline benchmark: token utilisation of packing vs per-batch padding, and examples/s.

    taskset -c 0 python bench/data_pipeline.py [--data builtin|DIR] [--batch 10] [--tile 1]
        [--segments 32] [--epochs 20]

Paper lengths (query 2048, passage 512, examples 256 + 256, group 8). `--data`: the built-in data
(default) or a folder of reference-format JSONL tasks, e.g. the 10-record ones of `tests/data`.
`--tile N` repeats every dataset's records N times (as distinct records) to reach paper-sized
batches from a small sample. The reference pads each step's queries to its longest query and
passages to its longest passage; that utilisation is computed from the same token sequences.
Run single-threaded (taskset + the thread variables set below) to measure one core.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import platform
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from jax_iclemb.config import default_config
from jax_iclemb.data.pipeline import DataConfig, TrainPipeline
from jax_iclemb.data.sources import open_datasets
from jax_iclemb.data.tokenizer import load_tokenizer


@dataclasses.dataclass
class Tiled:
    """A dataset whose records are repeated `times` times (same protocol as records.Dataset)."""

    inner: object
    times: int

    def __post_init__(self):
        self.name = self.inner.name
        self.in_batch_negatives = self.inner.in_batch_negatives

    def __len__(self):
        return len(self.inner) * self.times

    def __getitem__(self, index):
        return self.inner[index % len(self.inner)]


def lengths(batch, slots):
    r, s = np.divmod(np.asarray(slots).ravel(), batch.max_segments)
    last = batch.last_index[r, s]
    return last - np.array([np.argmax(batch.segment_ids[i] == j + 1) for i, j in zip(r, s)]) + 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="builtin", help="builtin, or a folder of JSONL tasks")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--tile", type=int, default=1)
    parser.add_argument("--segments", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    # The paper's lengths and group size (the config defaults).
    cfg = dataclasses.replace(
        DataConfig.from_section(default_config().data),
        batch_size=args.batch, max_segments_per_row=args.segments, default_prompt="",
    )
    datasets = [Tiled(d, args.tile) for d in open_datasets(args.data)]
    pipe = TrainPipeline(cfg, load_tokenizer("mistral-7b-v0.1"), datasets, seed=0)
    steps = pipe.steps_per_epoch * args.epochs

    real = collections.Counter()
    packed = collections.Counter()
    used = collections.Counter()
    padded = collections.Counter()
    queries = 0
    pipe.batch(0)  # warm caches outside the timing
    start = time.perf_counter()
    batches = []
    for step in range(steps):
        batch, info = pipe.batch(step)
        batches.append((batch, info))
        queries += info["num_queries"]
    elapsed = time.perf_counter() - start
    for batch, info in batches:
        name = info["dataset"]
        q = lengths(batch, batch.query_slot)
        p = lengths(batch, batch.passage_slot[batch.passage_mask])
        real[name] += info["real_tokens"]
        packed[name] += batch.tokens.size
        used[name] += info["rows_used"] * batch.tokens.shape[1]
        padded[name] += len(q) * q.max() + len(p) * p.max()

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, affinity {sorted(os.sched_getaffinity(0))}"
    )
    print(
        f"batch {args.batch}, tile {args.tile}, max_segments_per_row {args.segments}, {steps} steps"
    )
    print("| dataset | packed (bucketed rows) | packed (rows used) | reference padding |")
    print("|---|---|---|---|")
    for name in sorted(real):
        print(
            f"| {name} | {real[name] / packed[name]:.1%} | {real[name] / used[name]:.1%} "
            f"| {real[name] / padded[name]:.1%} |"
        )
    total = sum(real.values())
    print(
        f"| all (token-weighted) | {total / sum(packed.values()):.1%} "
        f"| {total / sum(used.values()):.1%} | {total / sum(padded.values()):.1%} |"
    )
    print(
        f"pipeline: {queries / elapsed:.0f} examples/s (query + 8 passages each), "
        f"{elapsed / steps * 1e3:.1f} ms/step"
    )


if __name__ == "__main__":
    main()
