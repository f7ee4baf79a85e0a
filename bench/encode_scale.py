"""Encode scale: host memory and throughput of `python -m jax_iclemb.encode` vs corpus size.

    python bench/encode_scale.py [--sizes 10000,100000,1000000] [--out DIR] [--model PATH]
    python bench/encode_scale.py --quick           # 1k and 5k passages

Writes synthetic BEIR-format corpora (passages of 20-60 random English words, ids `d<i>`), then
encodes each one with the CLI in a fresh subprocess and reports its peak resident memory (the
child's own ru_maxrss, from wait4), its RSS half-way through the run, its wall time, and texts/s
both end to end and marginal (the extra texts over the extra seconds against the smallest size,
which takes out the start-up: importing JAX, loading the model, compiling). Host memory should not
grow with the corpus: the input is streamed and at most one shard of embeddings is held.
Without `--model` a random-init workdir is trained for one step from configs/tiny.py, made smaller
still (2 layers, hidden 64): this measures the command's host side, not a model's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pipeline_scale import WORDS

REPO = Path(__file__).resolve().parents[1]
SMALL = (  # configs/tiny.py, smaller: the bench times the command, not the decoder
    "--config.model.arch.num_hidden_layers=2", "--config.model.arch.hidden_size=64",
    "--config.model.arch.intermediate_size=128", "--config.model.arch.head_dim=16",
    "--config.train.steps=1",
)


def write_corpus(path: Path, count: int, seed: int = 0) -> Path:
    """`count` passages {"_id", "title", "text"} (reused if the file is there)."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    pool = [" ".join(rng.choice(WORDS, size=int(n))) for n in rng.integers(20, 61, size=8192)]
    pool = [json.dumps(p) for p in pool]
    temp = path.with_suffix(".tmp")
    with temp.open("w") as f:
        for start in range(0, count, 50_000):
            pick = rng.integers(len(pool), size=min(50_000, count - start))
            f.writelines(
                f'{{"_id": "d{start + i}", "title": "", "text": {pool[p]}}}\n'
                for i, p in enumerate(pick)
            )
    temp.rename(path)
    return path


def make_workdir(path: Path) -> Path:
    if not (path / "checkpoints").is_dir():
        subprocess.run(
            [sys.executable, "-m", "jax_iclemb.train", "--config",
             str(REPO / "configs" / "tiny.py"), "--workdir", str(path), *SMALL],
            check=True, cwd=REPO,
        )
    return path


def rss_mb(pid: int) -> float | None:
    """VmRSS of a running process, or None once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(x.split()[1]) / 1024 for x in status.splitlines() if x.startswith("VmRSS:")),
                None)


def encode(model: Path, corpus: Path, out: Path, shard_size: int, dtype: str) -> dict:
    """One CLI run in a fresh process: its wall time, its own peak RSS, and its RSS half-way
    (peak well above half-way would mean memory grows while encoding)."""
    cmd = [sys.executable, "-m", "jax_iclemb.encode", "--model", str(model), "--input",
           str(corpus), "--out", str(out), "--shard-size", str(shard_size), "--dtype", dtype,
           "--overwrite"]
    log = out.with_suffix(".log")
    samples: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # this child's rusage alone
            if pid:
                break
            if (rss := rss_mb(proc.pid)) is not None:
                samples.append((time.perf_counter() - t0, rss))
            time.sleep(0.5)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"encode failed: {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    half = next((rss for t, rss in samples if t >= seconds / 2), float("nan"))
    store_mb = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    return {"wall_s": seconds, "rss_half_way_mb": half, "peak_rss_mb": usage.ru_maxrss / 1024,
            "store_mb": store_mb}


def table(results: list[dict]) -> str:
    base = results[0]
    rows = [
        "| passages | wall (s) | texts/s end to end | texts/s marginal | RSS half-way (MB) "
        "| peak RSS (MB) | store (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        extra_s = r["wall_s"] - base["wall_s"]
        marginal = f"{(r['passages'] - base['passages']) / extra_s:,.0f}" if extra_s > 0 else "-"
        rows.append(
            f"| {r['passages']:,} | {r['wall_s']:.1f} | {r['passages'] / r['wall_s']:,.0f} | "
            f"{marginal} | {r['rss_half_way_mb']:,.0f} | {r['peak_rss_mb']:,.0f} | "
            f"{r['store_mb']:,.1f} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="passages per run")
    parser.add_argument("--out", default=None, help="corpora, stores, workdir (default: a tmp dir)")
    parser.add_argument("--model", default=None, help="default: a tiny random-init workdir")
    parser.add_argument("--shard-size", type=int, default=50_000)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--quick", action="store_true", help="sizes 1k and 5k")
    args = parser.parse_args(argv)
    sizes = [1000, 5000] if args.quick else [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="encode_scale_") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model = Path(args.model) if args.model else make_workdir(root / "workdir")
        results = []
        for size in sizes:
            corpus = write_corpus(root / f"corpus-{size}.jsonl", size)
            result = {"passages": size, **encode(
                model, corpus, root / f"store-{size}", args.shard_size, args.dtype
            )}
            print(json.dumps(result), flush=True)
            results.append(result)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
