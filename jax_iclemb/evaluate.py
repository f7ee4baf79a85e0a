"""Retrieval evaluation on a BEIR-format folder, zero-shot and few-shot side by side.

    python -m jax_iclemb.evaluate --model runs/tiny --data DIR \
        --instruction "Given a web search query, retrieve relevant passages that answer the query."\
        --examples eval_examples/MSMARCO.json [--json OUT.json]
    python -m jax_iclemb.evaluate --make-beir --from-jsonl train.jsonl --out DIR

A BEIR folder holds `corpus.jsonl` ({"_id", "title", "text"}), `queries.jsonl` ({"_id", "text"})
and `qrels/<split>.tsv` (header `query-id  corpus-id  score`). The corpus is encoded once (as
`title + " " + text` when there is a title, like BEIR), the judged queries zero-shot and, given
examples, few-shot; documents are ranked by dot product (the embeddings are L2-normalised), in
blocks so that memory stays bounded on large corpora. Metrics follow `jax_iclemb.metrics`
(trec_eval conventions). Queries of `queries.jsonl` without judgements in the split are skipped, as
BEIR does.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_iclemb.data.records import BadRecordError, parse_line
from jax_iclemb.errors import BadValue, add_debug_flag, cli
from jax_iclemb.metrics import Qrels, Run, mrr_at_k, ndcg_at_k, recall_at_k

# (name in results, label in the table, metric function, k)
METRICS = (
    ("ndcg@10", "nDCG@10", ndcg_at_k, 10),
    ("mrr@10", "MRR@10", mrr_at_k, 10),
    ("recall@10", "Recall@10", recall_at_k, 10),
    ("recall@100", "Recall@100", recall_at_k, 100),
)
TOP_K = max(k for *_, k in METRICS)
MODES = (("zero", "zero-shot"), ("few", "few-shot"))


class EvalDataError(BadValue):
    """A malformed or inconsistent evaluation input; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class BeirData:
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]  # the judged queries only, in queries.jsonl order
    query_texts: list[str]
    qrels: Qrels


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise EvalDataError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, obj


def _field(obj: dict[str, Any], key: str, where: str, *, optional: bool = False) -> str:
    value = obj.get(key, "" if optional else None)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # some BEIR sets store numeric ids
    if not isinstance(value, str):
        raise EvalDataError(f"{where}: field {key!r} must be a string, got {value!r}")
    return value


def _read_texts(path: Path, *, with_title: bool) -> dict[str, str]:
    """_id -> text (for a corpus: title + " " + text when the title is not empty)."""
    texts: dict[str, str] = {}
    for lineno, obj in _jsonl_objects(path):
        where = f"{path}:{lineno}"
        doc_id = _field(obj, "_id", where)
        text = _field(obj, "text", where)
        title = _field(obj, "title", where, optional=True) if with_title else ""
        if doc_id in texts:
            raise EvalDataError(f"{where}: duplicate _id {doc_id!r}")
        texts[doc_id] = f"{title} {text}" if title else text
    if not texts:
        raise EvalDataError(f"{path}: no records")
    return texts


def read_qrels(path: Path) -> Qrels:
    """`query-id  corpus-id  score` rows (after a header) -> {query: {doc: relevance}}."""
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found")
    qrels: Qrels = {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:2]] != ["query-id", "corpus-id"]:
            raise EvalDataError(f"{path}:1: expected the header 'query-id\\tcorpus-id\\tscore'")
        for lineno, row in enumerate(rows, 2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 3:
                raise EvalDataError(f"{path}:{lineno}: expected 3 tab-separated fields, got {row}")
            try:
                score = int(float(row[2]))
            except ValueError:
                raise EvalDataError(f"{path}:{lineno}: score {row[2]!r} is not a number") from None
            qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


def load_beir(folder: str | Path, split: str = "test") -> BeirData:
    """Reads and cross-checks a BEIR folder (every judged query and document must exist)."""
    folder = Path(folder)
    corpus = _read_texts(folder / "corpus.jsonl", with_title=True)
    queries = _read_texts(folder / "queries.jsonl", with_title=False)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    qrels = read_qrels(qrels_path)
    if not qrels:
        raise EvalDataError(f"{qrels_path}: no judgements, so no query can be evaluated")
    unknown_queries = sorted(set(qrels) - set(queries))
    if unknown_queries:
        raise EvalDataError(
            f"{qrels_path}: {len(unknown_queries)} judged queries are missing from "
            f"{folder / 'queries.jsonl'}, e.g. {unknown_queries[:5]}"
        )
    unknown_docs = sorted({d for judged in qrels.values() for d in judged} - set(corpus))
    if unknown_docs:
        raise EvalDataError(
            f"{qrels_path}: {len(unknown_docs)} judged documents are missing from "
            f"{folder / 'corpus.jsonl'}, e.g. {unknown_docs[:5]}"
        )
    judged = [q for q in queries if q in qrels]
    return BeirData(
        corpus_ids=list(corpus),
        corpus_texts=list(corpus.values()),
        query_ids=judged,
        query_texts=[queries[q] for q in judged],
        qrels=qrels,
    )


def load_examples(path: str | Path, num: int | None = None) -> list[dict[str, str]]:
    """The first `num` (default: all) `[{"query", "response"}]` task examples of a JSON file."""
    path = Path(path)
    try:
        examples = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(examples, list):
        raise EvalDataError(f"{path}: expected a JSON list of {{'query', 'response'}} objects")
    for i, e in enumerate(examples):
        if not (isinstance(e, dict) and isinstance(e.get("query"), str)
                and isinstance(e.get("response"), str)):
            raise EvalDataError(f"{path}: example {i} needs string 'query' and 'response': {e!r}")
    return examples[:num] if num is not None else examples


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def _descending_id_rank(doc_ids: Sequence[str]) -> np.ndarray:
    """Rank of each id in descending string order (on ties trec_eval ranks the smaller first)."""
    rank = np.empty(len(doc_ids), dtype=np.int64)
    rank[sorted(range(len(doc_ids)), key=lambda j: doc_ids[j], reverse=True)] = np.arange(
        len(doc_ids)
    )
    return rank


def _select_top_k(scores: np.ndarray, ranks: np.ndarray, k: int) -> np.ndarray:
    """Column indices [Q, k] of each row's k best entries by (score desc, rank asc)."""
    kth = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k][:, None]
    above = scores >= kth
    counts = above.sum(axis=1)
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    exact = counts == k  # the common case: no tie straddles the cut-off
    out[exact] = np.nonzero(above[exact])[1].reshape(-1, k)
    for row in np.flatnonzero(~exact):
        cols = np.flatnonzero(above[row])
        order = np.lexsort((ranks[row, cols], -scores[row, cols]))
        out[row] = cols[order[:k]]
    return out


