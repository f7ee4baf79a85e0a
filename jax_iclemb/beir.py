"""BEIR-format folders: read and cross-check one, read few-shot example files, and build one from
training records.

A BEIR folder holds `corpus.jsonl` ({"_id", "title", "text"}), `queries.jsonl` ({"_id", "text"})
and `qrels/<split>.tsv` (header `query-id  corpus-id  score`). A corpus text is
`title + " " + text` when there is a title, as in BEIR; queries without judgements in the split
are skipped, as BEIR does. Every malformed input names its file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from jax_iclemb.data.records import BadRecordError, parse_line
from jax_iclemb.errors import BadValue
from jax_iclemb.ir_metrics import Qrels


class EvalDataError(BadValue):
    """A malformed or inconsistent evaluation input; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class BeirData:
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]  # the judged queries only, in queries.jsonl order
    query_texts: list[str]
    qrels: Qrels


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


def iter_texts(path: Path, *, with_title: bool) -> Iterator[tuple[int, str, str]]:
    """(line number, _id, text) of each record, streamed (a corpus text is title + " " + text when
    the title is not empty)."""
    for lineno, obj in _jsonl_objects(path):
        where = f"{path}:{lineno}"
        doc_id = _field(obj, "_id", where)
        text = _field(obj, "text", where)
        title = _field(obj, "title", where, optional=True) if with_title else ""
        yield lineno, doc_id, f"{title} {text}" if title else text


def _read_texts(path: Path, *, with_title: bool) -> dict[str, str]:
    """_id -> text, every _id once."""
    texts: dict[str, str] = {}
    for lineno, doc_id, text in iter_texts(path, with_title=with_title):
        if doc_id in texts:
            raise EvalDataError(f"{path}:{lineno}: duplicate _id {doc_id!r}")
        texts[doc_id] = text
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
