"""Start multi-process JAX from the environment; single-process runs need nothing.

One path for every launcher: `launch_arguments` reads which launcher started this process and
`initialize` makes the one call to `jax.distributed.initialize`, always with the local devices of
`JAX_LOCAL_DEVICE_IDS` (comma-separated ordinals; unset = JAX's default for that launcher).

- explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID — what
  launch/local_multiprocess.sh sets;
- SLURM (a job step of more than one task, i.e. under srun): JAX reads the SLURM variables.
  Without JAX_LOCAL_DEVICE_IDS, JAX gives each task the single GPU `SLURM_LOCALID` (one task per
  GPU); launch/gpu_single_host.sh sets it to all of the node's GPUs (one task per node);
- Cloud TPU pods (more than one worker): JAX finds its peers from the TPU metadata.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

from jax_iclemb.errors import BadValue

log = logging.getLogger(__name__)

LOCAL_DEVICES = "JAX_LOCAL_DEVICE_IDS"
# What jax._src.clusters.slurm_cluster needs to find the job step's peers (srun sets them).
SLURM_STEP = ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")


class LaunchError(BadValue):
    """The launcher's variables are missing or malformed."""


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise LaunchError(f"JAX_COORDINATOR_ADDRESS is set but {name} is not")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name} must be an integer, got {value!r}") from None


def local_device_ids(env: Mapping[str, str]) -> list[int] | None:
    """JAX_LOCAL_DEVICE_IDS as a list, or None when unset or empty."""
    value = env.get(LOCAL_DEVICES, "").strip()
    if not value:
        return None
    try:
        return [int(i) for i in value.split(",")]
    except ValueError:
        raise LaunchError(
            f"{LOCAL_DEVICES} must be comma-separated device ordinals, e.g. 0,1,2,3; got {value!r}"
        ) from None


def launcher(env: Mapping[str, str]) -> str | None:
    """Which launcher started this process: "explicit", "slurm", "tpu_pod", or None (a single
    process: nothing to start)."""
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        missing = [name for name in SLURM_STEP if name not in env]
        if missing:
            raise LaunchError(
                f"a SLURM job of {env['SLURM_NTASKS']} tasks, but {', '.join(missing)} unset: "
                "start the trainer with srun (launch/gpu_slurm.sbatch does)"
            )
        return "slurm"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu_pod"
    return None


def launch_arguments(env: Mapping[str, str]) -> tuple[str | None, dict[str, Any]]:
    """(launcher, keyword arguments of `jax.distributed.initialize`); the launcher is None for a
    single process. The local device ids are passed on every path."""
    kind = launcher(env)
    if kind is None:
        return None, {}
    kwargs: dict[str, Any] = {"local_device_ids": local_device_ids(env)}
    if kind == "explicit":
        kwargs.update(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=_int(env, "JAX_NUM_PROCESSES"),
            process_id=_int(env, "JAX_PROCESS_ID"),
        )
    return kind, kwargs


def initialize(env: Mapping[str, str] | None = None) -> None:
    """Call once, before anything touches JAX devices; logs processes × local devices. Raises
    LaunchError on malformed launcher variables."""
    kind, kwargs = launch_arguments(os.environ if env is None else env)
    if kind is not None:
        jax.distributed.initialize(**kwargs)
    ids = kwargs.get("local_device_ids")
    log.info(
        "%s: %d process%s x %d local devices (this is process %d; %d devices in all)%s",
        kind or "single process", jax.process_count(), "es" if jax.process_count() > 1 else "",
        jax.local_device_count(), jax.process_index(), jax.device_count(),
        f"; {LOCAL_DEVICES}={','.join(map(str, ids))}" if ids else "",
    )
