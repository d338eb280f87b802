"""Shared test setup."""

import os

# The suite is dominated by XLA compiling many small programs on 2 cores;
# without LLVM's optimisation passes it runs in about half the time (measured
# on tests/ops/test_gla.py + test_dplr.py: 179 s -> 92 s, 2 workers). Results
# change only in summation order, which every comparison's tolerance row covers
# (tests/numerics.py); exactness tests compare runs under the same flags.
# Subprocesses the tests start inherit them. Flags the caller set come after
# these, so they win.
os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true "
                           + os.environ.get("XLA_FLAGS", "")).strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

# A test whose xdist worker dies under it runs once more (tests/crash_retry.py).
pytest_plugins = ["tests.crash_retry"]


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
  """Compared paths contract in different orders; full float32 matmuls (no TF32
  or bf16 passes on GPU and TPU) keep them within tests/numerics.py. The op
  references set precision=HIGHEST themselves; this covers layers and helpers."""
  with jax.default_matmul_precision("highest"):
    yield



def pytest_collection_modifyitems(config, items):
  """Tests marked gpu and/or tpu need one of those platforms; elsewhere they are
  reported as skipped (never as passed)."""
  del config
  backend = jax.default_backend()
  for item in items:
    wanted = [m for m in ("gpu", "tpu") if item.get_closest_marker(m)]
    if wanted and backend not in wanted:
      item.add_marker(pytest.mark.skip(
          reason=f"needs a {' or '.join(w.upper() for w in wanted)}; "
                 f"this run's backend is {backend}"))