def blocked_top_k(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    *,
    ignore_identical_ids: bool = False,
    query_block: int = 1024,
    doc_block: int = 16384,
) -> Run:
    """Each query's top-k documents by dot product, as `metrics.top_k_from_scores` selects them
    from the full [Q, N] matrix, but holding at most [query_block, k + doc_block] scores at once.

    `ignore_identical_ids`: a document whose id is the query's is never retrieved (BEIR's exact
    search and mteb do this: in ArguAna and Quora the queries are also in the corpus)."""
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"embedding shapes do not match: queries {queries.shape}, "
                         f"corpus {corpus.shape}")
    if (len(query_ids), len(doc_ids)) != (len(queries), len(corpus)):
        raise ValueError(f"{len(query_ids)} query ids / {len(doc_ids)} doc ids for "
                         f"{len(queries)} / {len(corpus)} embeddings")
    k = min(k, len(doc_ids))
    id_rank = _descending_id_rank(doc_ids)
    column = {doc: j for j, doc in enumerate(doc_ids)} if ignore_identical_ids else {}
    run: Run = {}
    for q0 in range(0, len(queries), query_block):
        q = queries[q0 : q0 + query_block]
        same = [(i, column[qid]) for i, qid in enumerate(query_ids[q0 : q0 + len(q)])
                if qid in column]
        best_scores = np.empty((len(q), 0), dtype=np.float32)
        best_cols = np.empty((len(q), 0), dtype=np.int64)
        for d0 in range(0, len(corpus), doc_block):
            block = q @ corpus[d0 : d0 + doc_block].T
            if np.isnan(block).any():
                raise ValueError("embeddings produced NaN scores")
            for i, j in same:
                if d0 <= j < d0 + block.shape[1]:
                    block[i, j - d0] = -np.inf  # ranked last, and dropped below
            cols = np.concatenate(
                [best_cols, np.broadcast_to(np.arange(d0, d0 + block.shape[1]), block.shape)], 1
            )
            scores = np.concatenate([best_scores, block], axis=1)
            keep = _select_top_k(scores, id_rank[cols], min(k, scores.shape[1]))
            best_scores = np.take_along_axis(scores, keep, axis=1)
            best_cols = np.take_along_axis(cols, keep, axis=1)
        for i, qid in enumerate(query_ids[q0 : q0 + query_block]):
            run[qid] = {
                doc_ids[j]: float(s) for j, s in zip(best_cols[i], best_scores[i]) if s > -np.inf
            }
    return run


def retrieval_metrics(qrels: Qrels, run: Run) -> dict[str, float]:
    return {name: fn(qrels, run, k)[1] for name, _, fn, k in METRICS}


