"""RWKV-7 (lsm.layers.rwkv7 time mixing on the dplr op; RWKV7ChannelMix, the
``mlp="rwkv7"`` block MLP): the layer against a token loop written from the
paper's equations in RWKV's own orientation (state [V, K]; it never calls
lsm.ops), decoding, packed documents, dtypes, logical axes and argument checks.
The layer-level packed-documents check with gradients is
tests/layers/test_documents.py's (-m slow), smoke training
tests/configs/test_configs.py's (-m slow)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers.mlp import RWKV7ChannelMix
from lsm.layers.rwkv7 import RWKV7
from lsm.models.lm import LanguageModel, LMConfig
from lsm.ops.dplr import dplr
from tests import numerics

D, H, B, T = 16, 2, 2, 11
INVARIANT = numerics.TOLERANCES[("invariant", "float32")]


def _random(build, seed):
  """The module ``build()`` makes, built abstractly (no init to run) with every
  parameter drawn at random by numpy (nothing to compile): interpolations mu
  in [0, 1], the rest N(0, 0.5^2). RWKV-7's init zeroes the LoRA down
  projections, which would hide the data-dependent decay, rate and gate."""
  module = nnx.eval_shape(build)
  rng = np.random.default_rng(seed)
  state = nnx.state(module, nnx.Param)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(
          rng.uniform(size=x.shape) if "mu" in jax.tree_util.keystr(path)
          else 0.5 * rng.standard_normal(x.shape), x.dtype),
      nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, params)
  nnx.update(module, state)
  return module


def _layer(impl="chunked", seed=5):
  return _random(lambda: RWKV7(D, n_heads=H, decay_rank=4, a_rank=4,
                               gate_rank=6, layer_index=1, n_layers=3,
                               chunk_size=8, impl=impl, rngs=nnx.Rngs(0)), seed)


def _jit_with(module, fn):
  graphdef, state = nnx.split(module)
  run = jax.jit(lambda s, *args: fn(nnx.merge(graphdef, s), *args))
  return lambda *args: run(state, *args)


# -- the paper's equations, token by token (numpy float64, RWKV's [V, K]) -----


def _np(x):
  return np.asarray(x, np.float64)


def _paper_loop(layer, x, s0, x_prev0, ids):
  """RWKV-7 time mixing as the paper writes it, per row b and head h:

    x_c = x + (x' - x) mu_c;  r, k, v = x_r W_r, x_k W_k, x_v W_v
    w = exp(-e^-0.5 sigmoid(w0 + tanh(x_w A_w) B_w)); alpha = sigmoid(a0 + x_a A_a B_a)
    kk = normalise(k o k_k) per head;  k~ = k o (1 + (alpha - 1) o k_a)
    S <- S diag(w) + (S (-kk)) (kk o alpha)^T + v k~^T   (S: [V, K])
    o = S r;  y = ((GroupNorm(o) + (r . (k~ o r_k)) v) o sigmoid(x_g G1) G2) W_o

  x' and S restart at zero where ``ids`` changes (a packed document start).
  """
  p = lambda m: _np(m[...])  # noqa: E731
  mu = p(layer.mu)
  W = {n: p(getattr(layer, f"{n}_proj").kernel) for n in "rkvo"}
  Aw, Bw, Aa, Ba = (p(getattr(layer, n).kernel)
                    for n in ("w_down", "w_up", "a_down", "a_up"))
  G1, G2 = p(layer.g_down.kernel), p(layer.g_up.kernel)
  w0, a0, k_k, k_a, r_k = (p(getattr(layer, n))
                           for n in ("w0", "a0", "k_k", "k_a", "r_k"))
  gn_w, gn_b = p(layer.gn_scale), p(layer.gn_bias)
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
  x, N = _np(x), D // H
  y = np.zeros_like(x)
  S = _np(s0).copy()  # [B, H, V, K]
  for b in range(x.shape[0]):
    prev = _np(x_prev0[b])
    for t in range(x.shape[1]):
      if t > 0 and ids[b, t] != ids[b, t - 1]:
        prev = np.zeros(D)
        S[b] = 0.0
      xt = x[b, t]
      xr, xw, xk, xv, xa, xg = (xt + (prev - xt) * mu[i] for i in range(6))
      prev = xt
      r, k, v = xr @ W["r"], xk @ W["k"], xv @ W["v"]
      w = np.exp(-math.exp(-0.5) * sig(w0 + np.tanh(xw @ Aw) @ Bw))
      alpha = sig(a0 + (xa @ Aa) @ Ba)
      g = sig(xg @ G1) @ G2
      kt = k * (1.0 + (alpha - 1.0) * k_a)
      out = np.zeros(D)
      for h in range(H):
        c = slice(h * N, (h + 1) * N)
        kk = k[c] * k_k[c]
        kk = kk / np.linalg.norm(kk)
        s = S[b, h]
        s = s * w[c][None, :] + np.outer(s @ -kk, kk * alpha[c]) + np.outer(v[c], kt[c])
        S[b, h] = s
        o = s @ r[c]
        o = (o - o.mean()) / np.sqrt(o.var() + 1e-5 * N) * gn_w[c] + gn_b[c]
        out[c] = o + np.sum(r[c] * kt[c] * r_k[c]) * v[c]
      y[b, t] = (out * g) @ W["o"]
  return y, S


@functools.cache
def _layer_runs():
  """The chunked layer from a random cache (state and shift) over packed rows
  (row 0: three documents, the first continuing the cache; row 1: one), and
  the layer's readout with dplr's read and write vectors swapped; one
  compile."""
  layer = _layer()
  ks = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(ks[0], (B, T, D))
  cache = {"h": jax.random.normal(ks[1], (B, H, D // H, D // H)),
           "shift": jax.random.normal(ks[2], (B, D))}
  ids = jnp.asarray([[1, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3], [4] * T])

  def run(m, x, cache, ids):
    args, extras = m._inputs(x, jnp.zeros_like(x))  # noqa: SLF001
    q, a, b, u, v, log_g = args
    # a = alpha o kk reads, b = -kk writes: the rank-one term transposed.
    o, _ = dplr(q, -b, -a, u, v, log_g, scale=1.0, impl="reference")
    return m(x, cache, segment_ids=ids), m._output(o, v, extras, x)  # noqa: SLF001

  return layer, (x, cache, ids), _jit_with(layer, run)(x, cache, ids)


def test_layer_is_the_papers_recurrence():
  """The layer (chunked dplr with a = kk, b = -(alpha o kk), u = k~, scale 1)
  against the paper's loop: outputs within 1e-5 and the final state (lsm's
  [K, V] is RWKV's S^T), from a cache (state and token shift) that enters
  each row's first document, with the token shift and the state restarting
  at every later document start."""
  layer, (x, cache, ids), ((y, new_cache), _) = _layer_runs()
  s0 = np.swapaxes(_np(cache["h"]), -1, -2)  # lsm [K, V] -> RWKV [V, K]
  want, s_t = _paper_loop(layer, x, s0, cache["shift"], np.asarray(ids))
  scale = max(1.0, float(np.max(np.abs(want))))
  assert float(np.max(np.abs(_np(y) - want))) <= 1e-5 * scale
  numerics.assert_close(np.swapaxes(_np(new_cache["h"]), -1, -2), s_t,
                        rtol=INVARIANT, what="final state")
  np.testing.assert_array_equal(new_cache["shift"], x[:, -1])


def test_swapped_read_and_write_vectors_are_caught():
  """The check above tells a from b: with the read and write vectors swapped
  (a = alpha o kk, b = -kk) the output misses the paper's loop by far more
  than its tolerance."""
  layer, (x, _, _), (_, y_swapped) = _layer_runs()
  want, _ = _paper_loop(layer, x, np.zeros((B, H, D // H, D // H)),
                        np.zeros((B, D)), np.ones((B, T)))
  assert float(np.max(np.abs(_np(y_swapped) - want))) > 1e-2


# -- the language model: rwkv7 mixer + rwkv7 channel mixing --------------------


def _lm():
  """One rwkv7 block with RWKV-7's channel mixing. The reference op (a scan)
  compiles in half the time of the chunked one; the chunked layer is held to
  the paper's loop from a cache and on packed rows above, so this checks the
  model's plumbing: both token shifts, the block caches, documents."""
  cfg = LMConfig(vocab_size=37, d_model=D, n_layers=1, n_heads=H, mixer="rwkv7",
                 mlp="rwkv7", chunk_size=8, impl="reference",
                 mixer_kwargs={"rwkv7": dict(decay_rank=4, a_rank=4, gate_rank=6)})
  return _random(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)), 3)


