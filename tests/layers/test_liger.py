"""Liger attention against its equations (a token loop for the gated state, a
dense masked softmax for the window), in parallel and decoding forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers.liger import GATE_NORMALIZER, LigerAttention
from tests.layers.decoding import prefill_then_decode

D, H, HKV, K, W = 32, 4, 2, 8, 5


def _layer():
  layer = LigerAttention(D, n_heads=H, n_kv_heads=HKV, head_dim=K, qk_norm=True,
                         local_window=W, chunk_size=8, impl="chunked",
                         rngs=nnx.Rngs(0))
  layer.k_norm.scale[...] = 1.5 + jnp.arange(K) / K  # decays of several rates
  return layer


def reference(layer, x):
  B, T, _ = x.shape
  hi = jax.lax.Precision.HIGHEST
  q = layer.q_norm(layer.q_proj(x).reshape(B, T, H, K)).astype(jnp.float32)
  k = layer.k_norm(layer.k_proj(x).reshape(B, T, HKV, K)).astype(jnp.float32)
  v = layer.v_proj(x).reshape(B, T, HKV, K).astype(jnp.float32)
  rep = lambda a: jnp.repeat(a, H // HKV, axis=2)  # noqa: E731
  fq, fk = jax.nn.softmax(q, -1), rep(jax.nn.softmax(k, -1))
  g = rep(jnp.exp(jax.nn.log_sigmoid(k) / GATE_NORMALIZER))
  S = jnp.zeros((B, H, K, K))
  lin = []
  for t in range(T):
    S = g[:, t, :, :, None] * S + fk[:, t, :, :, None] * rep(v)[:, t, :, None, :]
    lin.append(jnp.einsum("bhk,bhkv->bhv", fq[:, t], S, precision=hi))
  lin = jnp.stack(lin, 1)
  rq, rk = layer._qk(x, jnp.arange(T))
  s = jnp.einsum("bthk,bshk->bhts", rq.astype(jnp.float32),
                 rep(rk).astype(jnp.float32), precision=hi) / np.sqrt(K)
  t = jnp.arange(T)
  window = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - W)
  a = jax.nn.softmax(jnp.where(window, s, -jnp.inf), -1)
  win = jnp.einsum("bhts,bshv->bthv", a, rep(v), precision=hi)
  return layer.o_proj((0.5 * lin + 0.5 * win).reshape(B, T, H * K))


@pytest.mark.parametrize("T", [3, 21])
def test_parallel_and_decode_equal_the_equations(T):
  layer = _layer()
  x = jax.random.normal(jax.random.key(1), (2, T, D))
  want = reference(layer, x)
  np.testing.assert_allclose(layer(x)[0], want, rtol=0, atol=2e-5)
  decoded, _, _ = prefill_then_decode(layer, x, 2)
  np.testing.assert_allclose(decoded, want, rtol=0, atol=2e-5)


def test_liger_adds_no_parameters_to_the_attention_it_replaces():
  from lsm.layers.attention import Attention
  opts = dict(n_heads=H, n_kv_heads=HKV, head_dim=K, qk_norm=True, rngs=nnx.Rngs(0))
  shapes = lambda m: jax.tree.map(jnp.shape, nnx.to_pure_dict(  # noqa: E731
      nnx.state(m, nnx.Param)))
  assert shapes(LigerAttention(D, **opts)) == shapes(Attention(D, **opts))
