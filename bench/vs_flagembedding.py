"""jax_iclemb's trainer against the paper's reference trainer (FlagEmbedding 1.4.2), each through
its own command line, and against "the PyTorch way" (transformers + peft), on the same work, in
one run.

    python bench/vs_flagembedding.py                       # built-in data, batch 8, 30 steps
    python bench/vs_flagembedding.py --data DIR --tile 4 --batch 32 --append docs/benchmarks.md
    python bench/vs_flagembedding.py --only jax            # rerun one side, keep the other's

Both sides train a random Mistral-shaped decoder (hidden 256, MLP 704, 4 layers, 8 heads / 4 KV
heads, head 32, fp32, vocab 32003 = Mistral-7B-v0.1's tokenizer + `<instruct>`, `<query>`,
`<response>`) with LoRA r64 / alpha 32 / dropout 0.1 on all 7 projections, group 8, `--batch`
queries a step (symmetric tasks half, as the reference does), `--steps` steps, on a scratch copy of
the same reference-format task folders. The reference runs `python -m
FlagEmbedding.finetune.embedder.decoder_only.icl` in a pinned venv of its own (built here on first
use) under a small launcher that counts the tokens reaching its model and times each step; ours
runs `python -m jax_iclemb.train` with an empty compilation cache, so compiles are counted. The
PyTorch way (`bench/torch_reference.py`: transformers `MistralModel` + peft LoRA, left-padded
eager batches, in this venv) trains on our pipeline's token sequences of the same steps; it times
its forward, backward and update only (no batch building), which favours it. Each side runs under
`/usr/bin/time -v`. Prints a Markdown report (`--append FILE`, `--json FILE`).

`--device cuda` runs all three on the GPU (the reference without `--use_cpu`, ours on JAX's GPU
backend, the PyTorch way with `--device cuda`), every side at full fp32 matmul precision
(PyTorch's default; ours with `JAX_DEFAULT_MATMUL_PRECISION=highest`, since JAX would otherwise
use TF32). `--flag-python` names an interpreter that already has FlagEmbedding 1.4.2 (on a
machine without a package index, say); its versions are reported instead of pinned.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata, resources
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

FLAG_VERSION = "1.4.2"
FLAG_MODULE = "FlagEmbedding.finetune.embedder.decoder_only.icl"
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build. FlagEmbedding 1.4.2 does
# not import with transformers 5 (it imports transformers.modeling_attn_mask_utils).
TORCH_PIN = "torch==2.13.0"
FLAG_PINS = (
    TORCH_PIN,
    f"flagembedding=={FLAG_VERSION}",
    "transformers==4.57.6",
    "tokenizers==0.22.2",
    "huggingface_hub==0.36.2",
    "peft==0.21.2",
    "accelerate==1.15.0",
    "datasets==5.0.1",
    "sentence-transformers==5.7.0",
    "sentencepiece==0.2.3",
    "protobuf==7.36.2",
    "numpy==2.4.6",
)
ICL_TOKENS = ("<instruct>", "<query>", "<response>")
ARCH = {
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 4096,
}
LORA = {"rank": 64, "alpha": 32, "dropout": 0.1}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP = 8
TEMPERATURE = 0.02
LR = 1e-4
WARMUP_RATIO = 0.1
RETRIEVAL_INSTRUCTION = "Given a query, retrieve passages that are relevant to the query."
# Our side's environment per --device: on CPU, JAX kept off any GPU the machine has; on a GPU,
# fp32 matmuls at full precision as PyTorch does by default (JAX's default there is TF32).
JAX_DEVICE_ENV = {"cpu": {"JAX_PLATFORMS": "cpu"},
                  "cuda": {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}}

SIDES = {
    "flag": f"FlagEmbedding {FLAG_VERSION} (PyTorch)",
    "jax": "jax_iclemb",
    "jax_warm": "jax_iclemb, warm compile cache",
    "torch": "PyTorch way (transformers + peft)",
}

# ---------------------------------------------------------------------------------------------
# Code run by the reference venv's python (it cannot import this file: no jax_iclemb there)
# ---------------------------------------------------------------------------------------------

# Runs the reference module as __main__, unmodified. Its Trainer.train is wrapped only to attach
# a forward pre-hook (what reaches the model: real tokens = attention masks, slots = their sizes)
# and a TrainerCallback (when each optimizer step begins and ends) to the objects it builds.
FLAG_LAUNCHER = r'''
import json, os, platform, re, runpy, sys, time
from importlib import metadata

import torch
import transformers

MODULE = "FlagEmbedding.finetune.embedder.decoder_only.icl"
OUT = os.environ["VS_FLAG_MEASURE"]
# task name -> its instruction; a step's task is the one whose instruction its query holds (white
# space dropped: the reference's decode/encode round trips move spaces around special tokens).
PROMPTS = [(re.sub(r"\s+", "", p), name)
           for name, p in json.loads(os.environ.get("VS_FLAG_TASKS", "{}")).items()]
clock = time.perf_counter
record = {"process_start": clock(), "train_begin": None, "train_end": None, "steps": [],
          "losses": []}
pending = {}


def reset():
    pending.update(real=0, slots=0, queries=0, passages=0, forwards=0, no_in_batch_neg=False,
                   task="?")


def task_of(tokenizer, queries):
    first = queries[0] if isinstance(queries, list) else queries
    ids = first["input_ids"][0][first["attention_mask"][0].bool()]
    text = re.sub(r"\s+", "", tokenizer.decode(ids))
    found = sorted((len(k), name) for k, name in PROMPTS if k and k in text)
    longest = [name for n, name in found if n == found[-1][0]] if found else ["?"]
    return " or ".join(longest)


def count(features, key):
    for part in features if isinstance(features, list) else [features]:  # list: sub-batches
        mask = part["attention_mask"]
        pending["real"] += int(mask.sum())
        pending["slots"] += int(mask.numel())
        pending[key] += int(mask.shape[0])


def pre_hook(module, args, kwargs):
    if module.training:
        count(kwargs["queries"], "queries")
        count(kwargs["passages"], "passages")
        pending["forwards"] += 1
        pending["no_in_batch_neg"] = bool(kwargs.get("no_in_batch_neg_flag", False))
        pending["task"] = task_of(module.tokenizer, kwargs["queries"])


class Timer(transformers.TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        record["train_begin"] = clock()

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = clock()

    def on_step_end(self, args, state, control, **kwargs):
        record["steps"].append(dict(step=state.global_step, t_begin=self.t0, t_end=clock(),
                                    **pending))
        reset()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            record["losses"].append(float(logs["loss"]))

    def on_train_end(self, args, state, control, **kwargs):
        record["train_end"] = clock()


original_train = transformers.Trainer.train


def train(self, *args, **kwargs):
    self.add_callback(Timer())
    self.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return original_train(self, *args, **kwargs)


reset()
transformers.Trainer.train = train
sys.argv = [MODULE, *sys.argv[1:]]
runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
record["process_end"] = clock()
record["torch_threads"] = torch.get_num_threads()
record["python"] = platform.python_version()
record["versions"] = {
    n: metadata.version(n)
    for n in ("FlagEmbedding", "torch", "transformers", "peft", "accelerate", "datasets",
              "tokenizers", "numpy")
}
with open(OUT, "w") as f:
    json.dump(record, f)
'''

# The reference side's model: an HF folder (config, converted tokenizer with the ICL tokens, pad =
# unk, left padding; fp32 weights from torch.manual_seed(0)).
MODEL_BUILDER = r'''
import json, shutil, sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

out, tokenizer_model = Path(sys.argv[1]), sys.argv[2]
arch, special = json.loads(sys.argv[3]), json.loads(sys.argv[4])


def config(vocab):
    return MistralConfig(vocab_size=vocab, rms_norm_eps=1e-5, rope_theta=1e4, sliding_window=4096,
                         hidden_act="silu", tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, torch_dtype="float32", **arch)


# config.json first: AutoTokenizer reads the model type from it to pick the Llama converter.
config(32000).save_pretrained(out)
shutil.copyfile(tokenizer_model, out / "tokenizer.model")
tok = AutoTokenizer.from_pretrained(out)
tok.add_special_tokens({"additional_special_tokens": special})
tok.pad_token = tok.unk_token
tok.padding_side = "left"
tok.save_pretrained(out)
torch.manual_seed(0)
MistralForCausalLM(config(len(tok))).save_pretrained(out)
print(f"{out}: vocab {len(tok)}, pad {tok.pad_token!r}")
'''

# ---------------------------------------------------------------------------------------------
# Pure parts: parsing and arithmetic (tested in tests/test_vs_flagembedding.py)
# ---------------------------------------------------------------------------------------------


def parse_elapsed(text: str) -> float:
    """`/usr/bin/time`'s "h:mm:ss" or "m:ss.ss" -> seconds."""
    seconds = 0.0
    for part in text.strip().split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def parse_time_v(text: str) -> dict[str, float]:
    """Peak RSS (MiB), wall (s) and CPU seconds out of `/usr/bin/time -v`'s output."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key == "Maximum resident set size (kbytes)":
            out["peak_rss_mb"] = int(value) / 1024
        elif key.startswith("Elapsed (wall clock) time"):
            out["wall_s"] = parse_elapsed(value)
        elif key == "User time (seconds)":
            out["user_s"] = float(value)
        elif key == "System time (seconds)":
            out["sys_s"] = float(value)
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Our trainer's step records from `metrics.jsonl` (eval lines have no `step_seconds`)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if "step_seconds" in record:
                    records.append(record)
    return records


def _by_task(steps: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Timed steps' totals per task: steps, real tokens, slots, seconds."""
    out: dict[str, dict[str, float]] = {}
    for s in steps:
        t = out.setdefault(s["task"], {"steps": 0, "real_tokens": 0.0, "slots": 0.0,
                                       "seconds": 0.0})
        t["steps"] += 1
        for key in ("real_tokens", "slots", "seconds"):
            t[key] += s[key]
    return out


