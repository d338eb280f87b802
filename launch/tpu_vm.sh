#!/usr/bin/env bash
# lsm-train on every worker of a Cloud TPU VM slice (e.g. v5e-32: 8 workers x 4
# chips). The same command runs on all workers over `gcloud ... ssh
# --worker=all`; lsm-train is started with --distributed=on and JAX finds the
# slice's coordinator and worker ids through the TPU metadata server.
#
# Usage:
#   launch/tpu_vm.sh TPU_NAME ZONE [lsm-train flags...]
# Example:
#   launch/tpu_vm.sh my-v5e-32 us-west4-a --config=configs/gla.py:size=350m \
#     --workdir=/mnt/shared/runs/gla350m --config.mesh.shape.fsdp=-1
#
# Environment:
#   PROJECT   gcloud project (default: gcloud's configured one)
#   REPO      the lsm checkout on every worker (default: ~/lsm)
#   SETUP=1   first install lsm and jax[tpu] (at the pinned jax version) into
#             $REPO/.venv on every worker, then train
# --workdir must be a file system mounted at the same path on every worker
# (Filestore/NFS, or a gcsfuse mount of a bucket): all workers write checkpoints.
# Stopping: Ctrl-C here ends the ssh sessions; to stop a run cleanly, send
# SIGTERM on every worker (`pkill -TERM -f lsm.train`): it saves and exits.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,22p' "$0" >&2
  echo "error: expected TPU_NAME and ZONE, got: $*" >&2
  exit 2
fi
TPU=$1
ZONE=$2
shift 2
REPO=${REPO:-'~/lsm'}
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="$PROJECT"); fi

quoted=$(printf ' %q' "$@")
run="cd $REPO && "
if [[ "${SETUP:-0}" == 1 ]]; then
  run+="python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e . "
  run+="&& .venv/bin/pip install -q -c constraints.txt 'jax[tpu]' && "
fi
run+=".venv/bin/python -m lsm.train --distributed=on$quoted"

exec gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
  --worker=all --command="$run"
