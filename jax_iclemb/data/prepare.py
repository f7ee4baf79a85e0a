"""JSONL datasets -> a TFDS dataset in ArrayRecord format (one split per JSONL dataset).

    python -m jax_iclemb.data.prepare --src DIR --out TFDS_DIR [--name NAME] [--overwrite]

then train with `data.path = "tfds:NAME"`, `data.tfds_dir = TFDS_DIR`. tensorflow-datasets runs
without TensorFlow only with `file_format="array_record"` (written here) and random-access reading
(`as_data_source`, in `tfds_reader.py`). Each example holds one validated record as
reference-format JSON; the original dataset names and in-batch flags are kept in the builder's
metadata (metadata.json beside dataset_info.json), so reading restores them exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from jax_iclemb.data.records import BAD_RECORD_MODES, Dataset, record_to_dict
from jax_iclemb.data.sources import open_datasets
from jax_iclemb.data.tfds_reader import FORMAT
from jax_iclemb.errors import BadValue, PathExists, add_debug_flag, cli

log = logging.getLogger(__name__)

VERSION = "1.0.0"
_BUILDER_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def split_names(names: Sequence[str]) -> list[str]:
    """TFDS split names (\\w+ only) for dataset names, made unique in order."""
    out: list[str] = []
    for name in names:
        base = re.sub(r"\W", "_", name, flags=re.ASCII)
        split, n = base, 1
        while split in out:
            n += 1
            split = f"{base}_{n}"
        out.append(split)
    return out


def _builder_class(name: str, datasets: list[Dataset], source: str) -> type:
    """A builder class named `name` whose splits are `datasets` (not registered globally)."""
    splits = split_names([d.name for d in datasets])
    table = [
        {"split": s, "name": d.name, "in_batch_negatives": d.in_batch_negatives}
        for s, d in zip(splits, datasets, strict=True)
    ]

    class RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(VERSION)
        # No checksum/metadata files live beside this code; TFDS's lookup of them needs the
        # importlib_resources package, which tensorflow-datasets does not install.
        code_path = None

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"jax_iclemb training records prepared from {source}",
                features=tfds.features.FeaturesDict({"record": tfds.features.Text()}),
                # Keep file order so a split equals its JSONL file record for record.
                disable_shuffling=True,
                metadata=tfds.core.MetadataDict(format=FORMAT, datasets=table),
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
            del dl_manager  # nothing to download
            return {s: self._generate_examples(d) for s, d in zip(splits, datasets, strict=True)}

        def _generate_examples(self, dataset: Dataset) -> Iterator[tuple[int, dict[str, str]]]:
            for i in range(len(dataset)):
                yield i, {"record": json.dumps(record_to_dict(dataset[i]), ensure_ascii=False)}

    RecordsBuilder.name = name
    return RecordsBuilder


def prepare(
    src: str, out: str, name: str, *, on_bad_record: str = "error", overwrite: bool = False
) -> Path:
    """Validates the JSONL datasets under `src` and writes them as TFDS `name` in `out`.

    Returns the version directory written.
    """
    if not _BUILDER_NAME.match(name):
        raise BadValue(f"TFDS name must match {_BUILDER_NAME.pattern} (snake_case), got {name!r}")
    datasets = open_datasets(src, on_bad_record=on_bad_record)
    builder = _builder_class(name, datasets, src)(data_dir=out, file_format="array_record")
    target = Path(builder.data_dir)
    if target.exists():
        if not overwrite:
            raise PathExists(f"{target} exists; pass --overwrite to replace it")
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory() as downloads:  # TFDS insists on a download dir
        builder.download_and_prepare(download_dir=downloads)
    log.info("wrote %d splits to %s", len(datasets), target)
    return target


@cli
def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jax_iclemb.data.prepare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--src", required=True, help="a .jsonl file or a directory of them")
    parser.add_argument("--out", required=True, help="TFDS data_dir to write into")
    parser.add_argument("--name", help="TFDS dataset name (default: from --src)")
    parser.add_argument("--on-bad-record", choices=BAD_RECORD_MODES, default="error")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    name = args.name or re.sub(r"\W+", "_", Path(args.src).resolve().stem, flags=re.ASCII).lower()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tfds.disable_progress_bar()
    target = prepare(
        args.src, args.out, name, on_bad_record=args.on_bad_record, overwrite=args.overwrite
    )
    print(f"prepared tfds:{name} in {args.out} ({target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
