"""Shared test setup."""

import jax
import pytest

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