LENGTHS = ((3, 1, 7), (6, 5))  # per row, T = 11: a 1-token document


@functools.cache
def _lm_runs():
  """One compile: a prefill of 4 tokens then ``step`` (logits and cache), and
  one parallel call with a cache over a batch of the plain rows, the packed
  rows (``segment_ids``) and each document alone at the start of a row of
  its own (the tokens after it cannot reach it: causal)."""
  tok = jax.random.randint(jax.random.key(4), (B, T), 0, 37)
  ids = np.stack([np.repeat(np.arange(len(n)), n) for n in LENGTHS])
  docs = [(row, s, n) for row, lengths in enumerate(LENGTHS)
          for s, n in zip(np.cumsum((0,) + lengths[:-1]), lengths)]
  rows = jnp.concatenate([tok, tok, jnp.stack(
      [jnp.roll(tok[row], -s) for row, s, _ in docs])])
  row_ids = np.concatenate([np.zeros((B, T), int), ids,
                            np.zeros((len(docs), T), int)])

  def run(m, tok, rows, row_ids):
    pre, cache = m(tok[:, :4], m.init_cache(B, T))

    def body(cache, t):
      logits_t, cache = m.step(t, cache)
      return cache, logits_t

    cache, dec = jax.lax.scan(body, cache, tok[:, 4:].T)
    dec = jnp.concatenate([pre, jnp.moveaxis(dec, 0, 1)], axis=1)
    out, cache_all = m(rows, m.init_cache(len(rows), T), segment_ids=row_ids)
    return out, dec, cache, cache_all

  out, dec, cache, cache_all = _jit_with(_lm(), run)(tok, rows, jnp.asarray(row_ids))
  logits, packed = out[:B], out[B:2 * B]
  alone = [jnp.concatenate([out[2 * B + i, :n] for i, (r, _, n) in enumerate(docs)
                            if r == row]) for row in range(B)]
  cache_all = jax.tree.map(lambda c: c[:B], cache_all)
  return logits, dec, cache, cache_all, packed, jnp.stack(alone)


