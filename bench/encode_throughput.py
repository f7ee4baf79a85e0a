"""Encoding throughput: jax_iclemb's `Embedder` against FlagEmbedding's `ICLLLMEmbedder` (the
paper's inference class) and sentence-transformers, on the same model, texts and lengths.

    python bench/encode_throughput.py                      # 2,000 passages, 500 5-shot queries
    python bench/encode_throughput.py --quick              # 200 passages, 50 queries
    python bench/encode_throughput.py --only jax --json out.json

Every side loads one HF folder: a random Mistral-shaped decoder built as bench/vs_flagembedding.py
builds it (hidden 256, MLP 704, 4 layers, 8 heads / 4 KV, fp32, torch.manual_seed(0)), whose
tokenizer adds BOS and EOS (as the published bge-en-icl tokenizer and our training sequences do)
and carries our export's sentence-transformers config and chat template. Texts are synthetic:
passages of ~50-300 tokens, queries of ~10-40 tokens, each query preceded by the same 5 in-context
examples (~50-150 tokens each) of its task, the paper's evaluation protocol.

Each side runs in a process of its own (`/usr/bin/time -v`: peak RSS) and encodes the passages
then the queries twice; the first pass counts what a user waits for on a first call (our
compiles), the second is warm:
- ours: `Embedder.from_pretrained(folder)`, `encode_corpus` and `encode_queries(instruction=...,
  examples=...)`, with no persistent compilation cache; the examples, shared by every query, run
  once (`prefix_cache`, the default);
- ours with `prefix_cache=False`: every query runs with its examples, as the torch sides do;
- sentence-transformers (this venv) on the folder as our export writes it: passages raw, queries as
  the full few-shot prompt string (`format_inference_query`);
- FlagEmbedding's `ICLLLMEmbedder` in its own venv (bench/vs_flagembedding.py builds it):
  `examples_for_task`, `query_instruction_for_retrieval`, fp32 on the CPU.
The torch sides encode `--batch-size` texts a forward, sorted by length as both do; ours packs
texts into rows of its own layout. Embeddings are compared row by row (cosine) against ours.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pipeline_scale import WORDS
from vs_flagembedding import (
    ARCH,
    FLAG_VERSION,
    RETRIEVAL_INSTRUCTION,
    add_reference_options,
    build_reference_model,
    default_flag_venv,
    ensure_flag_venv,
    machine,
    our_versions,
    run_timed,
    stop_on_sigterm,
)

REPO = Path(__file__).resolve().parents[1]
SIDES = {
    "jax": "ours (`Embedder`)",
    "jax_plain": "ours, `prefix_cache=False`",
    "st": "sentence-transformers",
    "flag": f"FlagEmbedding {FLAG_VERSION} `ICLLLMEmbedder`",
}
SHOTS = 5
PASSES = 2
AGREE = 0.999  # the least cosine counted as the same embedding
# Words a text draws (this vocabulary averages ~1.2 Mistral tokens a word).
PASSAGE_WORDS, QUERY_WORDS = (40, 240), (8, 32)
EXAMPLE_QUERY_WORDS, EXAMPLE_RESPONSE_WORDS = (8, 32), (32, 90)
COMPILE_EVENTS = (  # what jit spends before a new shape runs
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)

# Run by the reference venv's python (no jax_iclemb there): argv = work.json, model, out.npz.
FLAG_ENCODER = r'''
import json, sys, time
import numpy as np
import torch
from FlagEmbedding.inference.embedder.decoder_only.icl import ICLLLMEmbedder

work = json.load(open(sys.argv[1]))
clock = time.perf_counter
t0 = clock()
model = ICLLLMEmbedder(
    sys.argv[2], use_fp16=False, devices="cpu", normalize_embeddings=True,
    batch_size=work["batch_size"], query_max_length=work["query_len"],
    passage_max_length=work["passage_len"],
    query_instruction_for_retrieval=work["instruction"], examples_for_task=work["examples"],
)
timing = {"load_s": clock() - t0, "passages_s": [], "queries_s": []}
for _ in range(work["passes"]):
    t = clock()
    passages = model.encode_corpus(work["passages"])
    timing["passages_s"].append(clock() - t)
    t = clock()
    queries = model.encode_queries(work["queries"])
    timing["queries_s"].append(clock() - t)
np.savez(sys.argv[3], passages=passages, queries=queries)
timing["torch_threads"] = torch.get_num_threads()
print(json.dumps(timing))
'''

# Run in the reference venv after the model is built: the tokenizer appends EOS (the published
# bge-en-icl tokenizer's add_eos_token) and gets our chat template (sentence-transformers reads it).
TOKENIZER_PATCH = r'''
import sys
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(sys.argv[1])
tok.add_eos_token = True
tok.chat_template = sys.argv[2]
tok.save_pretrained(sys.argv[1])
'''


def log(message: str) -> None:
    print(f"[encode_throughput {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
          flush=True)


# ---------------------------------------------------------------------------------------------
# The work: texts and the model folder
# ---------------------------------------------------------------------------------------------


def _texts(rng: np.random.Generator, count: int, words: tuple[int, int]) -> list[str]:
    sizes = rng.integers(words[0], words[1] + 1, size=count)
    return [" ".join(rng.choice(WORDS, size=int(n))) for n in sizes]


def make_work(passages: int, queries: int, args: argparse.Namespace) -> dict[str, Any]:
    """Synthetic texts (seed 0) and the settings every side reads from one JSON file."""
    rng = np.random.default_rng(0)
    examples = [
        {"query": q, "response": r}
        for q, r in zip(_texts(rng, SHOTS, EXAMPLE_QUERY_WORDS),
                        _texts(rng, SHOTS, EXAMPLE_RESPONSE_WORDS), strict=True)
    ]
    return {
        "passages": _texts(rng, passages, PASSAGE_WORDS),
        "queries": _texts(rng, queries, QUERY_WORDS),
        "examples": examples,
        "instruction": RETRIEVAL_INSTRUCTION,
        "query_len": args.query_len,
        "passage_len": args.passage_len,
        "batch_size": args.batch_size,
        "passes": PASSES,
    }


def build_model(python: Path, out: Path, scratch: Path) -> None:
    """The reference's random model folder, its tokenizer appending EOS, with our export's
    sentence-transformers files (last-token pooling, normalisation, chat template)."""
    from jax_iclemb.data.icl import chat_template
    from jax_iclemb.export import write_sentence_transformers_config

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(scratch / "hf_home"))  # keep HF caches out of the user's home
    build_reference_model(python, out, env)
    subprocess.run([str(python), "-c", TOKENIZER_PATCH, str(out), chat_template()], env=env,
                   check=True, capture_output=True)
    write_sentence_transformers_config(
        out, hidden_size=ARCH["hidden_size"], max_seq_length=ARCH["max_position_embeddings"],
        query_instruction=RETRIEVAL_INSTRUCTION,
    )


def token_counts(model: Path, work: dict[str, Any]) -> dict[str, Any]:
    """Tokens a pass embeds, as our tokenizer builds the sequences (BOS ... EOS)."""
    from jax_iclemb.data.icl import encode_inference_queries, encode_passages
    from jax_iclemb.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model))
    passages = [len(p) for p in encode_passages(tok, work["passages"], max_len=work["passage_len"])]
    queries, bare = (
        [len(q) for q in encode_inference_queries(
            tok, work["queries"], instruction=work["instruction"], examples=shots,
            max_len=work["query_len"],
        )]
        for shots in (work["examples"], ())
    )
    return {
        "passages": {"tokens": sum(passages), "min": min(passages), "max": max(passages)},
        "queries": {"tokens": sum(queries), "min": min(queries), "max": max(queries),
                    "without_examples": {"min": min(bare), "max": max(bare)}},
    }


# ---------------------------------------------------------------------------------------------
# The sides in this venv (run as `encode_throughput.py --worker SIDE`)
# ---------------------------------------------------------------------------------------------

Encode = Callable[[], np.ndarray]


def ours(model: Path, work: dict[str, Any], prefix_cache: bool = True) -> tuple[Encode, Encode]:
    from jax_iclemb import Embedder

    emb = Embedder.from_pretrained(model, query_max_len=work["query_len"],
                                   passage_max_len=work["passage_len"], progress=False,
                                   prefix_cache=prefix_cache)
    return (
        lambda: emb.encode_corpus(work["passages"]),
        lambda: emb.encode_queries(work["queries"], instruction=work["instruction"],
                                   examples=work["examples"]),
    )


def sentence_transformers(model: Path, work: dict[str, Any]) -> tuple[Encode, Encode]:
    from sentence_transformers import SentenceTransformer

    from jax_iclemb.data.icl import format_inference_query

    st = SentenceTransformer(str(model), device="cpu")

    def encode(texts: list[str]) -> np.ndarray:
        return st.encode(texts, batch_size=work["batch_size"], show_progress_bar=False)

    # The few-shot prompt string is built in the timed call: a user builds it too.
    return (
        lambda: encode(work["passages"]),
        lambda: encode([
            format_inference_query(q, instruction=work["instruction"], examples=work["examples"])
            for q in work["queries"]
        ]),
    )


def compile_clock() -> Callable[[], float]:
    """Seconds jit has spent tracing, lowering and compiling since this call."""
    import jax

    total = [0.0]

    def listen(event: str, seconds: float, **_: Any) -> None:
        if event in COMPILE_EVENTS:
            total[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    return lambda: total[0]


def worker(side: str, work_file: Path, model: Path, out: Path) -> int:
    """Load, then encode the passages and the queries `passes` times; save the last embeddings,
    print the timings (one JSON line)."""
    work = json.loads(work_file.read_text())
    # Imported before the clock starts, as the reference's script imports its class first.
    ours_side = side.startswith("jax")
    importlib.import_module("jax_iclemb.embedder" if ours_side else "sentence_transformers")
    compiled = compile_clock() if ours_side else None
    t0 = time.perf_counter()
    passages_fn, queries_fn = (
        ours(model, work, prefix_cache=side == "jax") if ours_side
        else sentence_transformers(model, work)
    )
    timing: dict[str, Any] = {"load_s": time.perf_counter() - t0, "passages_s": [],
                              "queries_s": [], "compile_s": []}
    embeddings: dict[str, np.ndarray] = {}
    for _ in range(work["passes"]):
        for name, fn in (("passages", passages_fn), ("queries", queries_fn)):
            before = compiled() if compiled else 0.0
            t = time.perf_counter()
            embeddings[name] = fn()
            timing[f"{name}_s"].append(time.perf_counter() - t)
            if compiled:
                timing["compile_s"].append(compiled() - before)
    np.savez(out, **embeddings)
    if side == "st":
        import torch

        timing["torch_threads"] = torch.get_num_threads()
    print(json.dumps(timing))
    return 0


# ---------------------------------------------------------------------------------------------
# The driver: one process a side, then the comparison
# ---------------------------------------------------------------------------------------------


def last_json_line(log: Path) -> dict[str, Any]:
    lines = log.read_text(errors="replace").splitlines()
    return json.loads(next(x for x in reversed(lines) if x.startswith("{")))


def run_side(side: str, scratch: Path, model: Path, flag_python: Path | None) -> dict[str, Any]:
    """One side in its own process: its timings, peak RSS, and its embeddings' file."""
    work_file, out, log_file = (scratch / "work.json", scratch / f"{side}.npz",
                                scratch / f"{side}.log")
    if side == "flag":
        script = scratch / "flag_encoder.py"
        script.write_text(FLAG_ENCODER)
        argv = [str(flag_python), str(script), str(work_file), str(model), str(out)]
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", side,
                "--scratch", str(scratch)]
    # No persistent compilation cache: our first pass compiles, as a user's first run does.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(scratch / "hf_home"))
    log(f"{SIDES[side]} (log {log_file})")
    run = run_timed(argv, env, log_file, REPO)
    return {**run, "timing": last_json_line(log_file), "embeddings": str(out)}


