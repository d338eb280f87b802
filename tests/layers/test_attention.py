"""Attention: the parallel forward against a plain-jnp reference written from the
math, prefill + decoding against the parallel forward, window locality, sharding
metadata and argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers.attention import Attention
from lsm.parallel import axes
from tests import numerics

B, T, D = 2, 11, 32
RTOL = numerics.TOLERANCES[("invariant", "float32")]

# name -> constructor options; tiny and awkward on purpose.
CONFIGS = {
    "mha": dict(n_heads=4),
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "window": dict(n_heads=4, window=3),
    "mqa_window": dict(n_heads=4, n_kv_heads=1, window=4),
    "head_dim6": dict(n_heads=2, head_dim=6),  # H * K != D
}


# Jitted whole calls compile several times faster than eager op-by-op dispatch on
# CPU, which keeps this file inside its time budget.
@nnx.jit
def _jit_call(layer, x, cache=None):
  return layer(x, cache)


@nnx.jit
def _jit_step(layer, x_t, cache):
  return layer.step(x_t, cache)


def make_layer(seed=0, **kw):
  return Attention(D, rngs=nnx.Rngs(seed), **kw)


def make_x(seed, t=T, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (B, t, D), jnp.float32).astype(dtype)


def rope_reference(x, base):
  """RoPE as an explicit rotation matrix per position: channel pairs
  (i, i + K/2) are rotated by angle t * base^(-2i/K). x: [B, T, H, K]."""
  k_dim = x.shape[-1]
  half = k_dim // 2
  t = np.arange(x.shape[1], dtype=np.float64)[:, None]
  theta = t * base ** (-2.0 * np.arange(half) / k_dim)  # [T, K/2]
  rot = np.zeros((x.shape[1], k_dim, k_dim))  # [T, K_out, K_in]
  i = np.arange(half)
  rot[:, i, i] = np.cos(theta)
  rot[:, i, i + half] = -np.sin(theta)
  rot[:, i + half, i + half] = np.cos(theta)
  rot[:, i + half, i] = np.sin(theta)
  return jnp.einsum("toi,bthi->btho", jnp.asarray(rot, jnp.float32), x,
                    precision="highest")


@nnx.jit(static_argnames=("window", "rope_base"))
def attention_reference(layer, x, *, window=None, rope_base=10000.0):
  """softmax(Q K^T / sqrt(K) + causal/window mask) V with RoPE, plain jnp."""
  hp = "highest"
  n_h, n_kv, k_dim = layer.n_heads, layer.n_kv_heads, layer.head_dim
  b, t, _ = x.shape
  q = jnp.matmul(x, layer.q_proj.kernel[...], precision=hp).reshape(b, t, n_h, k_dim)
  k = jnp.matmul(x, layer.k_proj.kernel[...], precision=hp).reshape(b, t, n_kv, k_dim)
  v = jnp.matmul(x, layer.v_proj.kernel[...], precision=hp).reshape(b, t, n_kv, k_dim)
  q, k = rope_reference(q, rope_base), rope_reference(k, rope_base)
  # Query head n reads kv head n // (n_h / n_kv).
  k = jnp.repeat(k, n_h // n_kv, axis=2)
  v = jnp.repeat(v, n_h // n_kv, axis=2)
  logits = jnp.einsum("bthk,bshk->bhts", q, k, precision=hp) / np.sqrt(k_dim)
  ti, si = np.arange(t)[:, None], np.arange(t)[None, :]
  allowed = si <= ti
  if window is not None:
    allowed &= si > ti - window
  logits = jnp.where(allowed, logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("bhts,bshk->bthk", p, v, precision=hp).reshape(b, t, n_h * k_dim)
  return jnp.matmul(o, layer.o_proj.kernel[...], precision=hp)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parallel_matches_reference(name):
  kw = CONFIGS[name]
  layer = make_layer(1, **kw)
  x = make_x(2)
  y, cache = _jit_call(layer, x)
  assert cache is None
  assert y.shape == (B, T, D) and y.dtype == jnp.float32
  numerics.assert_close(y, attention_reference(layer, x, window=kw.get("window")),
                        rtol=RTOL, what=name)


def test_rope_base_is_used():
  layer = make_layer(1, n_heads=4, rope_base=100.0)
  x = make_x(3)
  numerics.assert_close(_jit_call(layer, x)[0],
                        attention_reference(layer, x, rope_base=100.0),
                        rtol=RTOL, what="rope_base=100")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_matches_parallel(name):
  """Parallel over [0, T) == prefill [0, 4) from the empty cache + prefill [4, 7)
  from the non-empty cache (the offset mask) + steps over [7, T)."""
  layer = make_layer(4, **CONFIGS[name])
  x = make_x(5)
  y_par, _ = _jit_call(layer, x)

  cache = layer.init_cache(B, max_len=T + 3)
  ys = []
  for lo, hi in [(0, 4), (4, 7)]:
    y, cache = _jit_call(layer, x[:, lo:hi], cache)
    ys.append(y)
  for t in range(7, T):
    y_t, cache = _jit_step(layer, x[:, t], cache)
    assert y_t.shape == (B, D)
    ys.append(y_t[:, None])
  assert int(cache["pos"]) == T
  numerics.assert_close(jnp.concatenate(ys, axis=1), y_par, rtol=RTOL, what=name)


def test_step_from_empty_cache_matches_parallel():
  layer = make_layer(6, n_heads=4, n_kv_heads=2, window=2)
  x = make_x(7)
  y_par, _ = _jit_call(layer, x)
  cache = layer.init_cache(B, max_len=T)  # exactly full at the end
  ys = []
  for t in range(T):
    y_t, cache = _jit_step(layer, x[:, t], cache)
    ys.append(y_t)
  numerics.assert_close(jnp.stack(ys, axis=1), y_par, rtol=RTOL, what="steps")


@pytest.mark.parametrize("window", [None, 3])
def test_window_locality_and_causality(window):
  """Changing token s changes exactly outputs s..s+W-1 (s.. with no window)."""
  layer = make_layer(8, n_heads=4, window=window)
  x = make_x(9)
  s = 2
  x2 = x.at[:, s].add(3.0)
  y1, y2 = np.asarray(_jit_call(layer, x)[0]), np.asarray(_jit_call(layer, x2)[0])
  last = T if window is None else s + window  # first unaffected position after s
  unaffected = [t for t in range(T) if t < s or t >= last]
  affected = [t for t in range(T) if s <= t < last]
  # Masked keys get probability exactly 0, so unaffected rows are bit-identical.
  np.testing.assert_array_equal(y1[:, unaffected], y2[:, unaffected])
  for t in affected:
    assert np.max(np.abs(y1[:, t] - y2[:, t])) > 1e-3, t
  # The cached path respects the window too.
  cache = layer.init_cache(B, T)
  yc1, yc2 = _jit_call(layer, x, cache)[0], _jit_call(layer, x2, cache)[0]
  np.testing.assert_array_equal(np.asarray(yc1)[:, unaffected],
                                np.asarray(yc2)[:, unaffected])


def test_dtype_contract():
  layer = make_layer(0, n_heads=4)
  x = make_x(1, dtype=jnp.bfloat16)
  y, _ = _jit_call(layer, x)
  assert y.dtype == jnp.bfloat16
  cache = layer.init_cache(B, T, dtype=jnp.bfloat16)
  y, cache = _jit_call(layer, x[:, :5], cache)
  y_t, cache = _jit_step(layer, x[:, 5], cache)
  assert y.dtype == y_t.dtype == cache["k"].dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(y_t, np.float32)))


def test_params_have_sharding_metadata():
  layer = make_layer(0, n_heads=4, n_kv_heads=2)
  known = {axes.BATCH, axes.SEQ, axes.HEADS, axes.EMBED, axes.MLP, axes.VOCAB,
           axes.STATE_K, axes.STATE_V, None}
  found = {}
  for path, p in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
    names = p.get_metadata().get("out_sharding")
    assert names is not None, path
    assert len(names) == p[...].ndim, (path, names, p[...].shape)
    assert set(names) <= known, (path, names)
    found[path[0]] = tuple(names)
  assert found == {"q_proj": (axes.EMBED, axes.HEADS),
                   "k_proj": (axes.EMBED, axes.HEADS),
                   "v_proj": (axes.EMBED, axes.HEADS),
                   "o_proj": (axes.HEADS, axes.EMBED)}


@pytest.mark.parametrize("kw, arg", [
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(n_heads=4, n_kv_heads=0), "n_kv_heads"),
    (dict(n_heads=0), "n_heads"),
    (dict(n_heads=5), "d_model"),  # 32 % 5 != 0
    (dict(n_heads=4, head_dim=5), "head_dim"),  # odd: RoPE needs pairs
    (dict(n_heads=4, window=0), "window"),
    (dict(n_heads=4, rope_base=0.0), "rope_base"),
])
def test_bad_args(kw, arg):
  with pytest.raises(ValueError, match=arg):
    make_layer(0, **kw)


def test_cache_overflow_raises():
  layer = make_layer(0, n_heads=4)
  x = make_x(0)
  with pytest.raises(ValueError, match="max_len"):
    layer(x, layer.init_cache(B, T - 1))  # T > max_len: static
  with pytest.raises(ValueError, match="max_len"):
    layer.init_cache(B, 0)
  # As if 8 positions had been written (checked before any compute, so the
  # contents don't matter): concrete pos 8 + 4 > 11.
  cache = dict(layer.init_cache(B, T), pos=jnp.asarray(8, jnp.int32))
  with pytest.raises(ValueError, match="pos=8"):
    layer(x[:, :4], cache)
  # Under jit pos is traced: no error, the caller's responsibility (documented).
  _jit_call(layer, x[:, :4], cache)
