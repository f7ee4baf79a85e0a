"""Step programs kept across runs as lowered StableHLO (`jax.export`), so that a repeated or resumed
run does not trace the model again for each step shape.

JAX's persistent compilation cache (compile_cache.py) keeps compiled executables, but its key is
the lowered program, so every run still traces and lowers the step once per shape: on the 2-core
VM 0.48-0.62 s of Python holding the GIL a shape at the comparison work, more than loading the
executable then takes (0.39-0.46 s); on a GPU the steps wait for it. This module keeps each shape's
program, serialized by `jax.export` (flatbuffers, no pickle), beside the compiled executables, and
a later run lowers a call of it (0.03-0.13 s) instead of tracing the model. Both runs compile that
same call, so the compilation cache serves it too.

A program is used only under the key it was made with: the package's source, the versions of the
libraries that trace it, JAX's tracing settings, the run config (but the loop's own keys) and the
model's description, the backend and devices, and the arguments' shapes, dtypes, shardings and
tree. Anything else misses and traces as before;
a file that does not load is traced again and replaced. Single-process runs only: several
processes trace the same global program, and agreeing on one file is not worth it for them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import ml_collections
from jax import export
from jax._src import config as jax_config  # JAX's own key for reusing a trace

from jax_iclemb.atomic import write_atomically
from jax_iclemb.data.batch import PackedBatch

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what a file holds changes meaning
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")

export.register_pytree_node_serialization(
    PackedBatch,
    serialized_name="jax_iclemb.PackedBatch",
    serialize_auxdata=lambda aux: json.dumps(aux).encode(),
    deserialize_auxdata=lambda data: tuple(json.loads(data)),
)


@functools.cache
def _source_digest() -> str:
    """Every module of the package: any change to the code that traces a step misses."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _versions() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in LIBRARIES]


def _tracing_settings() -> str:
    """JAX's settings that change a trace (matmul precision, x64, PRNG, ...); objects printed
    with their address (the empty axis environment outside shard_map) by their type."""
    return repr(
        tuple(type(v).__name__ if " at 0x" in repr(v) else v for v in jax_config.trace_context())
    )


# Config keys no traced step reads (the loop's schedule, logging, compiling): runs that differ
# only in these share their programs.
LOOP_ONLY = (
    "train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.compile_ahead", "train.compile_workers", "train.compilation_cache",
    "train.reuse_host_memory", "eval", "log",
)


def run_context(config: ml_collections.ConfigDict, graphdef: Any) -> str:
    """The run as the programs' key sees it: the config but `LOOP_ONLY`, and the model's
    description (its modules and settings, such as a pretrained folder's rope_theta, which the
    config names only by the folder)."""
    tree = config.to_dict()
    for key in LOOP_ONLY:
        *parents, last = key.split(".")
        node = functools.reduce(lambda d, k: d.get(k, {}), parents, tree)
        node.pop(last, None)
    return json.dumps([tree, repr(graphdef)], sort_keys=True, default=list)


def program_key(args: Any, context: str) -> str:
    """The key of the program traced at `args` (abstract arrays with shardings) under `context`
    (`run_context`)."""
    leaves, tree = jax.tree.flatten(args)
    arrays = [(tuple(x.shape), str(x.dtype), repr(getattr(x, "sharding", None))) for x in leaves]
    devices = [(d.platform, d.device_kind) for d in jax.devices()]
    parts = [FORMAT, _source_digest(), _versions(), _tracing_settings(), context, devices,
             str(tree), arrays]
    return hashlib.sha256(json.dumps(parts, default=repr).encode()).hexdigest()[:32]


def lower(jitted: Any, args: tuple, folder: Path | None, context: str) -> tuple[Any, bool]:
    """`jitted` lowered at `args` through the program kept in `folder` under this key (traced,
    exported and kept there when there is none); returns (lowered, whether it was kept).
    `folder` None, or several processes: `jitted.lower(*args)` itself."""
    if folder is None or jax.process_count() > 1:
        return jitted.lower(*args), False
    try:
        path = folder / f"{program_key(args, context)}.jaxexport"
    except AttributeError as error:  # a JAX whose private trace settings moved: trace each run
        log.info("step programs are not kept across runs: %s", error)
        return jitted.lower(*args), False
    if path.exists():
        try:
            exported = export.deserialize(bytearray(path.read_bytes()))
            return jax.jit(exported.call).lower(*args), True
        except Exception as error:  # a damaged or foreign file: trace again
            log.warning("traced the step again: %s did not load (%s)", path, error)
    try:
        exported = export.export(jitted)(*args)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda temp: temp.write_bytes(exported.serialize()))
    except Exception as error:  # e.g. kernels export refuses (cuDNN, Pallas): lower it as it is
        log.info("this step program is not kept across runs: %s", error)
        return jitted.lower(*args), False
    return jax.jit(exported.call).lower(*args), False
