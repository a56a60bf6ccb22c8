#!/usr/bin/env bash
# Train or evaluate LSD on a Cloud TPU pod slice: one JAX process per TPU VM host ("worker"),
# every worker running the same command. JAX finds the other workers itself on a TPU pod
# (lsd_jax.main calls jax.distributed.initialize() with no arguments).
#
#   launch/tpu_pod.sh all              create the TPU VM, install, train
#   launch/tpu_pod.sh create | install | train | eval | delete
#   DRY_RUN=1 launch/tpu_pod.sh all    print the commands instead of running them
#
# Every setting below can be overridden from the environment, e.g.
#   PROJECT=my-project WORKDIR=gs://my-bucket/runs/gta launch/tpu_pod.sh train
# The datasets must already be prepared as TFDS datasets under $TFDS_DATA_DIR (see README.md).
set -euo pipefail

# ---- settings -------------------------------------------------------------------------------
PROJECT="${PROJECT:-my-gcp-project}"
ZONE="${ZONE:-us-central2-b}"
TPU_NAME="${TPU_NAME:-lsd-jax}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"        # v4-32 = 4 hosts x 4 chips
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
WORKDIR="${WORKDIR:-gs://my-bucket/lsd_jax/gta}"     # checkpoints and summaries; must be on GCS
CONFIG="${CONFIG:-configs/gta.py}"
TFDS_DATA_DIR="${TFDS_DATA_DIR:-gs://my-bucket/tensorflow_datasets}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"                       # e.g. "--config.data.batch_size=32"
REMOTE_DIR="${REMOTE_DIR:-lsd_jax}"                  # where the code goes on each worker, under ~
DETACH="${DETACH:-0}"        # 1: run the program under nohup, logging to ~/lsd_jax.log per worker
DRY_RUN="${DRY_RUN:-0}"
# ---------------------------------------------------------------------------------------------

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Print arguments as one shell-parsable line: plain words bare, the rest single-quoted.
quote() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$arg"); else out+=("${arg@Q}"); fi
  done
  echo "${out[*]}"
}

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "[dry-run] $(quote "$@")"
  else
    "$@"
  fi
}

tpu_vm() {  # gcloud compute tpus tpu-vm <verb> <args...> with project and zone
  local verb="$1"
  shift
  run gcloud compute tpus tpu-vm "$verb" "$@" --project="$PROJECT" --zone="$ZONE"
}

on_all_workers() {  # run one shell command line on every worker of the pod
  tpu_vm ssh "$TPU_NAME" --worker=all --command="$1"
}

create() {
  tpu_vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
}

install() {
  # Copy the package (not the local virtual environment or runs) to every worker (a relative
  # remote path is relative to the home directory), then install
  # JAX for TPUs and lsd_jax with its dependencies.
  on_all_workers "mkdir -p ~/$REMOTE_DIR"
  tpu_vm scp --recurse "$REPO_ROOT/setup.py" "$REPO_ROOT/lsd_jax" "$REPO_ROOT/configs" \
    "$TPU_NAME:$REMOTE_DIR/" --worker=all
  on_all_workers "cd ~/$REMOTE_DIR && pip install -U 'jax[tpu]' && pip install -e ."
}

main_command() {  # the program every worker runs; extra arguments are appended (e.g. --mode=eval)
  local environment program
  environment="TFDS_DATA_DIR=$(quote "$TFDS_DATA_DIR")"
  program="$(quote python3 -m lsd_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@")"
  program="$program${EXTRA_FLAGS:+ $EXTRA_FLAGS}"
  if [[ "$DETACH" == 1 ]]; then
    # Survives a dropped ssh connection; follow with: tail -f ~/lsd_jax.log (on worker 0).
    echo "cd ~/$REMOTE_DIR && $environment nohup $program > ~/lsd_jax.log 2>&1 &"
  else
    echo "cd ~/$REMOTE_DIR && $environment $program"
  fi
}

train() { on_all_workers "$(main_command)"; }
evaluate() { on_all_workers "$(main_command --mode=eval)"; }
delete() { tpu_vm delete "$TPU_NAME" --quiet; }

case "${1:-}" in
  create) create ;;
  install) install ;;
  train) train ;;
  eval) evaluate ;;
  delete) delete ;;
  all) create; install; train ;;
  *)
    echo "usage: $0 {all|create|install|train|eval|delete}  (got '${1:-}')" >&2
    exit 2
    ;;
esac
