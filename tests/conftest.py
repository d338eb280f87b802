"""Shared test setup."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
  """Compared paths contract in different orders; full float32 matmuls (no TF32
  or bf16 passes on GPU and TPU) keep them within tests/numerics.py. The op
  references set precision=HIGHEST themselves; this covers layers and helpers."""
  with jax.default_matmul_precision("highest"):
    yield


# Whole-program tests (subprocesses that compile for a minute or more) go first,
# so the two xdist workers end together instead of one finishing them alone.
_FIRST = ("tests/train/test_multiprocess.py", "tests/train/test_multidevice.py",
          "tests/parallel/test_sequence.py", "tests/test_notebooks.py",
          "tests/train/test_cli.py")


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: not item.nodeid.startswith(_FIRST))  # stable
