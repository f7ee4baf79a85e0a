"""XLA flags the train command chooses, unless the environment's XLA_FLAGS already sets them.

XLA reads XLA_FLAGS once, when JAX starts its backend (the first `jax.devices()`, not the
import), so the train command sets these before that; code that imports jax_iclemb keeps its own.

`train.gpu_triton_gemm` (default False) is `--xla_gpu_enable_triton_gemm`: on a GPU, XLA's Triton
matmul emitter makes each step shape's program take ~3× longer to compile than cuBLAS calls do
(H200, the comparison work: 3.7-5.2 s against 10.8-14.8 s a shape). Whether Triton's steps are
faster once compiled was not settled there (85k against 104k real tokens/s, inside the spread of
repeated runs; docs/benchmarks.md, "On a GPU again"). A run of few steps, or of many shapes, is its
compiles; a long run can set it True. Other backends ignore the flag.
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
