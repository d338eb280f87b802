#!/usr/bin/env bash
# One-call GPU acceptance run for a lent GPU machine (H100; jax, torch and triton
# preinstalled, no network): GPU and versions, the gpu-marked kernel tests, every
# preset op call that "auto" sends to a Pallas kernel on this GPU checked fwd+bwd
# against the float32 reference, one bf16 train step with impl="auto", and the
# kernels vs chunked at the design.md anchor shape. About 6.5 minutes; each step
# has its own time limit (experiments/gpu_acceptance.py, STEPS). Results (text and
# json) go to OUT_DIR; summary.json says how each step ended.
#
# Usage (repo root or anywhere):
#   bash experiments/gpu_acceptance.sh [OUT_DIR]            # on the GPU machine
#   bash experiments/gpu_acceptance.sh --dry-run [OUT_DIR]  # on CPU, first
# OUT_DIR defaults to $OUT, else /tmp/lsm-gpu-acceptance. After OUT_DIR, --steps info tests
# presets train bench picks steps. $PYTHON picks the interpreter (default python).
#
# The machine has jax, torch and triton but not lsm's test tools: put these wheels
# in .whl/ on a machine with internet and carry the folder along, e.g.
#   pip download --no-deps -d .whl fla-core==0.6.0 pytest pluggy iniconfig \
#       packaging hypothesis sortedcontainers attrs pytest-timeout \
#       flax optax orbax-checkpoint ml-collections
# (only those the GPU machine lacks are needed; the info step lists them).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  pip install --quiet --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}"
exec "${PYTHON:-python}" experiments/gpu_acceptance.py "$@"
