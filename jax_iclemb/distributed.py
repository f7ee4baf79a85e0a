"""Start multi-process JAX from the environment; single-process runs need nothing.

- explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID
  (and optionally JAX_LOCAL_DEVICE_IDS, comma-separated) — what launch/local_multiprocess.sh sets;
- SLURM (srun with more than one task): JAX reads the SLURM variables itself;
- Cloud TPU pods (more than one worker): JAX finds its peers from the TPU metadata.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def _tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def _slurm_multi_task() -> bool:
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize() -> None:
    """Call once, before anything touches JAX devices."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None,
        )
    elif _slurm_multi_task() or _tpu_pod():
        jax.distributed.initialize()
    else:
        return
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