def agreement(sides: dict[str, dict[str, Any]], base: str = "jax") -> dict[str, Any]:
    """Row-wise cosine of each side's embeddings against `base`'s (rows are unit vectors)."""
    if base not in sides:
        return {}
    ref = np.load(sides[base]["embeddings"])
    out: dict[str, Any] = {}
    for side in sides:
        if side == base:
            continue
        got = np.load(sides[side]["embeddings"])
        out[side] = {}
        for name in ("passages", "queries"):
            cos = (got[name].astype(np.float64) * ref[name]).sum(-1)
            out[side][name] = {"min": float(cos.min()), "mean": float(cos.mean()),
                               "agree": float((cos > AGREE).mean())}
    return out


def rates(result: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Texts/s per side, per kind, per pass."""
    work = result["work"]
    return {
        side: {kind: [work[kind] / s for s in data["timing"][f"{kind}_s"]]
               for kind in ("passages", "queries")}
        for side, data in result["sides"].items()
    }


def render_report(result: dict[str, Any]) -> str:
    """The Markdown table of one run (`result` as written by --json)."""
    work, sides, tokens = result["work"], result["sides"], result["tokens"]
    per_s = rates(result)
    cols = [("passages", 0), ("passages", 1), ("queries", 0), ("queries", 1)]
    lines = [
        f"### Encoding throughput, texts/s ({result['date']})",
        "",
        f"Machine: {result['machine']}. Ours: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "",
        f"Work: random Mistral-shaped decoder (hidden {ARCH['hidden_size']}, MLP "
        f"{ARCH['intermediate_size']}, {ARCH['num_hidden_layers']} layers, "
        f"{ARCH['num_attention_heads']} heads / {ARCH['num_key_value_heads']} KV, fp32); "
        f"{work['passages']:,} passages ({tokens['passages']['tokens']:,} tokens, "
        f"{tokens['passages']['min']}-{tokens['passages']['max']} each); {work['queries']:,} "
        f"queries with {SHOTS} in-context examples ({tokens['queries']['tokens']:,} tokens, "
        f"{tokens['queries']['min']}-{tokens['queries']['max']} each, of which the query "
        f"{tokens['queries']['without_examples']['min']}-"
        f"{tokens['queries']['without_examples']['max']}); max lengths query "
        f"{work['query_len']} / passage {work['passage_len']}; torch sides batch "
        f"{work['batch_size']}. Pass 1 includes our compiles; pass 2 is warm.",
        "",
        "| side | passages/s, pass 1 | passages/s, pass 2 | 5-shot queries/s, pass 1 "
        "| 5-shot queries/s, pass 2 | load (s) | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for side, data in sides.items():
        cells = [f"{per_s[side][k][p]:,.1f}" for k, p in cols]
        lines.append(f"| {SIDES[side]} | " + " | ".join(cells)
                     + f" | {data['timing']['load_s']:.1f} | "
                     + f"{data['time'].get('peak_rss_mb', float('nan')):,.0f} |")
    for other in ("flag", "st", "jax_plain"):
        if "jax" in sides and other in sides:
            cells = [f"{per_s['jax'][k][p] / per_s[other][k][p]:.2f}×" for k, p in cols]
            lines.append(f"| ours / {SIDES[other]} | " + " | ".join(cells) + " | | |")
    if "jax" in sides:
        compile_s = sides["jax"]["timing"]["compile_s"]
        lines += ["", "Our compile seconds (trace + lower + compile), passages / queries: pass 1 "
                  f"{compile_s[0]:.1f} / {compile_s[1]:.1f}, pass 2 {compile_s[2]:.1f} / "
                  f"{compile_s[3]:.1f}."]
    for side, kinds in result["agreement"].items():
        lines += ["", f"Cosine to ours, {SIDES[side]}: " + "; ".join(
            f"{kind} min {c['min']:.6f}, mean {c['mean']:.6f}, {100 * c['agree']:.0f}% > {AGREE}"
            for kind, c in kinds.items()) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passages", type=int, default=2000)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--quick", action="store_true", help="200 passages, 50 queries")
    p.add_argument("--query-len", type=int, default=512,
                   help="max tokens of a query with its instruction (examples come on top)")
    p.add_argument("--passage-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32, help="texts a forward, torch sides")
    p.add_argument("--only", choices=tuple(SIDES), help="run one side")
    add_reference_options(p, "encode_throughput", "scratch folder (model, texts, embeddings, logs)")
    p.add_argument("--json", type=Path, help="write the raw numbers to this file")
    p.add_argument("--worker", choices=("jax", "jax_plain", "st"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    scratch = args.scratch.resolve()
    model = scratch / "model"
    if args.worker:
        return worker(args.worker, scratch / "work.json", model, scratch / f"{args.worker}.npz")
    sizes = (200, 50) if args.quick else (args.passages, args.queries)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    venv = (args.flag_venv or default_flag_venv()).expanduser().resolve()
    flag_python = ensure_flag_venv(venv)  # it also builds the model
    log("building the random Mistral-shaped model (torch.manual_seed(0))")
    build_model(flag_python, model, scratch)
    work = make_work(*sizes, args)
    (scratch / "work.json").write_text(json.dumps(work))
    sides = {side: run_side(side, scratch, model, flag_python)
             for side in SIDES if args.only in (None, side)}
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "versions": our_versions(),
        "work": {k: len(v) if isinstance(v, list) else v for k, v in work.items()},
        "tokens": token_counts(model, work),
        "sides": sides,
        "agreement": agreement(sides),
    }
    print(render_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
