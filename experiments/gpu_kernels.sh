#!/usr/bin/env bash
# The GPU check of the Pallas kernels in one go: gpu-marked tests (real kernels
# against the float32 reference), then experiments/bench_kernels.py. For a lent
# GPU machine that has jax, torch and triton but not lsm's test tools: put the
# wheels below in .whl/ on a machine with internet and carry it along, e.g.
#   pip download --no-deps -d .whl fla-core==0.6.0 pytest pluggy iniconfig \
#       packaging hypothesis sortedcontainers attrs pytest-timeout
# Usage (repo root): bash experiments/gpu_kernels.sh [OUT_DIR]
# At most 8 minutes: 180 s of tests, 270 s of benchmark (its warm-up calls
# compile and autotune before anything is timed).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/lsm-gpu}}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  pip install --quiet --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python -c 'import jax; print(jax.__version__, jax.devices())' | tee -a "$out/gpu.txt"
# -m gpu: only the device tests; -p no:cacheprovider: the tree may be read-only.
timeout 180 python -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
  tests/ops/test_gla_pallas.py tests/ops/test_delta_rule_pallas.py \
  tests/ops/test_gla_mosaic_gpu.py $(ls tests/ops/test_delta_rule_mosaic_gpu.py 2>/dev/null) \
  2>&1 | tee "$out/gpu_tests.txt"
timeout 270 python experiments/bench_kernels.py --markdown --repeats 20 \
  2>"$out/bench_progress.txt" | tee "$out/bench_kernels.md"
