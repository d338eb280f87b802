#!/usr/bin/env bash
# N lsm-train processes on this machine, joined by jax.distributed on localhost:
# a multi-host run in miniature, on CPU (each process gets its own forced CPU
# devices), for testing multi-process code paths without a cluster.
#
# Usage:
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS [lsm-train flags...]
# Example (2 processes x 4 CPU devices = one 8-device mesh):
#   launch/local_multiprocess.sh 2 4 --config=configs/gla.py:smoke=True \
#     --workdir=runs/mp --config.mesh.shape.data=4 --config.mesh.shape.seq=2
#
# Environment:
#   PYTHON    interpreter with lsm installed (default: .venv/bin/python if present,
#             else python3)
#   PORT      coordinator port (default: a free one)
#   LOG_DIR   if set, process i writes to LOG_DIR/process_i.log instead of the
#             terminal (process 0 still speaks for the run: the others only warn)
#
# If any process fails, the others are stopped and its exit status is returned.
# SIGTERM / SIGINT are passed on to every process (each saves a checkpoint at the
# step they agree on, then exits).
set -uo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ || ! "$2" =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,20p' "$0" >&2
  echo "error: expected NUM_PROCESSES and DEVICES_PER_PROCESS (positive ints), got: $*" >&2
  exit 2
fi
NPROC=$1
NDEV=$2
shift 2
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$NDEV"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

pids=()
stop_all() { for p in "${pids[@]}"; do kill -"$1" "$p" 2>/dev/null; done; }
trap 'stop_all TERM' TERM
trap 'stop_all INT' INT

for ((i = 0; i < NPROC; i++)); do
  cmd=("$PYTHON" -m lsm.train --coordinator_address="127.0.0.1:$PORT"
       --num_processes="$NPROC" --process_id="$i" "$@")
  if [[ -n "${LOG_DIR:-}" ]]; then
    mkdir -p "$LOG_DIR"
    "${cmd[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  else
    "${cmd[@]}" &
  fi
  pids+=($!)
done

# Wait for every process; the first failure stops the rest.
status=0
done_=()
while ((${#done_[@]} < NPROC)); do
  for i in "${!pids[@]}"; do
    [[ " ${done_[*]} " == *" $i "* ]] && continue
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      wait "${pids[$i]}"
      rc=$?
      done_+=("$i")
      if ((rc != 0 && status == 0)); then
        echo "local_multiprocess.sh: process $i exited with status $rc; stopping the others" >&2
        status=$rc
        stop_all TERM
      fi
    fi
  done
  sleep 0.5
done
exit $status
