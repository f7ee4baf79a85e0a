#!/usr/bin/env bash
# Train on one GPU host with all its GPUs: a single process drives every local GPU.
# It is also the per-node body of launch/gpu_slurm.sbatch (srun runs it once on every node).
#
#   launch/gpu_single_host.sh --config configs/bge_en_icl_mistral7b.py --workdir runs/bge-en-icl \
#       [--config.KEY=VALUE ...]
#
# All arguments go to `python -m jax_iclemb.train`. Run it from the repository root. SIGTERM
# reaches the trainer directly (the script execs it): it saves a checkpoint and exits, and the
# same command resumes.
#
# Variables [defaults]:
#   PYTHON                          interpreter with jax_iclemb and jax[cuda12] installed [python]
#   CUDA_VISIBLE_DEVICES            the GPUs to use [all]
#   JAX_LOCAL_DEVICE_IDS            GPUs this process drives, comma-separated [all visible ones].
#                                   Needed in multi-node runs: under SLURM, JAX otherwise gives each
#                                   process only GPU $SLURM_LOCALID (one process per GPU).
#   XLA_PYTHON_CLIENT_MEM_FRACTION  share of each GPU's memory JAX reserves at start [0.90; JAX's
#                                   own default is 0.75, which wastes a quarter of an 80 GB card]
#   XLA_PYTHON_CLIENT_PREALLOCATE   false = allocate on demand (slower; only to debug OOMs) [true]
#   COMBINE_THRESHOLD_BYTES         XLA fuses all-gathers / reduce-scatters / all-reduces up to this
#                                   size into one collective: fewer, larger NCCL calls [134217728]
#   XLA_FLAGS                       more XLA flags; they come after ours, so they override ours
#   NCCL_DEBUG, NCCL_SOCKET_IFNAME, NCCL_IB_HCA
#                                   NCCL knobs, passed through untouched: set INFO to debug a hang,
#                                   and the network interfaces if NCCL picks the wrong one
#   DRY_RUN                         1 = print the environment and the command, run nothing
set -euo pipefail

python=${PYTHON:-python}
combine=${COMBINE_THRESHOLD_BYTES:-134217728}

# The latency-hiding scheduler overlaps the FSDP all-gathers and reduce-scatters with compute.
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_all_gather_combine_threshold_bytes=$combine \
--xla_gpu_reduce_scatter_combine_threshold_bytes=$combine \
--xla_gpu_all_reduce_combine_threshold_bytes=$combine ${XLA_FLAGS:-}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}

if [[ -z ${JAX_LOCAL_DEVICE_IDS:-} ]]; then
    # Ordinals as JAX sees them: 0..n-1 over the GPUs CUDA_VISIBLE_DEVICES leaves visible.
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
        gpus=${#visible[@]}
    elif command -v nvidia-smi >/dev/null; then
        gpus=$(nvidia-smi --list-gpus | wc -l)
    else
        gpus=0
    fi
    if ((gpus > 0)); then
        JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
        export JAX_LOCAL_DEVICE_IDS
    fi
fi

cmd=("$python" -m jax_iclemb.train "$@")
if [[ -n ${DRY_RUN:-} ]]; then
    printf '%s=%q\n' XLA_FLAGS "$XLA_FLAGS" \
        XLA_PYTHON_CLIENT_MEM_FRACTION "$XLA_PYTHON_CLIENT_MEM_FRACTION" \
        JAX_LOCAL_DEVICE_IDS "${JAX_LOCAL_DEVICE_IDS:-}"
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
