"""Files whose name only ever holds a whole file: written beside it, flushed, then renamed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(temp path)`, then flush to disk and rename. The temp is `.{name}.tmp` beside `path`,
    so that a reader can recognise what a killed writer left (embedding_store.TEMP)."""
    temp = path.with_name(f".{path.name}.tmp")
    write(temp)
    with open(temp, "rb+") as f:  # the data reaches the disk before the rename does
        os.fsync(f.fileno())
    os.replace(temp, path)
