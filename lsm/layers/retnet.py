"""Multi-scale retention (Sun et al. 2023, "Retentive Network: A Successor to
Transformer for Large Language Models"). The recurrence is lsm.ops.gla with one
fixed gate per head; this module only projects, rotates, normalises and gates.

The paper's equations (retention in its recurrent form, and multi-scale
retention with its gated output):

  q = R(x W_Q), k = R(x W_K), v = x W_V,
  S_t = gamma_h S_{t-1} + k_t^T v_t,   o_t = q_t S_t / sqrt(K),
  gamma_h = 1 - 2^{-5-h},  h = 0..H-1,
  Y = GroupNorm_H(concat_h o^h),  MSR(X) = (swish(X W_G) (.) Y) W_O,

with R the rotary part of xPos (Sun et al. 2022) at absolute positions; the
value and gate widths are 2D (the paper's V = 2d, ``expand_v``). GroupNorm has one
group per head and a learnable per-channel scale and bias.

Simplified: R is plain rotary (rotate-half RoPE, lsm.layers.attention), without
xPos's exponential length scaling, whose role the fixed decays gamma_h already
play (as in the RetNet release). The parallel form's extra normalisations (scaling
the decay matrix by its row sums, clamping the retention scores)
are dropped: GroupNorm after the retention is invariant to the per-head scale
they fix, up to its epsilon.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers.norm import standardize_heads
from lsm.layers.rope import apply_rope
from lsm.layers.sharding import linear as sharded_linear, param
from lsm.ops.gla import gla_step
from lsm.parallel import axes, sequence


def retention_log_decays(n_heads: int):
  """log gamma_h = log(1 - 2^{-5-h}), float32 [H]."""
  return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(n_heads, dtype=jnp.float32))))


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _norm_gate(o, gate, scale, bias, eps: float):
  """silu(gate) * (GroupNorm(o) * scale + bias), float32 [..., H * V]: o
  [..., H, V], gate [..., H * V]. Rematerialised in the backward pass from o
  and gate, which are kept anyway, instead of storing its float32 [..., H * V]
  intermediates (six per layer)."""
  o = standardize_heads(o, eps) * scale + bias
  return jax.nn.silu(gate.astype(jnp.float32)) * o


class RetNet(nnx.Module):
  """Multi-scale retention mixer: [B, T, D] -> [B, T, D] (protocol in
  lsm/layers/__init__.py). The cache carries the state and the position.

  Args:
    d_model: width D.
    n_heads: heads H; D and D * expand_v must divide by H, the key head width
      must be even (rotary pairs).
    expand_v: value (and gate) width relative to D (paper: 2).
    rope_base: rotary frequency base.
    eps: GroupNorm epsilon.
    chunk_size, impl: as lsm.ops.gla.gla.
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options of the paper's head structure at width ``d_model``
    (the size presets): 8 heads, key width D, value width 2 D, so K = D/8 and
    V = D/4 per head (d_model 2048: K 256, V 512)."""
    return dict(n_heads=8, expand_v=2.0)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of the retention recurrence beyond the
    projections (``lsm.models.lm.flops_per_token``): 12 H K V."""
    return 12.0 * self.d_model * self.value_dim / self.n_heads

  def __init__(self, d_model: int, *, n_heads: int, expand_v: float = 2.0,
               rope_base: float = 10000.0, eps: float = 1e-5,
               chunk_size: int = 64, impl: str = "auto", rngs: nnx.Rngs):
    value_dim = int(d_model * expand_v)
    if (n_heads < 1 or d_model % n_heads or value_dim % n_heads
        or (d_model // n_heads) % 2):
      raise ValueError(f"RetNet: n_heads={n_heads!r}; expected a positive divisor "
                       f"of d_model={d_model} and of the value width {value_dim} "
                       "with an even key head width")
    if rope_base <= 0:
      raise ValueError(f"RetNet: rope_base={rope_base!r}; expected > 0")
    self.n_heads, self.d_model, self.value_dim = n_heads, d_model, value_dim
    self.rope_base, self.eps = float(rope_base), float(eps)
    self.chunk_size, self.impl = chunk_size, impl

    linear = functools.partial(sharded_linear, rngs=rngs)

    self.q_proj = linear(d_model, d_model, axes.EMBED, axes.HEADS)
    self.k_proj = linear(d_model, d_model, axes.EMBED, axes.HEADS)
    self.v_proj = linear(d_model, value_dim, axes.EMBED, axes.HEADS)
    self.g_proj = linear(d_model, value_dim, axes.EMBED, axes.HEADS)
    self.o_proj = linear(value_dim, d_model, axes.HEADS, axes.EMBED)
    self.gn_scale = param(jnp.ones((value_dim,), jnp.float32), axes.HEADS,
                          float32=True)
    self.gn_bias = param(jnp.zeros((value_dim,), jnp.float32), axes.HEADS,
                         float32=True)

  def _split(self, y, x):
    return y.reshape(*y.shape[:-1], self.n_heads, -1).astype(x.dtype)

  def _project(self, x, positions):
    """x: [B, T, D], positions [T] -> q, k [B, T, H, K], v, log_g [B, T, H]."""
    q = apply_rope(self._split(self.q_proj(x), x), positions, self.rope_base)
    k = apply_rope(self._split(self.k_proj(x), x), positions, self.rope_base)
    log_g = jnp.broadcast_to(retention_log_decays(self.n_heads),
                             (*x.shape[:-1], self.n_heads))
    return q, k, self._split(self.v_proj(x), x), log_g

  def _output(self, o, x):
    o = _norm_gate(o, self.g_proj(x), self.gn_scale[...], self.gn_bias[...],
                   self.eps)
    return self.o_proj(o.astype(x.dtype)).astype(x.dtype)

  def init_cache(self, batch: int, max_len: int | None = None):
    del max_len  # O(1) in the context length
    H = self.n_heads
    return {"h": jnp.zeros((batch, H, self.d_model // H, self.value_dim // H),
                           jnp.float32),
            "pos": jnp.zeros((), jnp.int32)}

  def __call__(self, x, cache=None, *, segment_ids=None, positions=None):
    """x: [B, T, D] at positions pos..pos+T-1 (pos = 0 without a cache) ->
    (y [B, T, D], cache or None). Packed rows (no cache): ``segment_ids``
    (int [B, T] document ids) restart the retention state at every document
    and ``positions`` (int [B, T], restarting per document) place the rotary
    part, so each document is retained as if alone."""
    T = x.shape[1]
    if cache is not None and (segment_ids is not None or positions is not None):
      raise ValueError("RetNet: segment_ids / positions are given with a cache; "
                       "expected them only for a cacheless forward pass")
    pos = jnp.zeros((), jnp.int32) if cache is None else cache["pos"]
    if positions is None:
      positions = pos + jnp.arange(T, dtype=jnp.int32)
    q, k, v, log_g = self._project(x, positions)
    h0 = None if cache is None else cache["h"]
    o, h_t = sequence.gla(q, k, v, log_g, h0=h0, chunk_size=self.chunk_size,
                          impl=self.impl, segment_ids=segment_ids)
    y = self._output(o, x)
    return y, (None if cache is None else {"h": h_t, "pos": pos + T})

  def step(self, x_t, cache):
    """x_t: [B, D] -> (y_t [B, D], cache)."""
    pos = cache["pos"]
    q, k, v, log_g = self._project(x_t[:, None], pos[None])
    o, h = gla_step(q[:, 0], k[:, 0], v[:, 0], log_g[:, 0], cache["h"])
    return self._output(o, x_t), {"h": h, "pos": pos + 1}
