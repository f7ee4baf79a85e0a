"""XLA flags the train command chooses, unless the environment's XLA_FLAGS already sets them.

XLA reads XLA_FLAGS once, when JAX starts its backend (the first `jax.devices()`, not the
import), so the train command sets these before that; code that imports jax_iclemb keeps its own.

`train.gpu_triton_gemm` (default False) is `--xla_gpu_enable_triton_gemm`: on a GPU, XLA's Triton
matmul emitter makes each step shape's program take ~3× longer to compile than cuBLAS calls do
(H200, the comparison work: 3.7-5.2 s against 10.8-14.8 s a shape). Whether Triton's steps are
faster once compiled was not settled there (85k against 104k real tokens/s, inside the spread of
repeated runs; docs/benchmarks.md, "On a GPU again"). A run of few steps, or of many shapes, is its
compiles; a long run can set it True. Other backends ignore the flag.

`train.cpu_devices` (default 2) is `--xla_force_host_platform_device_count`, at most one per usable
core: the CPU backend then has that many devices, and the default mesh splits each step's rows over
them. XLA's CPU runtime runs a device's ops one after another, and only the large ones (matmuls)
use both cores of a small host, so one device leaves a core idle through most of a step's
elementwise ops; two run theirs side by side. On a 2-core VM the comparison work's steps ran
8-11% more real tokens a second (docs/performance.md, "Two CPU devices"). GPU and TPU backends
ignore the flag (it sizes their process's CPU backend, which does not train).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping


def set_default(name: str, value: str, environ: MutableMapping[str, str] = os.environ) -> bool:
    """Append `--name=value` to `environ["XLA_FLAGS"]` unless it already sets `--name`; returns
    whether it did."""
    flags = environ.get("XLA_FLAGS", "").split()
    if any(flag.split("=", 1)[0] == f"--{name}" for flag in flags):
        return False
    environ["XLA_FLAGS"] = " ".join([*flags, f"--{name}={value}"])
    return True


def cpu_devices(configured: int) -> int:
    """`train.cpu_devices`, at most one per core this process may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(configured, cores))
