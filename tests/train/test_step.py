"""The train step: gradient accumulation equals the full batch, non-finite steps
are skipped and counted, bf16 compute keeps float32 masters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.models.lm import LMConfig
from lsm.parallel.mesh import MeshConfig, make_mesh
from lsm.train import optim
from lsm.train import state as state_lib
from lsm.train import step as step_lib
from tests.numerics import assert_close, assert_pytrees_close, tolerance

CFG = LMConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2,
               pattern=("delta_net", "attention"), chunk_size=16)


@functools.lru_cache(maxsize=None)
def _setup():
  # eps=1e-3: Adam's first step is g / (|g| + eps), which for the default eps
  # turns rounding differences in near-zero gradients into lr-sized parameter
  # differences. A larger eps keeps the comparison about the gradients.
  tx, schedule = optim.make_optimizer(
      optim.OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", eps=1e-3),
      100, state_lib.float32_mask(CFG))
  setup = state_lib.build(CFG, tx, make_mesh(MeshConfig(), jax.devices()[:1]),
                          None)
  return setup, schedule


@functools.lru_cache(maxsize=None)
def _step(grad_accum, dtype="float32"):
  setup, schedule = _setup()
  return jax.jit(step_lib.make_train_step(
      setup, schedule, grad_accum=grad_accum, compute_dtype=jnp.dtype(dtype)))


def _batch(seed, rows=4, length=20):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (rows, length + 1)).astype(np.int32)
  mask = rng.random((rows, length)) < 0.8   # uneven token counts per row
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


def test_grad_accumulation_equals_the_full_batch():
  setup, _ = _setup()
  batch = _batch(0)
  full, m_full = _step(1)(state_lib.create(setup, 0), batch)
  accum, m_acc = _step(2)(state_lib.create(setup, 0), batch)
  rtol = tolerance("train", jnp.float32)
  for key in ("loss", "accuracy", "grad_norm"):
    assert_close(m_acc[key], m_full[key], rtol=rtol, what=key)
  assert_pytrees_close(accum["params"], full["params"], rtol=rtol, what="params")
  # And the step did something.
  before = state_lib.create(setup, 0)["params"]
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       full["params"], before)
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_non_finite_step_is_skipped_and_counted():
  setup, _ = _setup()
  state = state_lib.create(setup, 0)
  state, _ = _step(1)(state, _batch(1))
  params = jax.tree.map(np.asarray, state["params"])
  poisoned = _batch(2)
  poisoned["mask"] = np.where(poisoned["mask"], np.nan, 0.0).astype(np.float32)
  state, m = _step(1)(state, poisoned)
  assert int(m["nonfinite"]) == 1 and int(state["bad_steps"]) == 1
  state, m = _step(1)(state, poisoned)
  assert int(state["bad_steps"]) == 2 and int(state["skipped"]) == 2
  assert int(state["step"]) == 3
  jax.tree.map(np.testing.assert_array_equal, state["params"], params)
  state, m = _step(1)(state, _batch(3))
  assert int(m["nonfinite"]) == 0 and int(state["bad_steps"]) == 0
  assert int(state["skipped"]) == 2
  assert np.isfinite(float(m["loss"]))


def test_bf16_compute_keeps_float32_masters_and_close_loss():
  setup, _ = _setup()
  batch = _batch(4)
  s32, m32 = _step(1)(state_lib.create(setup, 0), batch)
  s16, m16 = _step(1, "bfloat16")(state_lib.create(setup, 0), batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16["params"]))
  assert_close(m16["loss"], m32["loss"], rtol=tolerance("train", jnp.bfloat16),
               what="bf16 loss")
  # bf16 compute really ran: the loss differs from float32 in low bits.
  assert float(m16["loss"]) != float(m32["loss"])


def test_eval_step_matches_train_loss_before_update():
  setup, _ = _setup()
  state = state_lib.create(setup, 0)
  batch = _batch(5)
  out = jax.jit(step_lib.make_eval_step(setup))(state["params"], batch)
  _, m = _step(1)(state_lib.create(setup, 0), batch)
  np.testing.assert_allclose(out["loss_sum"] / out["count"], m["loss"], rtol=1e-6)
  assert int(out["count"]) == int(batch["mask"].sum())


@pytest.mark.parametrize("name, platform, resolved", [
    ("auto", "gpu", "bfloat16"), ("auto", "tpu", "bfloat16"),
    ("auto", "cpu", "float32"),
    ("float32", "gpu", "float32"), ("float32", "tpu", "float32"),
    ("bfloat16", "cpu", "bfloat16"), ("bfloat16", "gpu", "bfloat16"),
])
def test_compute_dtype_auto_is_bf16_on_accelerators(name, platform, resolved):
  assert step_lib.resolve_compute_dtype(name, platform) == resolved


def test_compute_dtype_auto_reads_this_process_platform():
  expected = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  assert step_lib.resolve_compute_dtype("auto") == expected


@pytest.mark.parametrize("name", ["float16", "bf16", "", "AUTO"])
def test_unknown_compute_dtype_is_named(name):
  with pytest.raises(ValueError, match=(
      rf"train.compute_dtype={name!r}; expected one of "
      r"\['auto', 'float32', 'bfloat16'\]")):
    step_lib.resolve_compute_dtype(name, "cpu")
