"""JAX's persistent compilation cache, on by default: a repeated or resumed run loads each compiled
step instead of compiling it again (seconds per shape on a CPU, minutes for a 7B on a GPU).

`train.compilation_cache`: "" (default) uses `$JAX_COMPILATION_CACHE_DIR` when set, else
`$XDG_CACHE_HOME/jax_iclemb/xla` (`~/.cache/jax_iclemb/xla`); "none" turns it off; anything else
is the folder. Entries are keyed by the program, the compile options and the jax/jaxlib versions,
so one folder serves every run and version. The trainer also keeps its traced step programs in a
subfolder (`programs_dir`, program_cache.py). The folder is trusted input (it holds executables
and programs): do not share it with users you do not trust.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

# Per thread: the trainer compiles on a background thread while the main thread runs steps.
_hits = threading.local()


def _count_hit(event: str, **_: object) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _hits.count = hits() + 1


jax.monitoring.register_event_listener(_count_hit)


def hits() -> int:
    """How many programs this thread has loaded from the persistent cache so far."""
    return getattr(_hits, "count", 0)


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jax_iclemb" / "xla"


def enable(setting: str) -> Path | None:
    """Point JAX's persistent cache at the folder `setting` names (see the module docstring);
    returns it, or None when the cache is off."""
    if setting == "none":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = Path(setting or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir())
    path.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != str(path):
        compilation_cache.reset_cache()  # an earlier run in this process may have used another
        jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_enable_compilation_cache", True)
    # A training step compiles for seconds; tiny helper programs are not worth a file.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def programs_dir() -> Path | None:
    """Where program_cache.py keeps traced step programs: beside the compiled ones, or None when
    the cache is off."""
    folder = jax.config.jax_compilation_cache_dir
    if not (jax.config.jax_enable_compilation_cache and folder):
        return None
    return Path(folder) / "jax_iclemb_programs"