def last_new_shape_step(records: Sequence[dict[str, Any]]) -> int:
    """The last step that ran a step shape (rows, slots, tiles) for the first time."""
    seen: set[tuple[Any, ...]] = set()
    last = 0
    for r in records:
        key = (r["rows"], r["slots"], r["tiles"])
        if key not in seen:
            seen.add(key)
            last = int(r["step"])
    return last


def summarise_jax(records: Sequence[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Real tokens/s over the steps after `warmup`. `step_seconds` is the step's wall time with
    the compiles made during it (a user waits for them); "steady" leaves `compile_seconds` out.
    Utilisation = real tokens / token slots of the computed arrays."""
    timed = [r for r in records if int(r["step"]) > warmup]
    if not timed:
        raise ValueError(f"no step after the {warmup} warm-up steps in {len(records)} records")
    real = sum(float(r["real_tokens"]) for r in timed)
    slots = sum(float(r["slots"]) for r in timed)
    step_s = sum(float(r["step_seconds"]) for r in timed)
    compile_s = sum(float(r["compile_seconds"]) for r in timed)
    tasks = _by_task([
        {"task": r["dataset"], "real_tokens": float(r["real_tokens"]),
         "slots": float(r["slots"]), "seconds": float(r["step_seconds"])}
        for r in timed
    ])
    # Once every shape has run: no compile, no background tracing, only steps (the figure a long
    # run converges to; on a GPU the per-shape costs hide it completely).
    settled = max(last_new_shape_step(records), warmup)
    after = [r for r in records if int(r["step"]) > settled]
    return {
        "steps": len(records),
        "timed_steps": len(timed),
        "tasks": tasks,
        "real_tokens": real,
        "slots": slots,
        "seconds": step_s,
        "tokens_per_s": real / step_s,
        "steady_tokens_per_s": real / (step_s - compile_s),
        "utilisation": real / slots,
        "real_tokens_per_step": real / len(timed),
        "step_seconds_mean": step_s / len(timed),
        "compile_seconds": compile_s,
        "compile_seconds_all": sum(float(r["compile_seconds"]) for r in records),
        "compiles": records[-1]["compiles"],  # step shapes of the whole run
        "compile_cache_hits": records[-1]["compile_cache_hits"],
        "all_real_tokens": sum(float(r["real_tokens"]) for r in records),
        "settled_step": settled,
        "settled_tokens_per_s": (
            sum(float(r["real_tokens"]) for r in after)
            / sum(float(r["step_seconds"]) for r in after) if after else None
        ),
        "first_loss": records[0].get("loss"),
        "last_loss": records[-1].get("loss"),
    }


_LOG_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) jax_iclemb\.\S+: (.*)")
_SET_UP = re.compile(r"^set up in ([\d.]+) s")
_DEVICES = re.compile(r"jax_iclemb\.distributed: .* x (\d+) local devices")


def logged_devices(log: str) -> int | None:
    """How many devices our side trained on (`train.cpu_devices` on a CPU), from its log."""
    found = _DEVICES.search(log)
    return int(found.group(1)) if found else None


def wall_phases(log: str, started: float, ended: float, records: Sequence[dict[str, Any]]
                ) -> dict[str, float] | None:
    """Where our side's whole-process wall went, from its log's timestamped lines (local time)
    and its metrics: start-up before the trainer's first line (interpreter, imports, the
    backend), its set-up (its own line), the steps (their `step_seconds`), the exit after the
    final checkpoint closed; "other" is the rest (the loop around the steps). None when the log
    lacks those lines."""
    # The progress bar rewrites its line with carriage returns: a log line may follow one.
    found = (_LOG_LINE.match(x) for x in re.split(r"[\r\n]+", log))
    lines = [(time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000, m[3])
             for m in found if m]
    set_up = [float(m.group(1)) for _, text in lines if (m := _SET_UP.match(text))]
    closed = [t for t, text in lines if text.startswith("checkpoints closed")]
    if not (lines and set_up and closed):
        return None
    phases = {
        "start_up": lines[0][0] - started,
        "set_up": set_up[0],
        "steps": sum(float(r["step_seconds"]) for r in records),
        "exit": ended - closed[-1],
    }
    phases["other"] = ended - started - sum(phases.values())
    return phases


def summarise_flag(measure: dict[str, Any], warmup: int) -> dict[str, Any]:
    """The reference's real tokens/s over the steps after `warmup`. A step's time is the wall
    from the previous step's end (the first: from train begin) to its end, so it includes the
    reference's batch building (ICL prompts, tokenising, collating) as our step time does."""
    steps, previous = [], float(measure["train_begin"])
    for s in measure["steps"]:
        steps.append({**s, "wall": float(s["t_end"]) - previous})
        previous = float(s["t_end"])
    timed = [s for s in steps if int(s["step"]) > warmup]
    if not timed:
        raise ValueError(f"no step after the {warmup} warm-up steps in {len(steps)} steps")
    real = sum(float(s["real"]) for s in timed)
    slots = sum(float(s["slots"]) for s in timed)
    wall = sum(s["wall"] for s in timed)
    losses = measure.get("losses") or [None]
    tasks = _by_task([
        {"task": s.get("task", "?"), "real_tokens": float(s["real"]),
         "slots": float(s["slots"]), "seconds": s["wall"]}
        for s in timed
    ])
    return {
        "steps": len(steps),
        "timed_steps": len(timed),
        "tasks": tasks,
        "real_tokens": real,
        "slots": slots,
        "seconds": wall,
        "tokens_per_s": real / wall,
        "steady_tokens_per_s": real / wall,  # eager: nothing to compile
        "utilisation": real / slots,
        "real_tokens_per_step": real / len(timed),
        "step_seconds_mean": wall / len(timed),
        "compute_seconds": sum(float(s["t_end"]) - float(s["t_begin"]) for s in timed),
        "all_real_tokens": sum(float(s["real"]) for s in steps),
        "step_walls": [[int(s["step"]), float(s["real"]), s["wall"]] for s in steps],
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def reference_tokens_per_s_after(reference: dict[str, Any], step: int) -> float | None:
    """The reference's real tokens/s over its steps after `step` (None: there are none)."""
    after = [(real, wall) for n, real, wall in reference["step_walls"] if n > step]
    return sum(r for r, _ in after) / sum(w for _, w in after) if after else None


def ratios(ours: dict[str, Any], reference: dict[str, Any]) -> dict[str, float | None]:
    """ours / reference in real tokens/s: with and without our compile time, and over the steps
    after our last new shape (the reference over the same step numbers)."""
    settled = ours.get("settled_tokens_per_s")
    theirs = reference_tokens_per_s_after(reference, ours.get("settled_step", 0))
    return {
        "tokens_per_s": ours["tokens_per_s"] / reference["tokens_per_s"],
        "steady_tokens_per_s": ours["steady_tokens_per_s"] / reference["tokens_per_s"],
        "settled_tokens_per_s": settled / theirs if settled and theirs else None,
    }


def whole_run_tokens_per_s(result: dict[str, Any], side: str) -> float | None:
    """A side's real tokens over all its steps / its whole-process wall (start-up, compiles and
    exit included); None where either is missing (the PyTorch way counts its timed steps only)."""
    total = result["sides"][side]["summary"].get("all_real_tokens")
    wall = result["sides"][side]["time"].get("wall_s")
    return total / wall if total and wall else None


def summarise_torch(measure: dict[str, Any]) -> dict[str, Any]:
    """`bench/torch_reference.py`'s measurement of its timed steps (compute only)."""
    times = measure["step_times"]
    return {
        "steps": measure["steps"] + measure["warmup"],
        "timed_steps": len(times),
        "real_tokens": measure["real_tokens"],
        "seconds": sum(times),
        "tokens_per_s": measure["tokens_per_s"],
        "steady_tokens_per_s": measure["tokens_per_s"],
        "utilisation": measure["utilisation"],
        "real_tokens_per_step": measure["real_tokens"] / len(times),
        "step_seconds_mean": sum(times) / len(times),
        "first_loss": measure["losses"][0],
        "last_loss": measure["losses"][-1],
    }


def reference_batch_size(first_record: dict[str, Any], default: int) -> int:
    """The reference's batch size for a file, from its first record: a `batch_size` field, else
    half for symmetric types, else the default (AbsEmbedderSameDatasetTrainDataset)."""
    if first_record.get("batch_size"):
        return int(first_record["batch_size"])
    if "symmetric" in (first_record.get("type") or ""):
        return default // 2
    return default


def shell_quote(arg: str) -> str:
    """Shell quoting that keeps a newline readable ($'...\\n...')."""
    if "\n" in arg or "\t" in arg:
        body = arg.replace("\\", "\\\\").replace("'", "\\'")
        return "$'" + body.replace("\n", "\\n").replace("\t", "\\t") + "'"
    return shlex.quote(arg)


def shell_command(argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    """A multi-line shell command, one `--option values` per line."""
    head = [f"{k}={shell_quote(v)}" for k, v in (env or {}).items()]
    lines = [" ".join([*head, *(shell_quote(a) for a in argv[:1])])]
    for arg in argv[1:]:
        if arg.startswith("--") and len(lines[-1]) > 0:
            lines.append("  " + shell_quote(arg))
        else:
            lines[-1] += " " + shell_quote(arg)
    return " \\\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "–" if x is None else format(x, fmt)


def task_table(sides: Sequence[str], summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Per task, each side's timed steps, real tokens a step, utilisation and real tokens/s
    (cells "a / b" in the sides' order): the sides draw their batches with their own random
    orders, so over a few steps their task mixes differ; a task's row compares like with like."""
    names = sorted({t for s in sides for t in summaries[s].get("tasks", {})})
    head = " / ".join(SIDES[s] for s in sides)
    lines = [
        f"Per task, timed steps (cells: {head}):",
        "",
        "| task | steps | real tokens / step | utilisation | real tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        cells: list[list[str]] = [[], [], [], []]
        for s in sides:
            t = summaries[s].get("tasks", {}).get(name)
            if not t:
                for c in cells:
                    c.append("–")
                continue
            cells[0].append(str(int(t["steps"])))
            cells[1].append(_num(t["real_tokens"] / t["steps"]))
            cells[2].append(f"{100 * t['real_tokens'] / t['slots']:.0f}%")
            cells[3].append(_num(t["real_tokens"] / t["seconds"]))
        lines.append(f"| {name} | " + " | ".join(" / ".join(c) for c in cells) + " |")
    return lines


def render_report(result: dict[str, Any]) -> str:
    """The Markdown report of one comparison (`result` as written by --json)."""
    work, sides = result["work"], [s for s in SIDES if s in result["sides"]]
    summaries = {s: result["sides"][s]["summary"] for s in sides}
    ref = summaries.get("flag")
    lines = [
        f"### FlagEmbedding {FLAG_VERSION} vs jax_iclemb, each through its CLI "
        f"({result['date']})",
        "",
        f"Machine: {result['machine']}. Versions: reference "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].get("flag", {}).items())
        + "; ours "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].get("jax", {}).items())
        + ".",
        "",
        f"Work: random Mistral-shaped decoder (hidden {ARCH['hidden_size']}, MLP "
        f"{ARCH['intermediate_size']}, {ARCH['num_hidden_layers']} layers, "
        f"{ARCH['num_attention_heads']} heads / {ARCH['num_key_value_heads']} KV, head "
        f"{ARCH['head_dim']}, fp32, vocab 32003), LoRA r{LORA['rank']}/α{LORA['alpha']}/dropout "
        f"{LORA['dropout']} on all 7 projections, group {GROUP}, lengths query "
        f"{work['query_len']} / passage {work['passage_len']} / examples "
        f"{work['example_len']}+{work['example_len']}, τ {TEMPERATURE}, lr {LR:g}, "
        f"{work['steps']} steps, the first {result['warmup']} untimed. Data: {work['data']}"
        + (f", every record ×{work['tile']}" if work["tile"] > 1 else "")
        + "; queries a step: "
        + ", ".join(f"{t['name']} {t['batch']} ({t['records']} records)" for t in work["tasks"])
        + ".",
        "",
        "| | " + " | ".join(SIDES[s] for s in sides) + " |",
        "|---|" + "---:|" * len(sides),
    ]

    def row(label: str, cell) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(s) for s in sides) + " |")

    row("**real tokens/s** (ours: compiles included)",
        lambda s: f"**{_num(summaries[s]['tokens_per_s'])}**")
    if ref:
        row("ratio to the reference", lambda s: "1×" if s == "flag" else
            f"**{summaries[s]['tokens_per_s'] / ref['tokens_per_s']:.2f}×**")
    if "torch" in sides:
        torch_rate = summaries["torch"]["tokens_per_s"]
        row("ratio to the PyTorch way",
            lambda s: f"{summaries[s]['tokens_per_s'] / torch_rate:.2f}×")
    def whole_run(s: str) -> str:
        rate = whole_run_tokens_per_s(result, s)
        if rate is None:
            return "–"
        theirs = whole_run_tokens_per_s(result, "flag") if ref else None
        return _num(rate) + (f" ({rate / theirs:.2f}×)" if theirs and s != "flag" else "")

    # The end-to-end figure: the timed steps leave out the first ones, in which our first run
    # waits for most of its compiles.
    row("real tokens / whole-process wall, every step (ratio)", whole_run)
    row("real tokens/s, steady (compile time left out)",
        lambda s: _num(summaries[s]["steady_tokens_per_s"]))
    if ref:
        row("steady ratio to the reference", lambda s: "1×" if s == "flag" else
            f"{summaries[s]['steady_tokens_per_s'] / ref['tokens_per_s']:.2f}×")
    def settled(s: str) -> str:
        m = summaries[s]
        if s in ("flag", "torch"):
            return "–"
        if m["settled_tokens_per_s"] is None:
            return f"– (a new shape at step {m['settled_step']})"
        first, last = m["settled_step"] + 1, m["steps"]
        span = f"step {last}" if first == last else f"steps {first}–{last}"
        line = f"{_num(m['settled_tokens_per_s'])} ({span}"
        ratio = result.get("ratios", {}).get(s, {}).get("settled_tokens_per_s")
        return line + (f"; {ratio:.2f}× the reference's same steps)" if ratio else ")")

    row("real tokens/s once every step shape has run", settled)
    row("utilisation (real / computed token slots)",
        lambda s: f"{100 * summaries[s]['utilisation']:.1f}%")
    row("real tokens / step, mean", lambda s: _num(summaries[s]["real_tokens_per_step"]))
    row("step time, mean (s; ours: compiles included)",
        lambda s: _num(summaries[s]["step_seconds_mean"], ".2f"))

    def compiles(s: str) -> str:
        m = summaries[s]
        if s in ("flag", "torch"):
            return "– (eager)"
        return (f"{m['compiles']} shapes, {m['compile_cache_hits']} from the cache; "
                f"{m['compile_seconds']:.1f} s in timed steps / {m['compile_seconds_all']:.1f} s")

    row("compiles: step shapes; compile seconds (timed / all)", compiles)
    row("steps: trained / timed",
        lambda s: f"{summaries[s]['steps']} / {summaries[s]['timed_steps']}")

    def loss(s: str) -> str:
        first, last = summaries[s]["first_loss"], summaries[s]["last_loss"]
        return "–" if first is None else f"{first:.3f} → {last:.3f}"

    row("loss, first → last step", loss)
    row("devices (ours: from its log)", lambda s: _num(result["sides"][s].get("devices")))
    row("peak RSS (MiB, `/usr/bin/time -v`)",
        lambda s: _num(result["sides"][s]["time"].get("peak_rss_mb")))
    row("whole-process wall (s)",
        lambda s: _num(result["sides"][s]["time"].get("wall_s"), ".1f"))

    def phases(s: str) -> str:
        p = result["sides"][s].get("phases")
        if not p:
            return "–"
        return " / ".join(f"{p[k]:.1f}" for k in ("start_up", "set_up", "steps", "other", "exit"))

    row("wall: start-up / set-up / steps / other / exit (s)", phases)
    row("load average (1 min) at start",
        lambda s: _num(result["sides"][s].get("load_before"), ".2f"))
    lines += ["", *task_table(sides, summaries)]
    lines += [
        "",
        f"Commands (`$SCRATCH` = {result['scratch']}, `$FLAG_VENV` = {result['flag_venv']}). "
        f"The reference's measured command runs `python -m {FLAG_MODULE}` with the same "
        "arguments as its `__main__` (runpy), with a token-counting forward pre-hook and a "
        "step-timing `TrainerCallback` attached to the objects it builds:",
        "",
        "```bash",
    ]
    for s in sides:
        lines += [f"# {SIDES[s]}", result["sides"][s]["command"]]
    lines += ["```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Environment: the reference venv, the model, the data, the machine
# ---------------------------------------------------------------------------------------------


def default_flag_venv() -> Path:
    from jax_iclemb.data.tokenizer import cache_dir  # ${XDG_CACHE_HOME:-~/.cache}/jax_iclemb

    return cache_dir() / f"flagembedding-{FLAG_VERSION}"


def _log(message: str) -> None:
    print(f"[vs_flagembedding {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
          flush=True)


def given_flag_python(python: Path) -> Path:
    """`--flag-python`, checked to hold FlagEmbedding at FLAG_VERSION."""
    ask = "from importlib.metadata import version; print(version('FlagEmbedding'))"
    found = subprocess.run([str(python), "-c", ask], capture_output=True, text=True)
    if found.returncode or found.stdout.strip() != FLAG_VERSION:
        what = found.stdout.strip() or (found.stderr.strip().splitlines() or ["nothing"])[-1]
        raise SystemExit(f"--flag-python {python}: needs FlagEmbedding {FLAG_VERSION}, found "
                         f"{what}")
    return python


def ensure_flag_venv(venv: Path) -> Path:
    """The reference venv's python, with FLAG_PINS installed once (a stamp file keyed by the
    pins marks it done; an existing venv that already has them is only stamped)."""
    digest = hashlib.sha256("\n".join(FLAG_PINS).encode()).hexdigest()[:16]
    stamp = venv / f".vs_flagembedding-{digest}"
    python = venv / "bin" / "python"
    if stamp.is_file() and python.exists():
        return python
    if not python.exists():
        _log(f"creating the reference venv {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    check = (
        "import sys; from importlib.metadata import version, PackageNotFoundError\n"
        "def v(n):\n try: return version(n)\n except PackageNotFoundError: return None\n"
        "sys.exit(any(v(p.split('==')[0]) != p.split('==')[1] for p in sys.argv[1:]))"
    )
    if subprocess.run([str(python), "-c", check, *FLAG_PINS]).returncode:
        _log(f"installing {', '.join(FLAG_PINS)} into {venv} (a few minutes)")
        constraints = venv / "vs_flagembedding-constraints.txt"
        constraints.write_text("\n".join(FLAG_PINS) + "\n")
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, TORCH_PIN], check=True)
        subprocess.run([*pip, "-c", str(constraints), *FLAG_PINS], check=True)
    stamp.write_text("\n".join(FLAG_PINS) + "\n")
    return python