def test_lm_decodes_the_parallel_logits():
  """One rwkv7 block with RWKV-7's channel mixing: prefill (4 tokens) then
  step gives the parallel logits within 1e-5, and the block's cache (state,
  both token shifts) equals one prefill's over the whole row."""
  logits, dec, cache, cache_all, _, _ = _lm_runs()
  assert float(jnp.max(jnp.abs(dec - logits))) < 1e-5
  assert set(cache[0]) == {"mixer", "mlp"}
  numerics.assert_pytrees_close(cache, cache_all, rtol=INVARIANT, what="caches ")


def test_lm_packed_rows_equal_documents_alone():
  """segment_ids restart both token shifts (time and channel mixing) and the
  state at each document: packed logits equal each document's alone."""
  *_, packed, alone = _lm_runs()
  numerics.assert_close(packed, alone, rtol=INVARIANT, what="packed logits")


def test_channel_mix_shift_restarts_at_documents():
  """The channel mixing alone: x' is the previous token's input, zeros at a
  document start, the cache's at t = 0; its cache is the last input."""
  cmix = _random(lambda: RWKV7ChannelMix(D, 24, rngs=nnx.Rngs(1)), 2)
  x = jax.random.normal(jax.random.key(0), (1, 5, D))
  prev = jax.random.normal(jax.random.key(1), (1, D))
  ids = jnp.asarray([[0, 0, 1, 1, 1]])
  y, last = _jit_with(cmix, lambda m, x, p, i: m(x, p, segment_ids=i))(x, prev, ids)
  x_prev = jnp.stack([prev[0], x[0, 0], jnp.zeros(D), x[0, 2], x[0, 3]])[None]
  mixed = x + (x_prev - x) * cmix.mu_k[...]
  want = jnp.square(jax.nn.relu(mixed @ cmix.key.kernel[...])) @ cmix.value.kernel[...]
  numerics.assert_close(y, want, rtol=INVARIANT, what="channel mix")
  np.testing.assert_array_equal(last, x[:, -1])
  y_t, _ = _jit_with(cmix, lambda m, x_t, p: m.step(x_t, p))(x[:, 1], x[:, 0])
  numerics.assert_close(y_t, y[:, 1], rtol=INVARIANT, what="channel mix step")


