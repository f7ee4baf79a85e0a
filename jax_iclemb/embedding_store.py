"""An embedding store: the ids and vectors of a corpus too large for host memory, in shards.

    STORE/
      manifest.json              what the store is of, its size, its shards, whether complete
      shard-00000.safetensors    rows [0, shard_size)
      shard-00001.safetensors    rows [shard_size, 2 * shard_size)
      ...

A shard is one safetensors file of three tensors: `embeddings` [n, D] in the store's dtype
(float32, float16 or bfloat16), `ids` (the rows' ids in UTF-8, concatenated; uint8) and
`id_offsets` [n + 1] (int64; row i's id is `ids[id_offsets[i]:id_offsets[i + 1]]`). Safetensors
rather than `.npy` plus an ids file: a shard is then one file, so one rename commits it, bfloat16
keeps its dtype (a `.npy` stores ml_dtypes' bfloat16 as opaque bytes), and any safetensors reader
(NumPy, PyTorch, Rust) opens it without pickle. A shard is written as `.shard-00000.safetensors.tmp`
and renamed when complete: a killed writer leaves a temp file that nothing reads, never half a
shard.

Shard k holds rows [k * shard_size, (k + 1) * shard_size): the boundaries are a function of the
row order and the shard size alone, so several writers (processes) can share a store and a rerun
can skip the shards already written. `manifest.json` is written first with `"complete": false`
(what the store is of, for a resumed run to check) and again, with the dimension, once every shard
is in place; only a complete store is read. NumPy and safetensors only: no JAX.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from jax_iclemb.atomic import write_atomically
from jax_iclemb.errors import BadValue, MissingPath

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # in file headers
MANIFEST = "manifest.json"
FORMAT = "jax_iclemb.embedding_store/1"
SHARD = re.compile(r"shard-(\d+)\.safetensors")
TEMP = re.compile(r"\.(shard-\d+\.safetensors|manifest\.json)\.tmp")


@dataclasses.dataclass(frozen=True)
class StoreInfo:
    """What `manifest.json` says. `source` is the writer's description of what was encoded (model,
    input, settings); `dim` is None until the store is complete."""

    count: int
    shard_size: int
    dtype: str
    source: dict[str, Any]
    dim: int | None = None
    complete: bool = False

    @property
    def num_shards(self) -> int:
        return math.ceil(self.count / self.shard_size)

    def shard_rows(self, index: int) -> int:
        """Rows of shard `index` (the last one may be short)."""
        return min(self.shard_size, self.count - index * self.shard_size)


def model_name(model: str | Path) -> str:
    """How a store's `source` names the model that encoded it: a folder's absolute path, else
    the Hub id as given."""
    return str(Path(model).absolute()) if Path(model).exists() else str(model)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def check_settings(count: int, shard_size: int, dtype: str) -> None:
    if dtype not in DTYPES:
        raise BadValue(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if shard_size < 1:
        raise BadValue(f"shard size must be >= 1, got {shard_size}")
    if count < 1:
        raise BadValue("a store needs at least one row")


def write_manifest(folder: str | Path, info: StoreInfo) -> None:
    check_settings(info.count, info.shard_size, info.dtype)
    manifest = {
        "format": FORMAT, **dataclasses.asdict(info),
        "shards": [shard_name(i) for i in range(info.num_shards)],
    }
    text = json.dumps(manifest, indent=2) + "\n"
    write_atomically(Path(folder) / MANIFEST, lambda p: p.write_text(text, encoding="utf-8"))


def store_info(folder: str | Path) -> StoreInfo:
    """The manifest of the store in `folder` (complete or not)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise MissingPath(f"{folder}: not an embedding store (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.pop("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        manifest.pop("shards")
        info = StoreInfo(**manifest)
        check_settings(info.count, info.shard_size, info.dtype)
    except (ValueError, KeyError, TypeError) as e:
        raise BadValue(f"{path}: not a manifest of an embedding store ({e})") from None
    return info


def finished_shards(folder: str | Path) -> list[int]:
    """Indices of the shards written in full (the temp files of unfinished ones are not listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if (m := SHARD.fullmatch(p.name)))


def is_temp(path: Path) -> bool:
    """A file a killed writer left (a shard or manifest it never renamed)."""
    return bool(TEMP.fullmatch(path.name))


def remove_store(folder: str | Path) -> None:
    """Delete the store's files (manifest, shards, temp files) from `folder`, nothing else."""
    for path in Path(folder).iterdir():
        if path.name == MANIFEST or SHARD.fullmatch(path.name) or is_temp(path):
            path.unlink()


def write_shard(
    folder: str | Path, index: int, ids: Sequence[str], embeddings: np.ndarray, dtype: str
) -> Path:
    """Shard `index` of `ids` and their `embeddings` [n, D], stored as `dtype`; atomic."""
    if embeddings.ndim != 2 or len(ids) != embeddings.shape[0]:
        raise ValueError(f"{len(ids)} ids for embeddings of shape {embeddings.shape}")
    encoded = [i.encode("utf-8") for i in ids]
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    tensors = {
        "embeddings": np.ascontiguousarray(embeddings, dtype=DTYPES[dtype]),
        "ids": np.frombuffer(b"".join(encoded), np.uint8).copy(),
        "id_offsets": offsets,
    }
    path = Path(folder) / shard_name(index)
    write_atomically(path, lambda p: save_file(tensors, p))
    return path


def read_shard(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(ids, embeddings in the stored dtype) of one shard file."""
    try:
        tensors = load_file(path)
        blob, offsets = tensors["ids"].tobytes(), tensors["id_offsets"].tolist()
        ids = [blob[a:b].decode("utf-8") for a, b in itertools.pairwise(offsets)]
        embeddings = tensors["embeddings"]
    except (SafetensorError, KeyError, UnicodeDecodeError, OSError) as e:
        raise BadValue(f"{path}: not a shard of an embedding store ({e})") from None
    if embeddings.ndim != 2 or len(ids) != embeddings.shape[0]:
        raise BadValue(f"{path}: {len(ids)} ids for embeddings of shape {embeddings.shape}")
    return ids, embeddings


def shard_shape(path: str | Path) -> tuple[list[int], str]:
    """(shape, dtype name) of a shard's embeddings, from its header alone."""
    try:
        with safe_open(path, framework="numpy") as f:
            part = f.get_slice("embeddings")
            return part.get_shape(), part.get_dtype()
    except (SafetensorError, OSError) as e:
        raise BadValue(f"{path}: not a shard of an embedding store ({e})") from None


def finish_store(folder: str | Path) -> StoreInfo:
    """Check that every shard of the (incomplete) store in `folder` is written with its rows,
    the store's dtype and one dimension, then mark the manifest complete; returns it."""
    folder = Path(folder)
    info = store_info(folder)
    missing = sorted(set(range(info.num_shards)) - set(finished_shards(folder)))
    if missing:
        raise BadValue(
            f"{folder}: {len(missing)} of {info.num_shards} shards are not written yet, e.g. "
            f"{shard_name(missing[0])}; run the command that wrote it again to finish it"
        )
    dims = set()
    for index in range(info.num_shards):
        path = folder / shard_name(index)
        shape, dtype = shard_shape(path)
        if shape[0] != info.shard_rows(index) or dtype != SAFETENSORS_DTYPES[info.dtype]:
            raise BadValue(
                f"{path}: {shape[0]} rows of {dtype}, but the manifest says "
                f"{info.shard_rows(index)} of {info.dtype}"
            )
        dims.add(shape[1])
    if len(dims) != 1:
        raise BadValue(f"{folder}: shards of different dimensions {sorted(dims)}")
    info = dataclasses.replace(info, dim=dims.pop(), complete=True)
    write_manifest(folder, info)
    return info


def read_store(folder: str | Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, float32 embeddings [n, D]) of each shard of a complete store, in row order."""
    folder = Path(folder)
    info = store_info(folder)
    if not info.complete:
        done = len(finished_shards(folder))
        raise BadValue(
            f"{folder}: the store is not complete ({done} of {info.num_shards} shards written); "
            "run the command that writes it again to finish it"
        )
    for index in range(info.num_shards):
        path = folder / shard_name(index)
        if not path.is_file():
            raise MissingPath(f"{path}: shard missing from a complete store")
        ids, embeddings = read_shard(path)
        if embeddings.shape != (info.shard_rows(index), info.dim):
            raise BadValue(
                f"{path}: embeddings of shape {embeddings.shape}, but the manifest says "
                f"{(info.shard_rows(index), info.dim)}"
            )
        yield ids, embeddings.astype(np.float32)


class StoreWriter:
    """Appends rows in order and writes each shard as soon as its `shard_size` rows are in.

    A writer that owns only some shards (one process of several, or a resumed run) `seek`s to
    the first row of each shard before appending its rows; `flush` writes the last, short shard.
    Host memory holds one shard of embeddings at most."""

    def __init__(self, folder: str | Path, *, shard_size: int, dtype: str):
        check_settings(1, shard_size, dtype)
        self.folder = Path(folder)
        self.shard_size = shard_size
        self.dtype = dtype
        self._shard = 0
        self._ids: list[str] = []
        self._embeddings: list[np.ndarray] = []

    @property
    def buffered(self) -> int:
        return len(self._ids)

    def seek(self, shard: int) -> None:
        """Start appending at the first row of `shard`."""
        if self._ids:
            raise ValueError(f"seek with {len(self._ids)} rows of shard {self._shard} unwritten")
        self._shard = shard

    def append(self, ids: Sequence[str], embeddings: np.ndarray) -> None:
        if len(ids) != len(embeddings):
            raise ValueError(f"{len(ids)} ids for {len(embeddings)} embeddings")
        start = 0
        while start < len(ids):
            take = min(self.shard_size - len(self._ids), len(ids) - start)
            self._ids += ids[start : start + take]
            # Stored in the store's dtype at once: the buffer is never wider than a shard.
            self._embeddings.append(embeddings[start : start + take].astype(DTYPES[self.dtype]))
            start += take
            if len(self._ids) == self.shard_size:
                self.flush()

    def flush(self) -> None:
        """Write the buffered rows as the current shard (a no-op when none are buffered)."""
        if not self._ids:
            return
        write_shard(
            self.folder, self._shard, self._ids, np.concatenate(self._embeddings), self.dtype
        )
        self._shard += 1
        self._ids, self._embeddings = [], []
