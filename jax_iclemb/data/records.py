"""Training records: the reference JSONL format, its validation, and the JSONL reader.

One JSONL file (or one TFDS split, tfds_reader.py) is one dataset = one task. A JSONL dataset keeps
only an index of byte offsets; `dataset[i]` seeks, reads and parses one line, so memory does not
grow with the data and every process (or forked worker) can read any record. `sources.py` opens
the datasets of a `data.path`.
"""

from __future__ import annotations

import array
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from jax_iclemb.errors import BadValue, MissingPath

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TaskType:
    """What a record `type` means to the recipe: one row per type, read by sampling, templates and
    the pipeline."""

    # "retrieval" (a query and its passages) or "symmetric" (STS, classification, clustering):
    # the paper's recipe batches them differently (data.batch_size_by_kind).
    kind: Literal["retrieval", "symmetric"]
    # Whether the other queries' passages serve as negatives: classes and clusters recur within a
    # batch, so another query's passage may well be this query's positive.
    in_batch_negatives: bool
    # Passages formatted like a query without examples (both sides are the same kind of text).
    symmetric_passages: bool
    # A fixed passage group size (positive + negatives), or None for data.train_group_size.
    group_size: int | None
    # The response of an in-context example when the record has no `response`: the sampled
    # positive ("pos"), or the record's `category` ("category", then a required field).
    response_from: Literal["pos", "category"]


TASK_TYPES = {  # kind, in_batch_negatives, symmetric_passages, group_size, response_from
    "normal": TaskType("retrieval", True, False, None, "pos"),
    "only_1neg": TaskType("retrieval", True, False, 2, "pos"),
    "symmetric_sts": TaskType("symmetric", True, True, None, "pos"),
    "symmetric_class": TaskType("symmetric", False, False, None, "pos"),
    "symmetric_clustering": TaskType("symmetric", False, True, None, "category"),
}
RECORD_TYPES = tuple(TASK_TYPES)
# A dataset whose file stem, a parent dir or the root dir ends in this has no in-batch negatives,
# whatever its records' types (the reference's folder convention).
NO_IN_BATCH_SUFFIX = "no_in_batch_neg"
BAD_RECORD_MODES = ("error", "skip")
_READ_CHUNK = 1 << 14


class BadRecordError(BadValue):
    """A record or file that cannot be trained on; the message names file:line and the field."""


@dataclasses.dataclass(frozen=True)
class Record:
    query: str
    pos: tuple[str, ...]  # >= 1
    neg: tuple[str, ...]
    prompt: str | None = None
    type: str = "normal"
    category: str | None = None
    pos_scores: tuple[float, ...] | None = None
    neg_scores: tuple[float, ...] | None = None
    # Our extension: a passage whose label equals a query's label is a positive for that query,
    # so it is never one of its negatives (a false negative). `label` is the label of the query
    # and its positives, `neg_labels` (one per `neg`, None = unlabelled) those of hard negatives.
    label: str | None = None
    neg_labels: tuple[str | None, ...] | None = None
    # Our extension: when set, the response of this record when it serves as an in-context example
    # (instead of its sampled positive), e.g. a short answer that reveals the task.
    response: str | None = None

    @property
    def task(self) -> TaskType:
        return TASK_TYPES[self.type]


class Dataset(Protocol):
    name: str
    in_batch_negatives: bool

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


