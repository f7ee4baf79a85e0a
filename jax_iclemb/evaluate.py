"""Retrieval evaluation on a BEIR-format folder, zero-shot and few-shot side by side.

    python -m jax_iclemb.evaluate --model runs/tiny --data DIR \
        --instruction "Given a web search query, retrieve relevant passages that answer the query."\
        --examples eval_examples/MSMARCO.json [--json OUT.json] [--corpus-store STORE]
    python -m jax_iclemb.evaluate --make-beir --from-jsonl train.jsonl --out DIR

The BEIR folder format is in `jax_iclemb.beir`, the evaluation in `jax_iclemb.beir_eval` (ranking
on the devices: `jax_iclemb.device_topk`), the metrics in `jax_iclemb.retrieval`. With
`--corpus-store`, the corpus embeddings come from a store that `python -m jax_iclemb.encode` wrote
from the same model and folder; only the queries are encoded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from jax_iclemb.beir import beir_from_jsonl, load_beir, load_examples
from jax_iclemb.config import default_config
from jax_iclemb.embedding_store import model_name, store_info
from jax_iclemb.errors import BadValue, add_debug_flag, cli
from jax_iclemb.retrieval import markdown_table
from jax_iclemb.workdir import is_workdir, load_workdir_config


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jax_iclemb.evaluate",
        description="Zero-shot and few-shot retrieval metrics on a BEIR-format folder.",
    )
    p.add_argument("--model", help="a training workdir, a merged HF folder or a PEFT folder")
    p.add_argument("--data", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    p.add_argument("--split", default="test")
    p.add_argument("--instruction", default=None,
                   help="task instruction (default: the model's training default prompt)")
    p.add_argument("--examples", default=None, help='few-shot examples: [{"query","response"}]')
    p.add_argument("--num-examples", type=int, default=None, help="use the first N examples")
    p.add_argument("--query-max-len", type=int, default=None)
    p.add_argument("--passage-max-len", type=int, default=None)
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir")
    p.add_argument("--corpus-store", default=None,
                   help="read the corpus embeddings from this store (python -m jax_iclemb.encode "
                        "--model MODEL --input DATA) instead of encoding the corpus")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--keep-runs", action="store_true",
                   help="put each query's top 10 documents and scores in the JSON")
    p.add_argument("--keep-identical-ids", action="store_true",
                   help="let a query retrieve the document with its own id (BEIR and mteb do not)")
    p.add_argument("--make-beir", action="store_true",
                   help="instead: build a BEIR folder (--out) from training records (--from-jsonl)")
    p.add_argument("--from-jsonl", default=None)
    p.add_argument("--out", default=None)
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.make_beir:
        if not (args.from_jsonl and args.out):
            p.error("--make-beir needs --from-jsonl and --out")
    elif not (args.model and args.data):
        p.error("--model and --data are required")
    if args.num_examples is not None and args.num_examples < 0:
        p.error("--num-examples must be >= 0")
    if args.json and not Path(args.json).parent.is_dir():
        p.error(f"--json {args.json}: folder {Path(args.json).parent} does not exist")
    return args


def check_corpus_store(folder: str, model: str, step: int | None) -> None:
    """The store must be complete and hold this model's raw-passage embeddings (its ids are
    checked against the corpus while it is read)."""
    info = store_info(folder)
    if not info.complete:
        raise BadValue(f"{folder}: the store is not complete; run the encode command again")
    wanted = {"kind": "corpus", "instruction": None, "model": model_name(model), "step": step}
    for key, value in wanted.items():
        if info.source.get(key) != value:
            raise BadValue(
                f"{folder}: the store's {key} is {info.source.get(key)!r}, this evaluation's "
                f"{value!r}; encode the corpus with `python -m jax_iclemb.encode --model "
                f"{model}{'' if step is None else f' --step {step}'}` and no --instruction"
            )


def default_instruction(model: str) -> str:
    """The training default prompt of a workdir; the paper's MS MARCO instruction otherwise."""
    if is_workdir(model):
        return load_workdir_config(model).data.default_prompt
    return default_config().data.default_prompt


@cli
def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.make_beir:
        print(beir_from_jsonl(args.from_jsonl, args.out, split=args.split))
        return 0
    from jax_iclemb.beir_eval import evaluate_beir  # loads JAX: only when encoding
    from jax_iclemb.embedder import Embedder  # loads JAX and the model: only when encoding

    examples = load_examples(args.examples, args.num_examples) if args.examples else []
    data = load_beir(args.data, args.split)  # fails on bad data before loading the model
    if args.corpus_store:
        check_corpus_store(args.corpus_store, args.model, args.step)
    options = {
        key: value
        for key, value in (("query_max_len", args.query_max_len),
                           ("passage_max_len", args.passage_max_len), ("step", args.step))
        if value is not None
    }
    embedder = Embedder.from_pretrained(args.model, **options)
    instruction = args.instruction or default_instruction(args.model)
    result = evaluate_beir(
        embedder, data, instruction=instruction, examples=examples, keep_runs=args.keep_runs,
        ignore_identical_ids=not args.keep_identical_ids, corpus_store=args.corpus_store,
    )
    result["data"] = str(args.data)
    result["model"] = str(args.model)
    print(markdown_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
