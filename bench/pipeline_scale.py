"""Pipeline scale: host memory and single-core throughput of `TrainPipeline` vs dataset size.

    python bench/pipeline_scale.py [--out DIR] [--sizes 10000,100000,1000000] [--batches 20]
    python bench/pipeline_scale.py --quick          # small sizes, a few batches, < 60 s

Writes synthetic reference-format JSONL datasets (each size split over `--datasets` files;
records of realistic size: a ~20-token query, 1 positive and 7 hard negatives of ~60 tokens), then,
for every size in a fresh subprocess pinned to one core, opens them with `open_datasets`, builds the
`TrainPipeline` (real Mistral tokenizer, paper lengths, group 8) and produces `--batches` batches.
It reports resident memory (VmRSS) after opening and after the batches, and queries/s (each query
with its 8 passages and 0-5 in-context examples) on that one core. Memory should grow with the data
only through the per-record index (8-byte offsets, plus the epoch's 8-byte record permutation).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Plain lower-case English words: they tokenize like real text (~1.3 Mistral tokens a word).
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her an which were are this be "
    "has had have not first one their its new after who they two also been more other all into "
    "time only year city school water people world during state between many most some system "
    "used under then such about over when would where while three these part known later them "
    "early made small since house river music family energy history number second south north "
    "team season game film album song party market company process support service report area "
    "united national general public local health power light human cell protein blood heart "
    "treatment disease patient study research result effect level change rate average cost price "
    "tax income money bank loan credit account insurance policy law court case right form field "
    "value point line data model method design program software network computer device phone "
    "engine vehicle road travel island mountain coast weather climate temperature summer winter "
    "food plant animal species forest garden tree flower fruit coffee sugar salt chicken recipe"
)
WORDS = _WORD_TEXT.split()

QUERY_WORDS, PASSAGE_WORDS, NEGATIVES = 15, 46, 7


def _sentences(rng: np.random.Generator, count: int, words: int) -> list[str]:
    ids = rng.integers(len(WORDS), size=(count, words))
    return [" ".join(WORDS[i] for i in row) for row in ids]


def write_dataset(path: Path, records: int, seed: int) -> None:
    """`records` JSONL lines composed from pools of random sentences (fast: no json.dumps)."""
    rng = np.random.default_rng(seed)
    queries = _sentences(rng, 4096, QUERY_WORDS)
    passages = [json.dumps(p) for p in _sentences(rng, 16384, PASSAGE_WORDS)]
    chunk = 50_000
    with path.open("w") as f:
        for start in range(0, records, chunk):
            n = min(chunk, records - start)
            q = rng.integers(len(queries), size=n)
            p = rng.integers(len(passages), size=(n, 1 + NEGATIVES))
            lines = [
                f'{{"query": "{queries[q[i]]} {start + i}?", "pos": [{passages[p[i, 0]]}], '
                f'"neg": [{", ".join(passages[j] for j in p[i, 1:])}]}}\n'
                for i in range(n)
            ]
            f.writelines(lines)


def write_data(root: Path, total: int, num_datasets: int) -> Path:
    """A directory of `num_datasets` JSONL files holding `total` records (reused if present)."""
    target = root / f"records-{total}"
    done = target / "DONE"
    if done.is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    per = total // num_datasets
    for d in range(num_datasets):
        write_dataset(target / f"task{d}.jsonl", per + (d < total % num_datasets), seed=d)
    done.write_text("ok\n")
    return target


def _rss_mb() -> float:
    """Current resident set size (VmRSS) in MB, after handing free heap pages back to the OS
    (without the trim, new arrays reuse pages freed by the tokenizer's loading and hide growth)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(data_dir: Path, batches: int, batch_size: int) -> dict:
    """One size, in this (fresh, one-core) process: memory and throughput."""
    os.sched_setaffinity(0, {0})
    from jax_iclemb.config import default_config
    from jax_iclemb.data.pipeline import DataConfig, TrainPipeline
    from jax_iclemb.data.sources import open_datasets
    from jax_iclemb.data.tokenizer import load_tokenizer

    data = default_config().data  # paper lengths: 2048 / 512 / 256 / 256, group 8, 0-5 examples
    data.batch_size = batch_size
    tokenizer = load_tokenizer(data.tokenizer)
    rss_base = _rss_mb()
    t0 = time.perf_counter()
    datasets = open_datasets(str(data_dir))
    open_s = time.perf_counter() - t0
    pipeline = TrainPipeline(DataConfig.from_section(data), tokenizer, datasets, seed=0)
    rss_open = _rss_mb()
    pipeline.batch(0)  # warm-up: first-use allocations of the tokenizer and numpy
    rss_first = _rss_mb()
    queries = passages = real = slots = 0
    t0 = time.perf_counter()
    for step in range(1, batches + 1):
        batch, info = pipeline.batch(step)
        queries += info["num_queries"]
        passages += info["num_passages"]
        real += info["real_tokens"]
        slots += batch.tokens.size
    seconds = time.perf_counter() - t0
    return {
        "records": sum(len(d) for d in datasets),
        "index_mb": sum(d.offsets.nbytes for d in datasets) / 2**20,
        "datasets": len(datasets),
        "open_s": open_s,
        "rss_base_mb": rss_base,
        "rss_open_mb": rss_open,
        "rss_first_batch_mb": rss_first,
        "rss_end_mb": _rss_mb(),
        "batches": batches,
        "queries_per_s": queries / seconds,
        "tokens_per_s": real / seconds,
        "ms_per_batch": 1000 * seconds / batches,
        "tokens_per_query": real / queries,
        "tokens_per_sequence": real / (queries + passages),
        "utilisation": real / slots,
    }


def run_subprocess(data_dir: Path, batches: int, batch_size: int) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--measure", str(data_dir),
           "--batches", str(batches), "--batch-size", str(batch_size)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    base = results[0]
    head = (
        "| records | open (s) | RSS opened (MB) | RSS after batches (MB) | Δ RSS vs smallest (MB) "
        "| Δ bytes/record | offset index (MB) | queries/s (1 core) | ms/batch | tokens/s "
        "| tokens/seq |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in results:
        grow = r["rss_end_mb"] - base["rss_end_mb"]
        extra = r["records"] - base["records"]
        per = f"{grow * 2**20 / extra:.1f}" if extra else "-"
        rows.append(
            f"| {r['records']:,} | {r['open_s']:.1f} | {r['rss_open_mb']:.0f} | "
            f"{r['rss_end_mb']:.0f} | {grow:+.1f} | {per} | {r['index_mb']:.1f} | "
            f"{r['queries_per_s']:.1f} | "
            f"{r['ms_per_batch']:.0f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_sequence']:.0f} |"
        )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="where to write the data (default: a tmp dir)")
    parser.add_argument("--sizes", default="10000,100000,1000000", help="records per size")
    parser.add_argument("--datasets", type=int, default=4, help="JSONL files per size")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="sizes 1k/10k, 3 batches (< 60 s)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.batches, args.batch_size)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.batches = [1000, 10000], 3
    with tempfile.TemporaryDirectory(prefix="pipeline_scale_") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        results = []
        for size in sizes:
            t0 = time.perf_counter()
            data_dir = write_data(root, size, args.datasets)
            print(f"{size:,} records in {data_dir} ({time.perf_counter() - t0:.1f} s)", flush=True)
            results.append(run_subprocess(data_dir, args.batches, args.batch_size))
            print(json.dumps(results[-1]), flush=True)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
