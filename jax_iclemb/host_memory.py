"""glibc's malloc told to keep what it frees, so that XLA's CPU buffers are reused, not refaulted.

XLA's CPU runtime mallocs each execution's buffers and frees them when it ends; a training step of
the comparison work of docs/benchmarks.md takes one 461 MiB block for its temporaries. glibc
serves a block that large with a fresh `mmap` and unmaps it on free, so every step faults all its
pages in again and the kernel zeroes each one: on the 2-core VM, 7.7 s of system time over 60
warm steps through the CLI, 1.7 s with this (docs/performance.md, "Host memory"). One arena, no
`mmap` and no trimming keep the freed block in the heap for the next step, and the heap stays at
its peak until the process ends. The cost: a step shape compiles
~40% slower (likely XLA's compiler threads contending for the one arena's lock). So it is an
option, `train.reuse_host_memory`, for long CPU runs (configs/icl_miniature.py sets it).

Only the train command applies it, before JAX starts its threads; code that imports jax_iclemb
keeps its own allocator. A glibc setting already chosen in the environment (`MALLOC_ARENA_MAX`,
`MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`, or `glibc.malloc.*` in `GLIBC_TUNABLES`) is left
alone; off glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import os

# mallopt(3) parameter numbers (malloc.h) and the values set, by the variable that would set each.
SETTINGS = {
    "MALLOC_ARENA_MAX": (-8, 1),  # M_ARENA_MAX: every thread allocates from the main heap
    "MALLOC_MMAP_MAX_": (-4, 0),  # M_MMAP_MAX: large blocks from the heap too, not mmap
    "MALLOC_TRIM_THRESHOLD_": (-1, 2**31 - 1),  # M_TRIM_THRESHOLD: keep up to 2 GiB free on top
}


def keep_freed_memory() -> list[str]:
    """Apply `SETTINGS` with mallopt; returns the names of those applied. Call it before JAX
    starts its threads: an arena limit does not move threads that already have their own."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl and macOS have no such symbol)
    except (AttributeError, OSError):
        return []
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return []
    applied = []
    for name, (param, value) in SETTINGS.items():
        if name not in os.environ and libc.mallopt(param, value) == 1:
            applied.append(name)
    return applied