def tokenizer_model_file() -> Path:
    """Mistral-7B-v0.1's SentencePiece model, shipped (offline) by mistral-common."""
    path = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common does not ship {path}; is it installed?")
    return Path(str(path))


def build_reference_model(python: Path, out: Path, env: dict[str, str]) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    built = subprocess.run(
        [str(python), "-c", MODEL_BUILDER, str(out), str(tokenizer_model_file()),
         json.dumps(ARCH), json.dumps(list(ICL_TOKENS))],
        env=env, capture_output=True, text=True,
    )
    if built.returncode:  # its chatter (legacy-tokenizer notices) only matters when it fails
        raise SystemExit(f"{built.stdout}{built.stderr}\nbuilding the reference model failed")


def prepare_data(source: Path, out: Path, tile: int, batch: int) -> list[dict[str, Any]]:
    """Copy the task folders (those holding *.jsonl) of `source` to `out`, every record `tile`
    times; return each file's name (as our trainer names it), records and reference batch size."""
    shutil.rmtree(out, ignore_errors=True)
    tasks = []
    folders = sorted(d for d in source.iterdir() if d.is_dir() and any(d.glob("*.jsonl")))
    if not folders:
        raise FileNotFoundError(f"{source} holds no task folder with *.jsonl files")
    for folder in folders:
        (out / folder.name).mkdir(parents=True)
        for path in sorted(folder.glob("*.jsonl")):
            lines = [x if x.endswith("\n") else x + "\n"
                     for x in path.read_text(encoding="utf-8").splitlines(keepends=True)
                     if x.strip()]
            (out / folder.name / path.name).write_text("".join(lines * tile), encoding="utf-8")
            first = json.loads(lines[0])
            tasks.append({
                "name": f"{folder.name}/{path.stem}",
                "records": len(lines) * tile,
                "batch": reference_batch_size(first, batch),
                # How the launcher tells the reference's steps apart (one prompt per file).
                "prompt": first.get("prompt") or RETRIEVAL_INSTRUCTION,
            })
    return tasks


