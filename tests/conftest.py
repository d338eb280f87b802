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

