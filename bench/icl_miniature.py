"""ICL in miniature: does training with in-context examples make the embedder use them?

    python bench/icl_miniature.py [--seeds 0 1 2] [--steps 6000] [--root /tmp/icl_miniature] \
        [--config.KEY=VALUE ...]

Trains model A (0-5 examples per query, configs/icl_miniature.py) and control B (no examples,
`data.max_examples=0`) with the same seeds and budget through the normal CLI, then evaluates both
with `Embedder` on the held-out evaluation sets: top-1 accuracy of the positive among 1 positive + 7
hard negatives (chance 0.125), zero-shot and with k = 1, 3, 5 examples of the same task. Writes
`<root>/results-steps<N>.json`, the results table into docs/icl_miniature.md (between the
markers) and docs/icl_miniature.png. A finished run (final checkpoint present) is evaluated,
not retrained.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "icl_miniature.py"
DOC = REPO / "docs" / "icl_miniature.md"
PLOT = REPO / "docs" / "icl_miniature.png"
SHOTS = (0, 1, 3, 5)
MODELS = {"A": 5, "B": 0}  # model -> data.max_examples
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


# ----------------------------------------------------------------------------- training


def train(
    workdir: Path, *, seed: int, steps: int, max_examples: int, extra: Sequence[str]
) -> float:
    """Train one model through the CLI unless its final checkpoint exists; the wall seconds of
    the training (stored beside it, so a re-run reports the original time)."""
    timing = workdir / "bench_wall.json"
    if (workdir / "checkpoints" / str(steps)).is_dir() and timing.is_file():
        return float(json.loads(timing.read_text())["seconds"])
    cmd = [
        sys.executable, "-m", "jax_iclemb.train",
        "--config", str(CONFIG), "--workdir", str(workdir),
        f"--config.seed={seed}", f"--config.train.steps={steps}",
        f"--config.data.max_examples={max_examples}", *extra,
    ]
    t0 = time.perf_counter()
    with open(workdir.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    timing.write_text(json.dumps({"seconds": seconds}))
    return seconds


# ----------------------------------------------------------------------------- evaluation


def top1(queries: np.ndarray, passages: np.ndarray) -> float:
    """queries [N, D], passages [N, G, D] with the positive first: the fraction of queries whose
    positive scores strictly above every negative (a tie counts as a miss)."""
    scores = np.einsum("nd,ngd->ng", queries, passages)
    return float(np.mean(scores[:, 0] > scores[:, 1:].max(axis=1)))


def evaluate(workdir: Path, eval_sets: dict[str, dict], shots: Sequence[int] = SHOTS) -> dict:
    """{task: {str(k): top-1 accuracy}} of a trained workdir (string keys, as in JSON)."""
    from jax_iclemb.data.icl import encode_inference_query
    from jax_iclemb.embedder import Embedder

    emb = Embedder.from_pretrained(workdir, progress=False)
    out: dict[str, dict[str, float]] = {}
    for task, data in eval_sets.items():
        items = data["items"]
        texts = [t for it in items for t in (it["pos"], *it["neg"])]
        passages = emb.encode_corpus(texts)
        passages = passages.reshape(len(items), -1, passages.shape[-1])
        out[task] = {}
        for k in shots:
            # Each query gets its own k examples (held-out items of the task), so the accuracy
            # averages over example choices instead of hanging on one fixed set.
            ids = [
                encode_inference_query(
                    emb.tokenizer, it["query"], instruction=data["instruction"],
                    examples=it["examples"][:k], max_len=emb.query_max_len,
                )
                for it in items
            ]
            out[task][str(k)] = top1(emb.encode_ids(ids), passages)
    return out


# ----------------------------------------------------------------------------- reporting


def mean_over_tasks(acc: dict[str, dict[str, float]], k: int) -> float:
    return float(np.mean([per_k[str(k)] for per_k in acc.values()]))


def gaps(results: dict, seed: str) -> tuple[float, float]:
    """(A k=5 - A k=0, A k=5 - best B over k) of the task means of one seed."""
    a, b = results["A"][seed]["accuracy"], results["B"][seed]["accuracy"]
    a5 = mean_over_tasks(a, 5)
    return a5 - mean_over_tasks(a, 0), a5 - max(mean_over_tasks(b, k) for k in SHOTS)


def markdown(results: dict, steps: int) -> str:
    tasks = sorted(next(iter(results["A"].values()))["accuracy"])
    seeds = sorted(set(results["A"]) & set(results["B"]), key=int)
    lines = [
        f"Steps per model: {steps}. Top-1 among 1 positive + 7 hard negatives, "
        f"{len(tasks)} tasks × 256 held-out queries; chance 0.125.",
        "",
        "Mean over tasks, per seed:",
        "",
        "| model | seed | " + " | ".join(f"k={k}" for k in SHOTS) + " | train wall (s) |",
        "|---|---|" + "---|" * len(SHOTS) + "---|",
    ]
    for model in MODELS:
        for seed in sorted(results[model], key=int):
            run = results[model][seed]
            cells = " | ".join(f"{mean_over_tasks(run['accuracy'], k):.3f}" for k in SHOTS)
            lines.append(f"| {model} | {seed} | {cells} | {run['wall_seconds']:.0f} |")
    lines += ["", "Mean ± spread (min–max over seeds) of the task means:", ""]
    lines += ["| model | " + " | ".join(f"k={k}" for k in SHOTS) + " |"]
    lines += ["|---|" + "---|" * len(SHOTS)]
    for model in MODELS:
        cells = []
        for k in SHOTS:
            v = [mean_over_tasks(r["accuracy"], k) for r in results[model].values()]
            cells.append(f"{np.mean(v):.3f} ({min(v):.3f}–{max(v):.3f})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "Per task (rows: model, seed; cells: k=0 / 1 / 3 / 5):", ""]
    lines += ["| model | seed | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for model in MODELS:
        for seed in sorted(results[model], key=int):
            acc = results[model][seed]["accuracy"]
            cells = [" / ".join(f"{acc[t][str(k)]:.2f}" for k in SHOTS) for t in tasks]
            lines.append(f"| {model} | {seed} | " + " | ".join(cells) + " |")
    if seeds:
        lines += ["", "Gaps per seed (goal: both ≥ 0.25):", ""]
        lines += ["| seed | A k=5 − A k=0 | A k=5 − B best k |", "|---|---|---|"]
        for seed in seeds:
            zero, control = gaps(results, seed)
            lines.append(f"| {seed} | {zero:+.3f} | {control:+.3f} |")
    return "\n".join(lines)


def write_doc(table: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise ValueError(f"{DOC} lacks the {BEGIN} / {END} markers")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}", encoding="utf-8")


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for model, colour in zip(MODELS, ("tab:blue", "tab:orange")):
        for run in results[model].values():
            ys = [mean_over_tasks(run["accuracy"], k) for k in SHOTS]
            ax.plot(SHOTS, ys, "o-", color=colour, alpha=0.35, lw=1)
        means = [
            np.mean([mean_over_tasks(r["accuracy"], k) for r in results[model].values()])
            for k in SHOTS
        ]
        label = "A: trained with 0–5 examples" if model == "A" else "B: trained without"
        ax.plot(SHOTS, means, "o-", color=colour, lw=2.5, label=label)
    ax.axhline(0.125, color="grey", ls="--", lw=1, label="chance")
    ax.set(xlabel="in-context examples at test time (k)", ylabel="top-1 (mean of 4 tasks)",
           xticks=SHOTS, ylim=(0, 1), title="ICL in miniature (thin: seeds, thick: mean)")
    ax.legend(loc="center right", bbox_to_anchor=(1.0, 0.34), fontsize=8)  # between A and B
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--root", type=Path, default=Path("/tmp/icl_miniature"))
    parser.add_argument("--no-doc", action="store_true", help="skip docs/ table and plot")
    parser.add_argument(
        "--report-only", action="store_true",
        help="only write docs/ from the results file (e.g. after per-seed runs with --no-doc)",
    )
    # Anything else must be a --config.KEY=VALUE override, passed on to training.
    args, overrides = parser.parse_known_args(argv)
    bad = [a for a in overrides if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from jax_iclemb.data import miniature

    eval_sets = miniature.load_eval(miniature.miniature_dir())
    args.root.mkdir(parents=True, exist_ok=True)
    results_file = args.root / f"results-steps{args.steps}.json"
    for seed in [] if args.report_only else args.seeds:
        for model in args.models:
            workdir = args.root / f"{model}-seed{seed}-steps{args.steps}"
            wall = train(workdir, seed=seed, steps=args.steps, max_examples=MODELS[model],
                         extra=overrides)
            acc = evaluate(workdir, eval_sets)
            # Re-read: several bench processes (one per seed or model) may share the file.
            results = json.loads(results_file.read_text()) if results_file.is_file() else {}
            results.setdefault(model, {})[str(seed)] = {"accuracy": acc, "wall_seconds": wall}
            results_file.write_text(json.dumps(results, indent=1))
            print(f"{model} seed {seed}: " + ", ".join(
                f"k={k} {mean_over_tasks(acc, k):.3f}" for k in SHOTS), flush=True)
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if not args.no_doc and all(results.get(m) for m in MODELS):
        write_doc(markdown(results, args.steps))
        plot(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