def gpu_name() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
        out = subprocess.run(query, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "a GPU (nvidia-smi did not answer)"
    return out.splitlines()[0].strip()


def machine(device: str = "cpu") -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(x.split(":", 1)[1].strip() for x in info.splitlines()
                     if x.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    with open("/proc/meminfo") as f:
        kib = int(next(x for x in f if x.startswith("MemTotal:")).split()[1])
    host = (f"{model}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
            f"{kib / 2**20:.0f} GiB RAM, {platform.system()} {platform.release()}")
    return host if device == "cpu" else f"{gpu_name()} (every side trains on it); host {host}"



def our_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
        out[name] = metadata.version(name)
    try:  # a checkout's revision, else the installed version (a copied tree may have neither)
        rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = ""
    try:
        out["jax_iclemb"] = rev or metadata.version("jax_iclemb")
    except metadata.PackageNotFoundError:
        out["jax_iclemb"] = "a source tree"
    return out


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------


def stop_session(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM to `proc`'s session (our trainer then saves and exits), SIGKILL after `grace` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_timed(argv: Sequence[str], env: dict[str, str], log: Path, cwd: Path) -> dict[str, Any]:
    """Run `argv` under /usr/bin/time -v (peak RSS, wall); output to `log`; stop on failure."""
    timefile = log.with_suffix(".time")
    timefile.unlink(missing_ok=True)
    prefix = ["/usr/bin/time", "-v", "-o", str(timefile)] if Path("/usr/bin/time").exists() else []
    load = os.getloadavg()[0]
    t0, started = time.perf_counter(), time.time()
    with open(log, "w") as f:
        # In a session of its own, so that a stopped bench stops the whole side (/usr/bin/time
        # and the trainer under it) rather than leaving it to run on into the next side.
        proc = subprocess.Popen([*prefix, *argv], env=env, cwd=cwd, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait()
        except BaseException:  # SIGTERM (see `main`), Ctrl-C
            stop_session(proc)
            raise
    wall = time.perf_counter() - t0
    if rc:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise SystemExit("\n".join([*tail, f"failed (exit {rc}): {shlex.join(argv)}; log {log}"]))
    timing = parse_time_v(timefile.read_text()) if timefile.exists() else {"wall_s": wall}
    return {"time": timing, "load_before": load, "started": started, "ended": time.time()}


def flag_args(args: argparse.Namespace, scratch: Path, tasks: list[dict[str, Any]]) -> list[str]:
    per_epoch = sum(t["records"] // t["batch"] for t in tasks)  # the reference drops last batches
    epochs = max(1, math.ceil(args.steps / max(per_epoch, 1)))
    folders = sorted({str(scratch / "data" / t["name"].split("/")[0]) for t in tasks})
    return [
        "--model_name_or_path", str(scratch / "model"),
        "--use_lora", "True", "--lora_rank", str(LORA["rank"]), "--lora_alpha", str(LORA["alpha"]),
        "--lora_dropout", str(LORA["dropout"]), "--target_modules", *LORA_TARGETS,
        "--additional_special_tokens", *ICL_TOKENS,
        "--train_data", *folders,
        "--cache_path", str(scratch / "flag_cache"),
        "--train_group_size", str(GROUP),
        "--query_max_len", str(args.query_len), "--passage_max_len", str(args.passage_len),
        "--pad_to_multiple_of", "8",
        "--query_instruction_for_retrieval", RETRIEVAL_INSTRUCTION,
        "--query_instruction_format", "<instruct>{}\n<query>{}",
        "--knowledge_distillation", "False",
        "--same_dataset_within_batch", "True",
        "--small_threshold", "0", "--drop_threshold", "0",
        "--example_query_max_len", str(args.example_len),
        "--example_passage_max_len", str(args.example_len),
        "--retrieval_use_examples", "True",
        "--icl_suffix_str", "\n<response>",
        "--learning_rate", f"{LR:g}", "--warmup_ratio", str(WARMUP_RATIO),
        # Epochs enough for the steps; max_steps stops at exactly --steps (HF rounds fractional
        # epochs), so both sides' learning-rate schedules span the same number of steps.
        "--num_train_epochs", str(epochs), "--max_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch),
        "--dataloader_drop_last", "True",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--temperature", str(TEMPERATURE),
        "--sentence_pooling_method", "last_token", "--normalize_embeddings", "True",
        "--seed", "42", *(["--use_cpu", "True"] if args.device == "cpu" else []),
        "--output_dir", str(scratch / "flag_out"),
    ]


def jax_args(args: argparse.Namespace, scratch: Path, workdir: Path,
             tasks: list[dict[str, Any]]) -> list[str]:
    arch = [f"--config.model.arch.{k}={v}" for k, v in ARCH.items()]
    # The reference's per-file batch sizes (symmetric tasks: half). Our dataset names are the
    # relative paths; a '.' in one would split the config key, so it becomes fnmatch's '?'.
    sizes = [f"--config.data.batch_size_overrides.{t['name'].replace('.', '?')}={t['batch']}"
             for t in tasks if t["batch"] != args.batch]
    # The reference lets a query's examples take query_max_len - 512 tokens (with BOS and EOS)
    # whatever passage_max_len is, so none at all up to 512 (ours: query_max_len -
    # passage_max_len by default; docs/data_pipeline.md). The same budget here, the same work.
    examples = args.query_len - 512
    budget = (f"--config.data.examples_max_len={examples}" if examples > 0
              else "--config.data.max_examples=0")
    return [
        "--config", "configs/tiny.py", "--workdir", str(workdir),
        f"--config.data.path={scratch / 'data'}",
        *arch,
        f"--config.lora.rank={LORA['rank']}", f"--config.lora.alpha={float(LORA['alpha'])}",
        f"--config.lora.dropout={LORA['dropout']}",
        f"--config.data.query_max_len={args.query_len}",
        f"--config.data.passage_max_len={args.passage_len}",
        f"--config.data.example_query_max_len={args.example_len}",
        f"--config.data.example_passage_max_len={args.example_len}",
        budget,
        f"--config.data.train_group_size={GROUP}",
        f"--config.data.batch_size={args.batch}",
        *sizes,
        "--config.data.pack_len=0",
        f"--config.loss.temperature={TEMPERATURE}",
        f"--config.optim.lr={LR}",
        f"--config.optim.warmup_steps={math.ceil(WARMUP_RATIO * args.steps)}",  # = HF's rounding
        f"--config.train.steps={args.steps}",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=1000",
    ]


def _display(text: str, scratch: Path, venv: Path) -> str:
    return text.replace(str(scratch), "$SCRATCH").replace(str(venv), "$FLAG_VENV")


def run_flag(args: argparse.Namespace, scratch: Path, venv: Path,
             tasks: list[dict[str, Any]]) -> dict[str, Any]:
    python = given_flag_python(args.flag_python) if args.flag_python else ensure_flag_venv(venv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(scratch / "hf_home"))  # keep HF caches out of the user's home
    _log("building the reference's tiny Mistral (torch.manual_seed(0))")
    build_reference_model(python, scratch / "model", env)
    launcher = scratch / "flag_launcher.py"
    launcher.write_text(FLAG_LAUNCHER)
    measure = scratch / "flag_measure.json"
    measure.unlink(missing_ok=True)
    for d in ("flag_out", "flag_cache"):
        shutil.rmtree(scratch / d, ignore_errors=True)
    argv = flag_args(args, scratch, tasks)
    _log(f"reference: python -m {FLAG_MODULE} (log {scratch / 'flag.log'})")
    prompts = json.dumps({t["name"]: t["prompt"] for t in tasks})
    out = run_timed([str(python), str(launcher), *argv],
                    {**env, "VS_FLAG_MEASURE": str(measure), "VS_FLAG_TASKS": prompts},
                    scratch / "flag.log", scratch)
    raw = json.loads(measure.read_text())
    plain = [str(python), "-m", FLAG_MODULE, *argv]
    return {
        **out,
        "raw": raw,
        "versions": {**raw["versions"], "python": raw["python"],
                     "torch threads": str(raw["torch_threads"])},
        "command": _display(
            "# measured: $FLAG_VENV/bin/python $SCRATCH/flag_launcher.py, same arguments\n"
            + shell_command(plain, {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}),
            scratch, venv),
    }


def run_jax(args: argparse.Namespace, scratch: Path, venv: Path, tasks: list[dict[str, Any]],
            *, warm: bool) -> dict[str, Any]:
    cache = scratch / "jax_cache"
    if not warm:  # a cold run: an empty persistent compilation cache, so every compile counts
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
    name = "jax_warm" if warm else "jax"
    workdir = scratch / f"{name}_work"
    shutil.rmtree(workdir, ignore_errors=True)  # an existing workdir would resume, not train
    argv = jax_args(args, scratch, workdir, tasks) + [f"--config.{x}" for x in args.ours]
    env = {"JAX_COMPILATION_CACHE_DIR": str(cache), **JAX_DEVICE_ENV[args.device]}
    _log(f"ours{' (warm cache)' if warm else ''}: python -m jax_iclemb.train "
         f"(log {scratch / (name + '.log')})")
    out = run_timed([sys.executable, "-m", "jax_iclemb.train", *argv], dict(os.environ, **env),
                    scratch / f"{name}.log", REPO)
    records = read_metrics(workdir / "metrics.jsonl")
    log = (scratch / f"{name}.log").read_text(errors="replace")
    return {
        **out,
        "phases": wall_phases(log, out["started"], out["ended"], records),
        "devices": logged_devices(log),
        "raw": records,
        "versions": our_versions(),
        "command": _display(
            shell_command(["python", "-m", "jax_iclemb.train", *argv], env), scratch, venv),
    }


def run_torch(args: argparse.Namespace, scratch: Path, venv: Path,
              tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """The PyTorch way on our pipeline's sequences of the same steps (the same config)."""
    config = jax_args(args, scratch, scratch / "unused", tasks)[4:]  # no --config / --workdir
    argv = [sys.executable, str(REPO / "bench" / "torch_reference.py"), "--config",
            "configs/tiny.py", "--steps", str(args.steps - args.warmup), "--warmup",
            str(args.warmup), "--device", args.device, *config]
    _log(f"the PyTorch way: bench/torch_reference.py (log {scratch / 'torch.log'})")
    # JAX_PLATFORMS: our pipeline builds its batches on the host; JAX stays off the GPU there.
    out = run_timed(argv, dict(os.environ, JAX_PLATFORMS="cpu"), scratch / "torch.log", REPO)
    lines = (scratch / "torch.log").read_text().splitlines()
    measure = json.loads(next(x for x in reversed(lines) if x.startswith("{")))
    return {
        **out,
        "raw": measure,
        "command": _display(shell_command(["python", *argv[1:]]), scratch, venv),
    }


def summarise(side: str, data: dict[str, Any], warmup: int) -> dict[str, Any]:
    if side == "flag":
        return summarise_flag(data["raw"], warmup)
    if side == "torch":
        return summarise_torch(data["raw"])
    return summarise_jax(data["raw"], warmup)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def add_reference_options(p: argparse.ArgumentParser, scratch: str, scratch_help: str) -> None:
    """--flag-venv and --scratch, shared by the benches that run the reference in its venv."""
    p.add_argument("--flag-venv", type=Path, default=None,
                   help=f"the reference venv (default: <cache>/jax_iclemb/"
                        f"flagembedding-{FLAG_VERSION}; built on first use)")
    p.add_argument("--scratch", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / scratch,
                   help=scratch_help)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="builtin",
                   help="a folder of reference-format task folders (default: the built-in data)")
    p.add_argument("--tile", type=int, default=1, help="repeat every record N times")
    p.add_argument("--batch", type=int, default=8, help="queries a step (symmetric tasks: half)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps a side")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--query-len", type=int, default=1024)
    p.add_argument("--passage-len", type=int, default=256)
    p.add_argument("--example-len", type=int, default=128,
                   help="example query and example passage length")
    p.add_argument("--device", choices=tuple(JAX_DEVICE_ENV), default="cpu",
                   help="where every side trains (cuda: the first GPU)")
    p.add_argument("--flag-python", type=Path, default=None,
                   help="an interpreter that has FlagEmbedding 1.4.2 already (no venv is built)")
    p.add_argument("--only", choices=("jax", "flag", "torch"),
                   help="rerun one side; the others' last results come from the scratch folder")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch way")
    p.add_argument("--warm-cache", action="store_true",
                   help="also rerun ours with the compilation cache the first run filled")
    add_reference_options(
        p, "vs_flagembedding", "scratch folder (data copy, model, runs, each side's last result)"
    )
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch folder's data, model and run folders")
    p.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for our side only that leaves the work as it is, "
                   "e.g. model.attention_impl=xla (repeatable)")
    p.add_argument("--append", type=Path, help="append the Markdown report to this file")
    p.add_argument("--json", type=Path, help="write the raw numbers to this file")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must be larger than --warmup")
    return args


def _stopped(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def stop_on_sigterm() -> None:
    """SIGTERM (`timeout`, a scheduler) ends the bench as Ctrl-C does: unwinding through
    `run_timed`, which stops the side it is running."""
    signal.signal(signal.SIGTERM, _stopped)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    scratch = args.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    venv = (args.flag_venv or default_flag_venv()).expanduser().resolve()
    if args.data == "builtin":
        from jax_iclemb.data.builtin import builtin_data_dir

        source, data_label = builtin_data_dir(), "the built-in dataset"
    else:
        source = Path(args.data).resolve()
        data_label = f"`{source}`"
    tasks = prepare_data(source, scratch / "data", args.tile, args.batch)
    work = {"data": data_label, "tile": args.tile, "batch": args.batch, "steps": args.steps,
            "query_len": args.query_len, "passage_len": args.passage_len,
            "example_len": args.example_len, "tasks": tasks}

    sides: dict[str, dict[str, Any]] = {}
    if args.only != "jax":
        sides["flag"] = run_flag(args, scratch, venv, tasks)
    if args.only in (None, "jax"):
        sides["jax"] = run_jax(args, scratch, venv, tasks, warm=False)
        if args.warm_cache:
            sides["jax_warm"] = run_jax(args, scratch, venv, tasks, warm=True)
    if args.only == "torch" or (args.only is None and not args.no_torch):
        sides["torch"] = run_torch(args, scratch, venv, tasks)
    for side, data in list(sides.items()):
        (scratch / f"{side}.json").write_text(json.dumps({"work": work, **data}))
    if args.only:  # the other side's last result, if it did the same work
        others = [s for s in ("flag", "jax", "jax_warm", "torch") if s not in sides]
        for side in others:
            path = scratch / f"{side}.json"
            if not path.exists():
                _log(f"no earlier result {path}")
                continue
            previous = json.loads(path.read_text())
            if previous.pop("work") != work:
                _log(f"ignoring {path}: it did other work")
                continue
            sides[side] = previous
    for side, data in sides.items():
        data["summary"] = summarise(side, data, args.warmup)

    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(args.device),
        "versions": {s: sides[s]["versions"] for s in ("flag", "jax") if s in sides},
        "work": work,
        "warmup": args.warmup,
        "scratch": str(scratch),
        "flag_venv": str(args.flag_python or venv),
        "sides": sides,
    }
    if "flag" in sides:
        result["ratios"] = {s: ratios(sides[s]["summary"], sides["flag"]["summary"])
                            for s in sides if s != "flag"}
    text = render_report(result)
    print(text)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if not args.keep:  # the small per-side results and logs stay for --only
        for d in ("data", "model", "flag_out", "flag_cache", "hf_home", "jax_cache", "jax_work",
                  "jax_warm_work"):
            shutil.rmtree(scratch / d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
