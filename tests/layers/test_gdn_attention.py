"""The mmMamba-style Gated DeltaNet student against its equations (a token
loop), in parallel and decoding forms, on a grouped-query teacher layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers.gdn_attention import GDNAttention
from tests.layers.decoding import prefill_then_decode

D, H, HKV, K = 32, 4, 2, 8


def reference(layer, x):
  B, T, _ = x.shape
  rep = lambda a: jnp.repeat(a, H // HKV, axis=2)  # noqa: E731
  l2 = lambda a: a / jnp.sqrt(jnp.sum(a * a, -1, keepdims=True) + 1e-6)  # noqa: E731
  q = l2(layer.q_proj(x).reshape(B, T, H, K))
  k = l2(rep(layer.k_proj(x).reshape(B, T, HKV, K)))
  v = rep(layer.v_proj(x).reshape(B, T, HKV, K))
  beta = jax.nn.sigmoid(layer.b_proj(x))
  g = jnp.exp(-jnp.exp(layer.A_log[...]) * jax.nn.softplus(
      layer.a_proj(x) + layer.dt_bias[...]))
  S = jnp.zeros((B, H, K, K))
  outs = []
  for t in range(T):
    kt, vt, bt = k[:, t], v[:, t], beta[:, t, :, None, None]
    S = g[:, t, :, None, None] * (S - bt * kt[..., None] * jnp.einsum(
        "bhk,bhkv->bhv", kt, S)[:, :, None, :])
    S = S + bt * kt[..., None] * vt[:, :, None, :]
    outs.append(jnp.einsum("bhk,bhkv->bhv", q[:, t], S) / np.sqrt(K))
  return layer.o_proj(jnp.stack(outs, 1).reshape(B, T, H * K))


@pytest.mark.parametrize("T", [5, 19])
def test_parallel_and_decode_equal_the_equations(T):
  layer = GDNAttention(D, n_heads=H, n_kv_heads=HKV, head_dim=K, qkv_bias=True,
                       chunk_size=8, impl="chunked", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, T, D))
  want = reference(layer, x)
  np.testing.assert_allclose(layer(x)[0], want, rtol=0, atol=2e-5)
  decoded, _, _ = prefill_then_decode(layer, x, 3)
  np.testing.assert_allclose(decoded, want, rtol=0, atol=2e-5)
