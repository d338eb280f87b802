"""GLA, DeltaNet, Gated DeltaNet and the rest of the linear-attention family
(Lightning, RetNet, Based, Hedgehog, MoM): parallel == prefill + decoding,
chunked == reference, negative eigenvalues, sharding metadata, bad arguments.
Family-specific properties are in test_linear_attention_family.py."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lsm.layers.based import Based
from lsm.layers.delta_net import DeltaNet, GatedDeltaNet
from lsm.layers.gla import GLA
from lsm.layers.hedgehog import Hedgehog
from lsm.layers.lightning import Lightning
from lsm.layers.mamba2 import Mamba2
from lsm.layers.mom import MoM
from lsm.layers.retnet import RetNet
from tests import numerics

D, H, B, T, SPLIT = 32, 4, 2, 13, 6
LAYERS = {
    "gla": (GLA, {}),
    "delta_net": (DeltaNet, {}),
    "delta_net_signed": (DeltaNet, dict(beta_scale=2.0)),
    "delta_net_noconv": (DeltaNet, dict(conv_width=0, output_gate=False)),
    "gated_delta_net": (GatedDeltaNet, dict(beta_scale=2.0)),
    "lightning": (Lightning, dict(layer_index=1, n_layers=4)),
    "mamba2": (Mamba2, dict(state_size=8)),
    "mamba2_signed": (Mamba2, dict(state_size=8, eigenvalue_range="signed")),
    "retnet": (RetNet, {}),
    "based": (Based, {}),  # window 64 > T: the window branch is full attention
    "based_window4": (Based, dict(window=4)),  # the ring buffer wraps around
    "hedgehog": (Hedgehog, {}),
    "mom": (MoM, {}),
    "mom_gla": (MoM, dict(memory="gla", shared_memory=False, top_k=1)),
}
RTOL = numerics.TOLERANCES[("invariant", "float32")]


def build(name, impl="chunked", seed=0):
  cls, kwargs = LAYERS[name]
  return cls(D, n_heads=H, impl=impl, chunk_size=16, rngs=nnx.Rngs(seed), **kwargs)


def _x(seed=1, t=T):
  return jax.random.normal(jax.random.key(seed), (B, t, D))


@nnx.jit
def _parallel(layer, x):
  return layer(x)[0]


@nnx.jit
def _prefill(layer, x):
  return layer(x, layer.init_cache(x.shape[0]))


@nnx.jit
def _step(layer, x_t, cache):
  return layer.step(x_t, cache)


@pytest.mark.parametrize("name", list(LAYERS))
def test_prefill_then_decode_equals_parallel(name):
  layer = build(name)
  x = _x()
  y = _parallel(layer, x)
  y_pre, cache = _prefill(layer, x[:, :SPLIT])
  outs = [y_pre]
  for t in range(SPLIT, T):
    y_t, cache = _step(layer, x[:, t], cache)
    outs.append(y_t[:, None])
  numerics.assert_close(jnp.concatenate(outs, axis=1), y, rtol=RTOL, what=name)


@pytest.mark.parametrize("name", list(LAYERS))
def test_chunked_equals_reference(name):
  x = _x(2)
  y = _parallel(build(name, "chunked"), x)
  y_ref = _parallel(build(name, "reference"), x)
  numerics.assert_close(y, y_ref, rtol=numerics.tolerance("chunked", jnp.float32),
                        what=name)


@pytest.mark.parametrize("cls", [DeltaNet, GatedDeltaNet])
def test_signed_beta_reaches_negative_eigenvalues_with_finite_grads(cls):
  layer = cls(D, n_heads=H, beta_scale=2.0, impl="chunked", chunk_size=16,
              rngs=nnx.Rngs(0))
  x = 4.0 * _x(3)  # large inputs push sigmoid(x W_beta) towards 0 and 1
  beta, log_g = layer.decays(x)
  assert float(jnp.max(beta)) > 1.0, "beta never exceeds 1: no negative eigenvalue"
  assert float(jnp.max(beta)) <= 2.0 and float(jnp.min(beta)) >= 0.0
  if log_g is not None:
    assert float(jnp.max(log_g)) <= 0.0
  grads = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(layer)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert bool(jnp.all(jnp.isfinite(g))), f"non-finite gradient at {path}"
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", list(LAYERS))
def test_every_param_has_logical_axes(name):
  layer = build(name)
  params = nnx.state(layer, nnx.Param)
  leaves = jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert leaves
  for path, var in leaves:
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None, f"{name}: {path} has no logical axes"
    assert len(axes) == var[...].ndim, f"{name}: {path} axes {axes} vs {var[...].shape}"


@pytest.mark.parametrize("cls, kwargs, match", [
    (GLA, dict(n_heads=3), r"GLA: n_heads=3; expected a positive divisor"),
    (GLA, dict(n_heads=4, gate_rank=0), r"gate_rank=0"),
    (DeltaNet, dict(n_heads=4, beta_scale=3.0), r"beta_scale=3.0; expected a value in \(0, 2\]"),
    (DeltaNet, dict(n_heads=5), r"DeltaNet: n_heads=5"),
    (GatedDeltaNet, dict(n_heads=4, gated=False), r"gated=False"),
    (Lightning, dict(n_heads=5), r"Lightning: n_heads=5; expected a positive "
     r"divisor of d_model=32"),
    (Lightning, dict(n_heads=4, layer_index=3, n_layers=3),
     r"layer_index=3, n_layers=3; expected 0 <= layer_index < n_layers"),
    (Lightning, dict(n_heads=4, gate_act="relu"), r"gate_act='relu'"),
    (RetNet, dict(n_heads=32), r"RetNet: n_heads=32; .*even key head width"),
    (RetNet, dict(n_heads=4, rope_base=0.0), r"rope_base=0.0; expected > 0"),
    (Based, dict(n_heads=3), r"Based: n_heads=3"),
    (Based, dict(n_heads=4, feature_dim=0), r"feature_dim=0; expected a positive"),
    (Based, dict(n_heads=4, window=-1), r"window=-1; expected None, 0"),
    (Hedgehog, dict(n_heads=6), r"Hedgehog: n_heads=6"),
    (Hedgehog, dict(n_heads=4, feature_dim=0), r"feature_dim=0"),
    (MoM, dict(n_heads=4, top_k=5), r"top_k=5; expected 1 <= top_k <= "
     r"n_memories=4"),
    (MoM, dict(n_heads=4, memory="lstm"), r"memory='lstm'; expected one of"),
    (MoM, dict(n_heads=4, n_memories=0), r"n_memories=0; expected a positive"),
    (MoM, dict(n_heads=3), r"MoM: n_heads=3"),
])
def test_bad_arguments(cls, kwargs, match):
  with pytest.raises(ValueError, match=match):
    cls(D, rngs=nnx.Rngs(0), **kwargs)
