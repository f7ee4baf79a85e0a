"""Reading a TFDS dataset written by `python -m jax_iclemb.data.prepare` (ArrayRecord format).

Random access through `as_data_source` only, so tensorflow-datasets runs without TensorFlow. Each
example is one record as reference-format JSON, validated again when read; the dataset names and
in-batch flags come from the builder's metadata, as `prepare` wrote them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from jax_iclemb.data.records import BadRecordError, Dataset, Record, parse_line
from jax_iclemb.errors import BadValue, MissingPath

FORMAT = "jax_iclemb-records-v1"  # metadata tag: what the "record" feature holds


class TfdsDataset:
    """Random access to one split of a prepared TFDS dataset (an ArrayRecord data source)."""

    skipped = 0  # bad records were dropped (or refused) when the dataset was prepared

    def __init__(self, source: Any, name: str, in_batch_negatives: bool, where: str):
        self.name = name
        self.in_batch_negatives = in_batch_negatives
        self._source = source
        self._where = where

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        n = len(self._source)
        if not -n <= index < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} records")
        index %= n
        try:
            return parse_line(self._source[index]["record"])
        except BadRecordError as e:
            raise BadRecordError(f"{self._where}[{index}]: {e}") from None

    def __repr__(self) -> str:
        return (
            f"TfdsDataset({self.name!r}, {len(self)} records, "
            f"in_batch_negatives={self.in_batch_negatives}, split={self._where!r})"
        )


def _version_dir(name: str, tfds_dir: str | None) -> Path:
    root = Path(tfds_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()
    base = root / name
    versions = sorted(
        (p for p in base.glob("*") if (p / "dataset_info.json").is_file()),
        key=lambda p: tuple(int(x) for x in p.name.split(".") if x.isdigit()),
    )
    if not versions:
        raise MissingPath(
            f"no prepared TFDS dataset {name!r} in {root} (expected {base}/<version>/"
            "dataset_info.json; write one with `python -m jax_iclemb.data.prepare`)"
        )
    return versions[-1]


def open_tfds(name: str, tfds_dir: str | None) -> list[Dataset]:
    """The datasets of a TFDS dataset written by `prepare`, with their original names and flags."""
    version_dir = _version_dir(name, tfds_dir)
    builder = tfds.builder_from_directory(version_dir)
    metadata = builder.info.metadata or {}
    if metadata.get("format") != FORMAT:
        raise BadValue(
            f"{version_dir} was not written by jax_iclemb.data.prepare "
            f"(metadata.json format {metadata.get('format')!r}, expected {FORMAT!r})"
        )
    return [
        TfdsDataset(
            builder.as_data_source(split=entry["split"]),
            entry["name"],
            bool(entry["in_batch_negatives"]),
            f"{version_dir}:{entry['split']}",
        )
        for entry in metadata["datasets"]
    ]
