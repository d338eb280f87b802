"""LoLCATs attention against its equations written out token by token (a
dense [T, T] reference), in the parallel, prefill + decode and packed forms,
with gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers.hedgehog import hedgehog_feature_map
from lsm.layers.lolcats import LolcatsAttention
from tests.layers.decoding import prefill_then_decode

D, H, HKV, K, W = 32, 4, 2, 8, 5


def _layer(feature_dim=None, seed=0):
  layer = LolcatsAttention(D, n_heads=H, n_kv_heads=HKV, head_dim=K,
                           qkv_bias=True, local_window=W, feature_dim=feature_dim,
                           chunk_size=8, impl="chunked", rngs=nnx.Rngs(seed))
  # Away from the initialisation, so every term matters.
  r = jax.random.split(jax.random.key(seed + 1), 5)
  layer.fq_w[...] = layer.fq_w[...] + 0.3 * jax.random.normal(r[0], layer.fq_w.shape)
  layer.fk_w[...] = layer.fk_w[...] + 0.3 * jax.random.normal(r[1], layer.fk_w.shape)
  layer.fq_b[...] = 0.3 * jax.random.normal(r[2], layer.fq_b.shape)
  layer.fk_b[...] = 0.3 * jax.random.normal(r[3], layer.fk_b.shape)
  layer.window_factor[...] = jax.random.normal(r[4], (H,))
  layer.q_proj.bias[...] = 0.1 * jnp.ones_like(layer.q_proj.bias[...])
  return layer


def reference(layer, x, segment_ids=None, positions=None):
  """The module docstring's equations with explicit [T, T] masks, float32."""
  B, T, _ = x.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  q, k, v = layer._qkv(x, positions)
  G = H // HKV
  k, v = (jnp.repeat(a.astype(jnp.float32), G, axis=2) for a in (k, v))
  q = q.astype(jnp.float32)
  phi_q = hedgehog_feature_map(q, layer.fq_w[...], layer.fq_b[...])
  phi_k = hedgehog_feature_map(k, layer.fk_w[...], layer.fk_b[...])
  t = jnp.arange(T)
  causal = t[None, :] <= t[:, None]
  same = jnp.ones((B, T, T), bool) if segment_ids is None else (
      segment_ids[:, :, None] == segment_ids[:, None, :])
  window = (causal & (t[None, :] > t[:, None] - W))[None] & same  # [B, T, S]
  linear = (t[None, :] <= t[:, None] - W)[None] & same
  hi = jax.lax.Precision.HIGHEST
  s = jnp.einsum("bthk,bshk->bhts", q, k, precision=hi) / np.sqrt(K)
  s = jnp.where(window[:, None], s, -jnp.inf)
  m = jnp.max(s, -1, keepdims=True)
  gamma = jax.nn.sigmoid(layer.window_factor[...])[None, :, None, None]
  a = gamma * jnp.where(window[:, None], jnp.exp(s - m), 0.0)
  lin = jnp.einsum("bthf,bshf->bhts", phi_q, phi_k, precision=hi)
  a = a + (1 - gamma) * jnp.where(linear[:, None], lin, 0.0)
  o = jnp.einsum("bhts,bshv->bthv", a, v, precision=hi)
  o = o / (jnp.sum(a, -1).transpose(0, 2, 1)[..., None] + layer.eps)
  return layer._out(o, x)


def _x(T, seed=0, B=2, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (B, T, D)).astype(dtype)


@pytest.mark.parametrize("T,feature_dim", [(23, None), (3, 6), (10, None)])
def test_parallel_equals_reference(T, feature_dim):
  """T not a multiple of W, shorter than W, a multiple; F = K and F != K."""
  layer = _layer(feature_dim)
  x = _x(T)
  np.testing.assert_allclose(layer(x)[0], reference(layer, x), rtol=0, atol=2e-5)


def test_gradients_equal_the_reference():
  layer = _layer()
  x = _x(17)
  w = jax.random.normal(jax.random.key(9), (2, 17, D))

  def loss(fn):
    def f(m, x):
      return jnp.sum(fn(m, x) * w)
    return nnx.grad(f, argnums=(0, 1))(layer, x)

  (gm, gx), (rm, rx) = loss(lambda m, x: m(x)[0]), loss(reference)
  np.testing.assert_allclose(gx, rx, rtol=0, atol=5e-5)
  for name in ("fq_w", "fk_b", "window_factor"):
    a, b = getattr(gm, name)[...], getattr(rm, name)[...]
    np.testing.assert_allclose(a, b, rtol=0, atol=5e-5 * max(1, float(jnp.abs(b).max())))
  np.testing.assert_allclose(gm.k_proj.kernel[...], rm.k_proj.kernel[...],
                             rtol=0, atol=5e-5)


def test_prefill_and_decode_equal_the_parallel_form():
  layer = _layer()
  x = _x(19)
  want = layer(x)[0]
  decoded, cache, _ = prefill_then_decode(layer, x, 7)
  np.testing.assert_allclose(decoded, want, rtol=0, atol=2e-5)
  assert cache["k"].shape == (2, W, HKV, K)  # O(W), whatever the length


def test_packed_documents_equal_the_reference_with_document_masks():
  """(Packed rows against each document alone, with gradients:
  tests/layers/test_documents.py.)"""
  layer = _layer()
  x = _x(20, B=1)
  seg = jnp.array([[1] * 8 + [2] * 3 + [3] * 9])
  pos = jnp.array([list(range(8)) + list(range(3)) + list(range(9))])
  packed = layer(x, segment_ids=seg, positions=pos)[0]
  np.testing.assert_allclose(packed, reference(layer, x, seg, pos), rtol=0, atol=2e-5)


def test_bf16_in_bf16_out_near_float32():
  layer = _layer()
  x = _x(12)
  y = layer(x.astype(jnp.bfloat16))[0]
  assert y.dtype == jnp.bfloat16
  ref = reference(layer, x)
  err = float(jnp.sqrt(jnp.mean((y.astype(jnp.float32) - ref) ** 2))
              / jnp.sqrt(jnp.mean(ref ** 2)))
  assert err < 2e-2, err


def test_teacher_is_the_softmax_attention_of_the_same_weights():
  """At gamma = 1 and a window covering the sequence, the student is the
  teacher exactly; the teacher path ignores the student's parameters."""
  layer = _layer()
  x = _x(6)
  layer.window_factor[...] = jnp.full((H,), 30.0)  # gamma = 1 - 1e-13
  layer.local_window = 6
  np.testing.assert_allclose(layer(x)[0], layer.teacher(x), rtol=0, atol=2e-5)