# -- dtypes, axes, options ----------------------------------------------------


def test_bf16_in_bf16_out():
  """bf16 activations (float32 parameters) in, bf16 out, parallel and step,
  for the time and the channel mixing; the caches stay float32; the bf16
  layer is the float32 one within bf16's tolerance."""
  x = jax.random.normal(jax.random.key(0), (B, 5, D))

  def run(m, x):
    layer, cmix = m
    xb = x.astype(jnp.bfloat16)
    y_t, cache = layer.step(xb[:, 0], layer.init_cache(B))
    return (layer(xb)[0], y_t, cmix(xb)[0], cmix.step(xb[:, 0], cmix.init_cache(B))[0],
            cache, layer(x)[0])

  pair = nnx.List([_layer(impl="reference"),
                   _random(lambda: RWKV7ChannelMix(D, 24, rngs=nnx.Rngs(1)), 1)])
  y, y_t, z, z_t, cache, y32 = _jit_with(pair, run)(x)
  assert {a.dtype for a in (y, y_t, z, z_t)} == {jnp.dtype(jnp.bfloat16)}
  assert cache["h"].dtype == jnp.float32 and cache["shift"].dtype == jnp.float32
  numerics.assert_close(y.astype(jnp.float32), y32,
                        rtol=numerics.tolerance("chunked", jnp.bfloat16),
                        what="bf16 vs float32 layer")


@pytest.mark.parametrize("module", ["rwkv7", "channel_mix"])
def test_every_param_has_logical_axes(module):
  layer = nnx.eval_shape(lambda: RWKV7(D, n_heads=H, rngs=nnx.Rngs(0))
                         if module == "rwkv7"
                         else RWKV7ChannelMix(D, 64, rngs=nnx.Rngs(0)))
  leaves = jax.tree_util.tree_leaves_with_path(
      nnx.state(layer, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert leaves
  for path, var in leaves:
    names = var.get_metadata().get("out_sharding")
    assert names is not None, f"{module}: {path} has no logical axes"
    assert len(names) == len(var.get_value().shape), (module, path, names)


@pytest.mark.parametrize("build, match", [
    (lambda: RWKV7(D, n_heads=3, rngs=nnx.Rngs(0)),
     r"RWKV7: n_heads=3; expected a positive divisor of d_model 16"),
    (lambda: RWKV7(D, n_heads=H, decay_rank=0, rngs=nnx.Rngs(0)),
     r"RWKV7: decay_rank=0; expected None or a positive int"),
    (lambda: RWKV7(D, n_heads=H, gate_rank=2.5, rngs=nnx.Rngs(0)),
     r"RWKV7: gate_rank=2.5"),
    (lambda: RWKV7(D, n_heads=H, layer_index=3, n_layers=3, rngs=nnx.Rngs(0)),
     r"RWKV7: layer_index=3, n_layers=3; expected 0 <= layer_index"),
    (lambda: RWKV7ChannelMix(D, 8, layer_index=-1, rngs=nnx.Rngs(0)),
     r"RWKV7ChannelMix: layer_index=-1"),
    (lambda: LMConfig(mlp="geglu"),
     r"LMConfig: mlp='geglu'; expected one of \['rwkv7', 'swiglu'\]"),
])
def test_bad_arguments(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_preset_ranks_and_init_follow_rwkv7():
  """Heads of 64 (K = V = D); flash-linear-attention's LoRA ranks at 2048
  (decay / rate 32 * round(2.5 * sqrt(2048) / 32) = 128, gate 224); KDA's
  recurrence FLOPs; the channel mixing's width 4 D."""
  assert RWKV7.preset(2048) == dict(n_heads=32)
  assert RWKV7.preset(32) == dict(n_heads=1)
  layer = nnx.eval_shape(lambda: RWKV7(2048, n_heads=32, rngs=nnx.Rngs(0)))
  assert (layer.w_down.kernel.shape, layer.a_down.kernel.shape,
          layer.g_down.kernel.shape) == ((2048, 128), (2048, 128), (2048, 224))
  assert layer.flops_per_token(2048) == 18 * 2048 * 2048 / 32
  assert LMConfig(d_model=96, mlp="rwkv7").mlp_width == 384
