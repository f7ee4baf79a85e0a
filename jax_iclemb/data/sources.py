"""Training data by `data.path`: JSONL files (records.py), a prepared TFDS dataset
(tfds_reader.py) or the project's builtin data (builtin.py), opened as named datasets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from jax_iclemb.data.builtin import builtin_data_dir
from jax_iclemb.data.records import BAD_RECORD_MODES, BadRecordError, Dataset, open_jsonl
from jax_iclemb.errors import BadValue

log = logging.getLogger(__name__)


def _drop_empty(datasets: list[Any], on_bad_record: str) -> list[Any]:
    """Empty datasets cannot be trained on: an error, or in skip mode a warning if others remain."""
    empty = [d for d in datasets if len(d) == 0]
    if not empty:
        return datasets
    where = ", ".join(f"{getattr(d, 'path', d.name)} ({d.skipped} bad records)" for d in empty)
    if on_bad_record == "error" or len(empty) == len(datasets):
        raise BadRecordError(f"dataset(s) with no valid records: {where}")
    log.warning("dropping dataset(s) with no valid records: %s", where)
    return [d for d in datasets if len(d) > 0]


def open_datasets(
    path: str, *, on_bad_record: str = "error", tfds_dir: str | None = None
) -> list[Dataset]:
    """Opens and validates every dataset under `path`, sorted by name.

    path: a .jsonl file, a directory (recursive *.jsonl), "tfds:NAME" (an ArrayRecord TFDS dataset
    written by `python -m jax_iclemb.data.prepare`, found in `tfds_dir`), or "builtin" (the
    project's generated default data).
    """
    if on_bad_record not in BAD_RECORD_MODES:
        raise BadValue(f"on_bad_record must be one of {BAD_RECORD_MODES}, got {on_bad_record!r}")
    if path.startswith("tfds:"):
        # tensorflow_datasets is a large import (hundreds of modules): JSONL paths do without it.
        from jax_iclemb.data.tfds_reader import open_tfds

        datasets = open_tfds(path.removeprefix("tfds:"), tfds_dir or None)
    else:
        if path == "builtin":
            path = str(builtin_data_dir())
        datasets = open_jsonl(Path(path).expanduser(), on_bad_record)
    datasets = _drop_empty(datasets, on_bad_record)
    datasets.sort(key=lambda d: d.name)
    skipped = {d.name: d.skipped for d in datasets if getattr(d, "skipped", 0)}
    if skipped:
        log.warning("skipped bad records (dataset: count): %s", skipped)
    return datasets