# ----------------------------------------------------------------------------- validation


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _str_list(obj: dict[str, Any], key: str, *, nonempty_items: bool) -> tuple[str, ...]:
    value = obj[key]
    if not isinstance(value, list):
        raise BadRecordError(f"field '{key}': expected a list of strings, got {_kind(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise BadRecordError(f"field '{key}[{i}]': expected a string, got {_kind(item)}")
        if nonempty_items and not item:
            raise BadRecordError(f"field '{key}[{i}]': empty string")
    return tuple(value)


def _scores(obj: dict[str, Any], key: str, expected_len: int, of: str) -> tuple[float, ...]:
    value = obj[key]
    if not isinstance(value, list):
        raise BadRecordError(f"field '{key}': expected a list of numbers, got {_kind(value)}")
    for i, item in enumerate(value):
        # bool is an int subclass; a true/false score is a data bug, not a number.
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            raise BadRecordError(f"field '{key}[{i}]': expected a finite number, got {item!r}")
    if len(value) != expected_len:
        raise BadRecordError(
            f"field '{key}': {len(value)} scores for {expected_len} entries of '{of}'"
        )
    return tuple(float(v) for v in value)


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRecordError(f"field '{key}': expected a string, got {_kind(value)}")
    return value


def _neg_labels(obj: dict[str, Any], num_neg: int) -> tuple[str | None, ...] | None:
    value = obj.get("neg_labels")
    if value is None:
        return None
    if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
        raise BadRecordError("field 'neg_labels': expected a list of strings or nulls")
    if len(value) != num_neg:
        raise BadRecordError(f"field 'neg_labels': {len(value)} labels for {num_neg} negatives")
    return tuple(value)


def parse_record(obj: Any) -> Record:
    """Validates one decoded JSON object and returns it as a Record (unknown fields are ignored).

    Raises BadRecordError naming the offending field; callers prefix the location.
    """
    if not isinstance(obj, dict):
        raise BadRecordError(f"expected a JSON object, got {_kind(obj)}")
    for key in ("query", "pos"):
        if key not in obj:
            raise BadRecordError(f"field '{key}': missing")
    query = obj["query"]
    if not isinstance(query, str):
        raise BadRecordError(f"field 'query': expected a string, got {_kind(query)}")
    pos = _str_list(obj, "pos", nonempty_items=True)
    if not pos:
        raise BadRecordError("field 'pos': empty list (at least one positive is needed)")
    # Lenient like the reference data: a missing or null `neg` means no hard negatives.
    neg = _str_list(obj, "neg", nonempty_items=False) if obj.get("neg") is not None else ()
    rtype = obj.get("type")
    rtype = "normal" if rtype is None else rtype
    if rtype not in RECORD_TYPES:
        raise BadRecordError(f"field 'type': unknown type {rtype!r}, known: {RECORD_TYPES}")
    prompt = _optional_str(obj, "prompt")
    category = _optional_str(obj, "category")
    label = _optional_str(obj, "label")
    neg_labels = _neg_labels(obj, len(neg))
    response = _optional_str(obj, "response")
    if response == "":
        raise BadRecordError("field 'response': empty string")
    if TASK_TYPES[rtype].response_from == "category" and category is None:
        # Its examples' response is the category: without it the record is unusable.
        raise BadRecordError(f"field 'category': required for type {rtype!r}")
    has_pos_scores = obj.get("pos_scores") is not None
    has_neg_scores = obj.get("neg_scores") is not None
    if has_pos_scores != has_neg_scores:
        missing = "neg_scores" if has_pos_scores else "pos_scores"
        raise BadRecordError(f"field '{missing}': teacher scores need pos_scores and neg_scores")
    pos_scores = neg_scores = None
    if has_pos_scores:
        pos_scores = _scores(obj, "pos_scores", len(pos), "pos")
        neg_scores = _scores(obj, "neg_scores", len(neg), "neg")
    return Record(
        query=query,
        pos=pos,
        neg=neg,
        prompt=prompt,
        type=rtype,
        category=category,
        pos_scores=pos_scores,
        neg_scores=neg_scores,
        label=label,
        neg_labels=neg_labels,
        response=response,
    )


def parse_line(line: bytes) -> Record:
    """Decodes one JSONL line (bytes, as stored on disk) into a validated Record."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecordError(f"non-UTF-8 bytes at byte {e.start} of the line") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecordError(f"invalid JSON: {e.msg} at column {e.colno}") from None
    return parse_record(obj)


def record_to_dict(record: Record) -> dict[str, Any]:
    """The reference-format JSON object of a record (None fields omitted)."""
    out: dict[str, Any] = {"query": record.query, "pos": list(record.pos), "neg": list(record.neg)}
    optional = ("prompt", "category", "pos_scores", "neg_scores", "label", "neg_labels", "response")
    for key in optional:
        value = getattr(record, key)
        if value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    out["type"] = record.type
    return out


# ----------------------------------------------------------------------------- JSONL reader


def _is_blank(line: bytes) -> bool:
    return not line.strip()


def _index_jsonl(path: Path, on_bad_record: str) -> tuple[np.ndarray, int]:
    """One streaming pass validating every line; returns (offsets of valid records, skipped)."""
    offsets = array.array("q")
    skipped = 0
    offset = 0
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not _is_blank(line):
                try:
                    parse_line(line)
                except BadRecordError as e:
                    if on_bad_record == "error":
                        raise BadRecordError(f"{path}:{lineno}: {e}") from None
                    log.debug("skipping %s:%d: %s", path, lineno, e)
                    skipped += 1
                else:
                    offsets.append(offset)
            offset += len(line)
    return np.frombuffer(offsets, dtype=np.int64).copy(), skipped


class JsonlDataset:
    """Random access to one validated JSONL file through a byte-offset index.

    Reads use positional `os.pread` on one descriptor: no shared file position, so concurrent
    threads and forked workers can read at the same time.
    """

    def __init__(self, path: Path, name: str, in_batch_negatives: bool, on_bad_record: str):
        self.path = path
        self.name = name
        self.in_batch_negatives = in_batch_negatives
        self.offsets, self.skipped = _index_jsonl(path, on_bad_record)
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.offsets)

    def _read_line(self, offset: int) -> bytes:
        chunks = []
        while True:
            chunk = os.pread(self._fd, _READ_CHUNK, offset)
            end = chunk.find(b"\n")
            if end >= 0 or not chunk:
                chunks.append(chunk if end < 0 else chunk[:end])
                return b"".join(chunks)
            chunks.append(chunk)
            offset += len(chunk)

    def __getitem__(self, index: int) -> Record:
        n = len(self.offsets)
        if not -n <= index < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} records")
        offset = int(self.offsets[index])
        try:
            return parse_line(self._read_line(offset))
        except BadRecordError as e:
            raise BadRecordError(f"{self.path} (byte {offset}): {e} (file changed?)") from None

    def __iter__(self) -> Iterator[Record]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict[str, Any]:
        # A descriptor does not cross process boundaries: the copy opens its own.
        return {k: v for k, v in self.__dict__.items() if k != "_fd"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __del__(self, _close=os.close) -> None:  # bound early: at exit `os` may be torn down
        if getattr(self, "_fd", None) is not None:
            _close(self._fd)

    def __repr__(self) -> str:
        return (
            f"JsonlDataset({self.name!r}, {len(self)} records, "
            f"in_batch_negatives={self.in_batch_negatives}, path={str(self.path)!r})"
        )


def in_batch_negatives_for(root_name: str, relative: Path) -> bool:
    """False when the file stem, a parent dir or the root dir ends in no_in_batch_neg."""
    names = [root_name, *relative.parent.parts, relative.stem]
    return not any(n.endswith(NO_IN_BATCH_SUFFIX) for n in names)


def _jsonl_files(path: Path) -> tuple[Path, list[Path]]:
    """(root, files): the root directory names are taken relative to."""
    if not path.exists():
        raise MissingPath(
            f"data path does not exist: {path} (data.path: a .jsonl file, a folder of them, "
            f"'tfds:NAME' or 'builtin')"
        )
    if path.is_file():
        if path.suffix != ".jsonl":
            raise BadValue(f"data file must be a .jsonl file: {path}")
        return path.parent, [path]
    files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
    if not files:
        raise MissingPath(f"no *.jsonl files under data directory: {path}")
    return path, files


def task_kind(dataset: Dataset) -> str:
    """"retrieval" or "symmetric" (`TaskType.kind`), read from the dataset's first record: a
    dataset is one task."""
    return dataset[0].task.kind


def open_jsonl(path: Path, on_bad_record: str) -> list[JsonlDataset]:
    """The datasets of a .jsonl file or of a directory's *.jsonl files (recursive), named by
    their paths relative to the directory."""
    root, files = _jsonl_files(path)
    datasets = []
    for file in files:
        rel = file.relative_to(root)
        name = rel.with_suffix("").as_posix()
        flag = in_batch_negatives_for(root.name, rel)
        datasets.append(JsonlDataset(file, name, flag, on_bad_record))
    return datasets