def evaluate_beir(
    embedder: Any,
    data: str | Path | BeirData,
    *,
    instruction: str,
    examples: Sequence[Mapping[str, str]] = (),
    split: str = "test",
    keep_runs: bool = False,
    ignore_identical_ids: bool = True,
) -> dict[str, Any]:
    """Zero-shot (and, given `examples`, few-shot) retrieval metrics of an `Embedder` on a BEIR
    folder (or its loaded `BeirData`): {"zero": {metric: value}, "few": {...}, plus counts and
    settings}. With `keep_runs`, also "runs": {mode: {query: {doc: score}}}, the top 10 ranked.
    A document with the query's own id is not retrieved unless `ignore_identical_ids` is False
    (on by default, as in BEIR and mteb)."""
    source = "" if isinstance(data, BeirData) else str(data)
    if not isinstance(data, BeirData):
        data = load_beir(data, split)
    corpus = embedder.encode_corpus(data.corpus_texts)
    result: dict[str, Any] = {
        "data": source,
        "split": split,
        "num_queries": len(data.query_ids),
        "num_documents": len(data.corpus_ids),
        "instruction": instruction,
        "num_examples": len(examples),
        "ignore_identical_ids": ignore_identical_ids,
    }
    shots = {"zero": ()} | ({"few": examples} if examples else {})
    for mode, mode_examples in shots.items():
        queries = embedder.encode_queries(
            data.query_texts, instruction=instruction, examples=mode_examples
        )
        run = blocked_top_k(
            queries, corpus, TOP_K, data.query_ids, data.corpus_ids,
            ignore_identical_ids=ignore_identical_ids,
        )
        result[mode] = retrieval_metrics(data.qrels, run)
        if keep_runs:
            result.setdefault("runs", {})[mode] = {
                qid: dict(sorted(docs.items(), key=lambda d: (d[1], d[0]), reverse=True)[:10])
                for qid, docs in run.items()
            }
    return result


def evaluate_model(
    model: Any, tokenizer: Any, config: Any, mesh: Any
) -> dict[str, float]:
    """The `eval.*` evaluation of a model during training: {"<metric>/<zero|few>": value}.

    The model is used as it is (the current weights, no checkpoint round trip), with the run's
    sequence lengths and pooling.
    """
    from jax_iclemb.encode import Embedder  # encode imports train, which calls this

    if not config.eval.data:
        raise EvalDataError("eval.every is set but eval.data (a BEIR folder) is empty")
    embedder = Embedder(
        model,
        tokenizer,
        query_max_len=config.data.query_max_len,
        passage_max_len=config.data.passage_max_len,
        pooling=config.model.pooling,
        mesh=mesh,
        progress=False,
    )
    examples = load_examples(config.eval.examples) if config.eval.examples else []
    instruction = config.eval.instruction or config.data.default_prompt
    result = evaluate_beir(embedder, config.eval.data, instruction=instruction, examples=examples)
    return {
        f"{name}/{mode}": result[mode][name]
        for mode, _ in MODES
        if mode in result
        for name, *_ in METRICS
    }


def markdown_table(result: Mapping[str, Any]) -> str:
    modes = [(m, label) for m, label in MODES if m in result]
    lines = [
        "| metric | " + " | ".join(label for _, label in modes) + " |",
        "|---" * (len(modes) + 1) + "|",
    ]
    for name, label, *_ in METRICS:
        values = " | ".join(f"{result[m][name]:.4f}" for m, _ in modes)
        lines.append(f"| {label} | {values} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Building a BEIR folder from training-format records
# ---------------------------------------------------------------------------------------------


def beir_from_jsonl(jsonl: str | Path, out: str | Path, *, split: str = "test") -> Path:
    """A BEIR folder from reference-format records: each record's query is a query, its positives
    are its relevant documents, its negatives corpus distractors; identical texts share one id."""
    jsonl, out = Path(jsonl), Path(out)
    if not jsonl.is_file():
        raise EvalDataError(f"{jsonl}: file not found")
    doc_ids: dict[str, str] = {}
    queries: list[dict[str, str]] = []
    qrels: list[tuple[str, str]] = []
    with open(jsonl, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = parse_line(line)
            except BadRecordError as e:
                raise EvalDataError(f"{jsonl}:{lineno}: {e}") from None
            qid = f"q{len(queries)}"
            queries.append({"_id": qid, "text": record.query})
            for text in (*record.pos, *record.neg):
                doc_ids.setdefault(text, f"d{len(doc_ids)}")
            qrels += [(qid, doc_ids[text]) for text in dict.fromkeys(record.pos)]
    if not queries:
        raise EvalDataError(f"{jsonl}: no records")
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "queries.jsonl", queries)
    _write_jsonl(
        out / "corpus.jsonl", [{"_id": i, "title": "", "text": t} for t, i in doc_ids.items()]
    )
    with open(out / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t1\n" for q, d in qrels)
    return out


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


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


def default_instruction(model: str) -> str:
    """The training default prompt of a workdir; the paper's MS MARCO instruction otherwise."""
    from jax_iclemb.config import default_config
    from jax_iclemb.export import is_workdir, load_workdir_config

    if is_workdir(model):
        return load_workdir_config(model).data.default_prompt
    return default_config().data.default_prompt


@cli
def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.make_beir:
        print(beir_from_jsonl(args.from_jsonl, args.out, split=args.split))
        return 0
    from jax_iclemb.encode import Embedder  # imports JAX: only when encoding

    examples = load_examples(args.examples, args.num_examples) if args.examples else []
    data = load_beir(args.data, args.split)  # fails on bad data before loading the model
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
        ignore_identical_ids=not args.keep_identical_ids,
    )
    result["data"] = str(args.data)
    result["model"] = str(args.model)
    print(markdown_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
