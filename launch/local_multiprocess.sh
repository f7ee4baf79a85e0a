#!/usr/bin/env bash
# Emulate a multi-host run on one machine: N processes over loopback, each with its own CPU devices.
#
#   launch/local_multiprocess.sh N_PROCS DEVICES_PER_PROC -- [python -m jax_iclemb.train args...]
#   e.g. launch/local_multiprocess.sh 2 2 -- --config configs/tiny.py --workdir runs/tiny-2proc
#
# Every process gets the variables jax_iclemb.distributed.initialize() reads
# (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) plus
# XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROC, so the job sees
# N_PROCS * DEVICES_PER_PROC devices, exactly as N hosts of DEVICES_PER_PROC accelerators would.
# With EMULATE=slurm they get what a one-node `srun --ntasks=N_PROCS` step sets instead
# (SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, SLURM_NODELIST and
# SLURM_STEP_NODELIST=localhost, SLURM_STEP_NUM_NODES=1), JAX_COORDINATOR_PORT and
# JAX_LOCAL_DEVICE_IDS=0,..,DEVICES_PER_PROC-1, and run launch/gpu_single_host.sh, the per-node
# body of launch/gpu_slurm.sbatch: the SLURM start-up path, on CPU.
#
# Variables:
#   PYTHON        interpreter that has jax_iclemb installed   (default: python)
#   LOG_DIR       where proc-<i>.log are written              (default: a new temporary folder)
#   PORT          coordinator port on 127.0.0.1               (default: a free port)
#   JAX_PLATFORMS platform the processes use                  (default: cpu)
#   EMULATE       explicit or slurm: the launcher emulated     (default: explicit)
#   KILL_AFTER    seconds the surviving processes get to exit after one fails, before SIGKILL
#                 (a process blocked in a collective never sees its SIGTERM handler)  (default: 30)
#
# Process 0's log is mirrored to stdout. SIGTERM/SIGINT are forwarded to every process as SIGTERM
# (the trainer saves a checkpoint and exits); a second signal kills them. The exit status is 0
# only if every process exited 0; otherwise the failing processes and their log tails are printed.
set -euo pipefail

usage() {
    echo "usage: $0 N_PROCS DEVICES_PER_PROC -- [python -m jax_iclemb.train args...]" >&2
    echo "error: $1" >&2
    exit 2
}

positive_int() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

[[ $# -ge 3 ]] || usage "expected N_PROCS, DEVICES_PER_PROC, '--' and the trainer's arguments"
positive_int "$1" || usage "N_PROCS must be a positive integer, got '$1'"
positive_int "$2" || usage "DEVICES_PER_PROC must be a positive integer, got '$2'"
[[ $3 == -- ]] || usage "the third argument must be '--', got '$3'"
n_procs=$1
devices=$2
shift 3

python=${PYTHON:-python}
kill_after=${KILL_AFTER:-30}
emulate=${EMULATE:-explicit}
case $emulate in
explicit) body=("$python" -m jax_iclemb.train) ;;
slurm) body=("$(dirname "${BASH_SOURCE[0]}")/gpu_single_host.sh") ;;
*) usage "EMULATE must be explicit or slurm, got '$emulate'" ;;
esac

log_dir=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/jax_iclemb_local.XXXXXX")}
mkdir -p "$log_dir"
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

# Our device count replaces any the caller set (the last of two copies would win silently).
xla_flags=$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")

pids=()
for ((i = 0; i < n_procs; i++)); do
    # Created here, not only by the child's redirection: the tail below must find process 0's log
    # even when it starts before that child has opened it (tail -f gives up on a missing file).
    : >"$log_dir/proc-$i.log"
    if [[ $emulate == slurm ]]; then
        identity=(SLURM_JOB_ID="$$" SLURM_NTASKS="$n_procs" SLURM_PROCID="$i" SLURM_LOCALID="$i"
            SLURM_NODELIST=localhost SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=1
            JAX_COORDINATOR_PORT="$port" JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((devices - 1)))")
    else
        identity=(JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$n_procs"
            JAX_PROCESS_ID="$i")
    fi
    # env execs the body: the pid is the process's own. The other launcher's variables go.
    env -u JAX_COORDINATOR_ADDRESS -u JAX_NUM_PROCESSES -u JAX_PROCESS_ID -u SLURM_JOB_ID \
        "${identity[@]}" \
        JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" \
        XLA_FLAGS="$xla_flags --xla_force_host_platform_device_count=$devices" \
        "${body[@]}" "$@" >"$log_dir/proc-$i.log" 2>&1 &
    pids+=("$!")
done
echo "started $n_procs processes x $devices devices ($emulate), coordinator port $port, logs in $log_dir" >&2
tail -n +1 -f --pid="${pids[0]}" "$log_dir/proc-0.log" &
tail_pid=$!

signals=0
# shellcheck disable=SC2329  # called by the trap below (shellcheck 0.11 misses it when a script ends in exit)
on_signal() {
    signals=$((signals + 1))
    local how=TERM
    if ((signals > 1)); then how=KILL; fi
    echo "forwarding SIG$how to all processes" >&2
    kill -s "$how" "${pids[@]}" 2>/dev/null || true
}
trap 'on_signal' TERM INT

# Poll rather than `wait -n`: bash may already have reaped a killed child, and a trapped signal
# should be handled at once. The first failure stops the others, which would otherwise wait for
# their lost peer in a collective until the coordination service times out.
status=()
deadline=""
stopping=""
while ((${#status[@]} < n_procs)); do
    running=()
    for ((i = 0; i < n_procs; i++)); do
        [[ -z ${status[i]+set} ]] || continue
        if kill -0 "${pids[i]}" 2>/dev/null; then
            running+=("${pids[i]}")
            continue
        fi
        rc=0
        wait "${pids[i]}" || rc=$?
        status[i]=$rc
        if ((rc != 0)) && [[ -z $deadline ]]; then
            echo "process $i exited with status $rc; stopping the others" >&2
            deadline=$((SECONDS + kill_after))
        fi
    done
    if [[ -n $deadline ]] && ((${#running[@]})); then
        if [[ -z $stopping ]]; then
            stopping=TERM
            kill -s TERM "${running[@]}" 2>/dev/null || true
        elif [[ $stopping == TERM ]] && ((SECONDS >= deadline)); then
            stopping=KILL
            kill -s KILL "${running[@]}" 2>/dev/null || true
        fi
    fi
    sleep 0.2
done
wait "$tail_pid" || true

failed=0
for ((i = 0; i < n_procs; i++)); do
    if ((status[i] != 0)); then
        failed=1
        echo "process $i failed with status ${status[i]}; last lines of $log_dir/proc-$i.log:" >&2
        tail -n 30 "$log_dir/proc-$i.log" | sed "s/^/  [proc-$i] /" >&2
    fi
done
exit "$failed"
