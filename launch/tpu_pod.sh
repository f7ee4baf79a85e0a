#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every worker VM runs one process that drives its local chips;
# jax_iclemb.distributed finds the peers from the TPU metadata.
#
#   launch/tpu_pod.sh setup   # once per TPU VM: repo + venv + jax[tpu] (+ gcsfuse) on every worker
#   launch/tpu_pod.sh train   # start training on every worker, detached; rerun to resume
#   launch/tpu_pod.sh logs    # follow worker 0's log
#   launch/tpu_pod.sh stop    # SIGTERM on every worker: save a checkpoint and exit
#
# e.g. TPU_NAME=icl-v5p-64 ZONE=us-east5-a PROJECT=my-proj REPO_URL=https://github.com/me/jax_iclemb \
#        WORKDIR=gs://my-bucket/runs/icl \
#        EXTRA_ARGS='--config.data.path=tfds:bge_icl --config.data.tfds_dir=/gcs/my-bucket/tfds' \
#        launch/tpu_pod.sh train
#
# Variables [defaults]:
#   TPU_NAME, ZONE, PROJECT  the TPU VM (required)
#   REPO_URL, BRANCH         repository cloned (or updated) on every worker (REPO_URL required for
#                            setup) [BRANCH=main]
#   CONFIG                   config file in the repository [configs/bge_en_icl_mistral7b.py]
#   WORKDIR                  run folder every worker sees (required for train). gs://BUCKET/PATH
#                            is mounted with gcsfuse at /gcs/BUCKET on every worker (the trainer
#                            writes through local paths); a shared filesystem path is used as is
#   EXTRA_ARGS               more trainer arguments, word-split, e.g. '--config.train.mesh=(1,-1,1)'
#   REMOTE_DIR               checkout on each worker [jax_iclemb, relative to the home directory]
#   JAX_SPEC                 pip requirement for JAX on TPU [jax[tpu]>=0.10.2,<0.11]
#   DRY_RUN                  1 = print the gcloud command, run nothing
set -euo pipefail

usage() {
    echo "usage: $0 setup|train|logs|stop (variables: see the top of this script)" >&2
    echo "error: $1" >&2
    exit 2
}

[[ $# -eq 1 ]] || usage "expected one action"
action=$1
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${PROJECT:?set PROJECT}"
branch=${BRANCH:-main}
config=${CONFIG:-configs/bge_en_icl_mistral7b.py}
dir=${REMOTE_DIR:-jax_iclemb}
jax_spec=${JAX_SPEC:-jax[tpu]>=0.10.2,<0.11}
log="\$HOME/$dir/train-\$(hostname).log" # expanded on each worker
pid_file="\$HOME/$dir/train.pid"

# gs://BUCKET/PATH -> the gcsfuse mount point and the path under it.
bucket=""
workdir=${WORKDIR:-}
if [[ $workdir == gs://* ]]; then
    rest=${workdir#gs://}
    bucket=${rest%%/*}
    workdir=/gcs/$rest
fi
mount_bucket=""
if [[ -n $bucket ]]; then
    mount_bucket="mountpoint -q /gcs/$bucket || { sudo mkdir -p /gcs/$bucket && \
sudo chown \$(id -u):\$(id -g) /gcs/$bucket && gcsfuse --implicit-dirs $bucket /gcs/$bucket; }"
fi

case $action in
setup)
    : "${REPO_URL:?set REPO_URL}"
    remote="set -euo pipefail; cd \$HOME
if [ -d $dir/.git ]; then git -C $dir fetch origin $branch && git -C $dir checkout -B $branch FETCH_HEAD
else git clone --branch $branch $(printf %q "$REPO_URL") $dir; fi
python3 -m venv $dir/.venv
$dir/.venv/bin/pip install -q --upgrade pip
$dir/.venv/bin/pip install -q -e $dir $(printf %q "$jax_spec")"
    if [[ -n $bucket ]]; then
        # Google's apt repository for gcsfuse (as in its installation guide).
        remote+="
if ! command -v gcsfuse >/dev/null; then
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi"
    fi
    ;;
train)
    [[ -n $workdir ]] || usage "set WORKDIR (gs://BUCKET/PATH or a shared filesystem path)"
    # EXTRA_ARGS is split into words here, then each word is quoted for the remote shell.
    read -ra extra <<<"${EXTRA_ARGS:-}"
    args=$(printf '%q ' --config "$config" --workdir "$workdir" "${extra[@]}")
    # setsid + nohup: training outlives this ssh session; the pid file is what `stop` signals.
    remote="set -euo pipefail; cd \$HOME/$dir
${mount_bucket:-true}
if [ -f $pid_file ] && kill -0 \$(cat $pid_file) 2>/dev/null; then echo 'already training'; exit 1; fi
nohup setsid .venv/bin/python -m jax_iclemb.train $args >>$log 2>&1 </dev/null &
echo \$! >$pid_file
echo \"\$(hostname): training, log in $log\""
    ;;
logs)
    remote="tail -n 100 -F $log"
    ;;
stop)
    remote="if [ -f $pid_file ]; then kill -TERM \$(cat $pid_file) || true; fi"
    ;;
*)
    usage "unknown action '$action'"
    ;;
esac

workers=all
if [[ $action == logs ]]; then workers=0; fi
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT"
    --worker="$workers" --command="$remote")
if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]:0:9}"
    printf -- '--command=<<EOF\n%s\nEOF\n' "$remote"
    exit 0
fi
exec "${cmd[@]}"
