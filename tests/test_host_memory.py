"""host_memory.keep_freed_memory, observed through glibc's own accounting (mallinfo2) in fresh
interpreters: a large block comes from the heap instead of mmap, and stays there once freed."""

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jax_iclemb import train
from jax_iclemb.errors import ReportedError

try:
    ctypes.CDLL(None).mallinfo2  # noqa: B018 (glibc >= 2.33)
    GLIBC = True
except AttributeError:
    GLIBC = False

pytestmark = pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")

BLOCK = 64 << 20
TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")

# Allocates and frees a 64 MiB block with libc's malloc; prints what was applied and mallinfo2's
# bytes mmapped for the block, and the heap's free bytes after it is freed.
PROBE = f"""
import ctypes, json, sys
from jax_iclemb import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks "
                                                "fsmblks uordblks fordblks keepcost").split()]
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.mallinfo2.restype = ctypes.c_void_p, Info
before = libc.mallinfo2()
block = libc.malloc({BLOCK})
ctypes.memset(block, 1, {BLOCK})
held = libc.mallinfo2()
libc.free(ctypes.c_void_p(block))
freed = libc.mallinfo2()
mmapped = held.hblkhd - before.hblkhd
print(json.dumps({{"applied": applied, "mmapped": mmapped, "heap_free": freed.fordblks}}))
"""


def probe(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**environ, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_a_freed_block_stays_in_the_heap():
    default = probe("default")
    assert default["mmapped"] >= BLOCK  # glibc's default: its own mmap, unmapped when freed
    assert default["heap_free"] < BLOCK
    kept = probe("keep")
    assert kept["applied"] == ["MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"]
    assert kept["mmapped"] == 0
    assert kept["heap_free"] >= BLOCK  # free for the next step's buffers, pages already mapped


def test_settings_chosen_in_the_environment_are_left_alone():
    by_variable = probe("keep", MALLOC_MMAP_MAX_="65536")
    assert by_variable["applied"] == ["MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_"]
    assert by_variable["mmapped"] >= BLOCK
    by_tunable = probe("keep", GLIBC_TUNABLES="glibc.malloc.mmap_max=65536")
    assert by_tunable["applied"] == []
    assert by_tunable["mmapped"] >= BLOCK


@pytest.mark.parametrize("reuse", [True, False])
def test_the_train_command_applies_them_when_the_config_asks(monkeypatch, reuse):
    calls = []
    keep = lambda: calls.append("malloc") or []  # returns a list, as the real one does
    monkeypatch.setattr(train.host_memory, "keep_freed_memory", keep)

    def stop(*_):  # the job would start here; the settings must come before it (and JAX's threads)
        calls.append("run")
        raise ReportedError("stopped")

    monkeypatch.setattr(train.distributed, "initialize", stop)
    argv = ["--config", TINY, f"--config.train.reuse_host_memory={reuse}"]
    monkeypatch.setattr(sys, "argv", ["jax_iclemb.train", *argv])
    assert train.script() == 1
    assert calls == (["malloc", "run"] if reuse else ["run"])
    calls.clear()
    assert train.main(argv) == 1  # in-process: the caller's allocator stays as it is
    assert calls == ["run"]
