"""Based (Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff"): linear attention with a 2nd-order Taylor feature
map, plus a small sliding-window softmax attention. The recurrence is
lsm.ops.gla with no gate; the window branch is lsm.layers.attention.Attention.

The paper's linear-attention equations (its Taylor-approximation feature map
and the causal normalised form):

  q = x W_q, k = x W_k in R^{d'} per head (d' = feature_dim, 16 in the paper),
  phi(x) = [1, x, vec(x (x) x) / sqrt 2]          (dimension 1 + d' + d'^2 = 273),
  phi(q) . phi(k) = 1 + q . k + (q . k)^2 / 2     (the Taylor series of exp(q . k)
                                                   to second order),
  y_t = phi(q_t) sum_{s<=t} phi(k_s)^T v_s / (phi(q_t) sum_{s<=t} phi(k_s)^T + eps),

with q, k scaled by d'^{-1/4} before the map, so the kernel approximates
exp(q . k / sqrt d') as softmax attention's does. The denominator is always >= 1/2
(1 + s + s^2 / 2 > 0), so the normalised form is safe. It runs as ungated GLA on
values extended by a column of ones: that column's output is the denominator, so
the state is [B, H, 273, V + 1] and chunked, Pallas, decoding and LASP-2 come from
the op.

Sliding-window attention (window 64 in the paper) is the paper's fix for the
Taylor map's weak local precision. The paper interleaves it as separate layers of
a hybrid stack; here it is a branch of the same layer (``window``; 0 turns it off,
and the hybrid is then a ``pattern`` of ``based`` and ``attention`` layers with
``mixer_kwargs={"attention": {"window": 64}}``), and the two branches' outputs are
summed. Its decoding cache is a ring of the last ``window`` keys and values, so
the whole layer decodes in O(1) memory in the context length.

Simplified: the paper's short gated convolution layers (BaseConv) are not part of
this mixer, and the Taylor map keeps all d'^2 products (the symmetric half would
do, as the paper notes) so that the op sees a plain feature vector.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers.attention import Attention, ring_window_attention
from lsm.layers.sharding import linear as sharded_linear
from lsm.ops.gla import gla_step
from lsm.parallel import axes, sequence


def taylor_feature_map(x):
  """phi(x) = [1, x, vec(x (x) x) / sqrt 2] over the last axis, in float32.

  Args:
    x: [..., F] features.

  Returns:
    [..., 1 + F + F * F] float32, with phi(a) . phi(b) = 1 + a.b + (a.b)^2 / 2.
  """
  x = x.astype(jnp.float32)
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1)
  ones = jnp.ones((*x.shape[:-1], 1), jnp.float32)
  return jnp.concatenate([ones, x, outer * (0.5 ** 0.5)], axis=-1)


def normalized_linear_attention(q, k, v, *, h0=None, chunk_size=64, impl="auto",
                                eps=1e-6, segment_ids=None):
  """y_t = q_t S_t / (q_t z_t + eps), S_t = sum_{s<=t} k_s^T v_s, z_t = sum k_s.

  One ungated GLA call on [v, 1]: the extra value column accumulates z.

  Args:
    q, k: [B, T, H, F] non-negative-kernel features (the caller's feature map).
    v: [B, T, H, V].
    h0: optional [B, H, F, V + 1] float32 state (S and z side by side).
    chunk_size, impl, segment_ids: as lsm.ops.gla.gla (with documents, S and z
      both restart at every document).

  Returns:
    y: [B, T, H, V] in v.dtype; h_T: [B, H, F, V + 1] float32.
  """
  ones = jnp.ones((*v.shape[:-1], 1), v.dtype)
  v_aug = jnp.concatenate([v, ones], axis=-1)
  o, h_t = sequence.gla(q.astype(v.dtype), k.astype(v.dtype), v_aug, None,
                        h0=h0, scale=1.0, chunk_size=chunk_size, impl=impl,
                        segment_ids=segment_ids)
  return _divide(o, eps).astype(v.dtype), h_t


def normalized_linear_attention_step(q_t, k_t, v_t, h, *, eps=1e-6):
  """One token of ``normalized_linear_attention``: q_t, k_t [B, H, F], v_t
  [B, H, V], h [B, H, F, V + 1] -> (y_t [B, H, V] in v_t.dtype, h)."""
  ones = jnp.ones((*v_t.shape[:-1], 1), v_t.dtype)
  o, h = gla_step(q_t.astype(v_t.dtype), k_t.astype(v_t.dtype),
                  jnp.concatenate([v_t, ones], axis=-1), None, h, scale=1.0)
  return _divide(o, eps).astype(v_t.dtype), h


def _divide(o, eps):
  o = o.astype(jnp.float32)
  return o[..., :-1] / (o[..., -1:] + eps)


class Based(nnx.Module):
  """Based mixer: [B, T, D] -> [B, T, D] (protocol in lsm/layers/__init__.py).

  Linear branch: q, k: D -> H * feature_dim, v: D -> D in H heads, Taylor map,
  normalised linear attention, output projection. Window branch (when
  ``window``): an Attention layer with that sliding window (RoPE, H heads of
  width D / H). The output is the sum of the branches.

  Args:
    d_model: width D.
    n_heads: heads H, dividing D.
    feature_dim: d', the projected q, k width per head (paper: 16; state 273).
    window: sliding-window length of the softmax branch (paper: 64); 0 or None
      for the linear branch alone.
    eps: added to the denominator.
    chunk_size, impl: as lsm.ops.gla.gla.
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options of the paper's head structure at width ``d_model``
    (the size presets): feature dim 16, value heads of dim 64 (D / 64 heads),
    the 64-token window."""
    return dict(n_heads=max(1, d_model // 64), feature_dim=16)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token beyond the projections
    (``lsm.models.lm.flops_per_token``): 12 H F V for the linear branch (F =
    ``state_dim``, V = D / H) plus the window branch's attention."""
    linear = 12.0 * self.state_dim * self.d_model
    return linear + (0.0 if self.attn is None else self.attn.flops_per_token(seq_len))

  def __init__(self, d_model: int, *, n_heads: int, feature_dim: int = 16,
               window: int | None = 64, eps: float = 1e-6, chunk_size: int = 64,
               impl: str = "auto", rngs: nnx.Rngs):
    if n_heads < 1 or d_model % n_heads:
      raise ValueError(f"Based: n_heads={n_heads!r}; expected a positive divisor "
                       f"of d_model={d_model}")
    if feature_dim < 1:
      raise ValueError(f"Based: feature_dim={feature_dim!r}; expected a positive "
                       "int")
    if window is not None and window < 0:
      raise ValueError(f"Based: window={window!r}; expected None, 0 (no window "
                       "branch) or a positive int")
    if not eps > 0:
      raise ValueError(f"Based: eps={eps!r}; expected > 0")
    self.n_heads, self.feature_dim, self.eps = n_heads, feature_dim, float(eps)
    self.d_model, self.window = d_model, window or 0
    self.chunk_size, self.impl = chunk_size, impl

    linear = functools.partial(sharded_linear, rngs=rngs)

    self.q_proj = linear(d_model, n_heads * feature_dim, axes.EMBED, axes.HEADS)
    self.k_proj = linear(d_model, n_heads * feature_dim, axes.EMBED, axes.HEADS)
    self.v_proj = linear(d_model, d_model, axes.EMBED, axes.HEADS)
    self.o_proj = linear(d_model, d_model, axes.HEADS, axes.EMBED)
    self.attn = (Attention(d_model, n_heads=n_heads, window=self.window,
                           impl=impl, rngs=rngs) if self.window else None)

  @property
  def state_dim(self) -> int:
    """Per-head feature (state K) dimension 1 + d' + d'^2."""
    F = self.feature_dim
    return 1 + F + F * F

  def _features(self, x):
    """x: [..., D] -> phi(q), phi(k) [..., H, 273] float32, v [..., H, D / H]."""
    H, F = self.n_heads, self.feature_dim
    split = lambda y: y.reshape(*y.shape[:-1], H, y.shape[-1] // H)  # noqa: E731
    s = F ** -0.25  # phi(q).phi(k) then expands exp(q.k / sqrt(F))
    q = taylor_feature_map(split(self.q_proj(x)) * s)
    k = taylor_feature_map(split(self.k_proj(x)) * s)
    return q, k, split(self.v_proj(x)).astype(x.dtype)

  def _linear_out(self, o, x):
    return self.o_proj(o.reshape(*o.shape[:-2], self.d_model)).astype(x.dtype)

  def init_cache(self, batch: int, max_len: int | None = None):
    del max_len  # O(1) in the context length (the window ring is O(window))
    H = self.n_heads
    cache = {"h": jnp.zeros((batch, H, self.state_dim, self.d_model // H + 1),
                            jnp.float32)}
    if self.attn is not None:
      shape = (batch, self.window, self.attn.n_kv_heads, self.attn.head_dim)
      cache["window"] = {"k": jnp.zeros(shape, jnp.float32),
                         "v": jnp.zeros(shape, jnp.float32),
                         "pos": jnp.zeros((), jnp.int32)}
    return cache

  def _window_attend(self, x, ring):
    """Sliding-window attention of x (positions pos..pos+T-1) over the ring of
    the previous ``window`` keys and values and x's own; returns (y [B, T, D],
    the ring advanced by T)."""
    attn, W = self.attn, self.window
    B, T, _ = x.shape
    pos = ring["pos"]
    q, k = attn._qk(x, pos + jnp.arange(T, dtype=jnp.int32))  # rotated
    v = attn.v_proj(x).reshape(B, T, attn.n_kv_heads, attn.head_dim)
    o, ring = ring_window_attention(q, k, v, ring, W)
    y = attn.o_proj(o.reshape(B, T, attn.n_heads * attn.head_dim)).astype(x.dtype)
    return y, ring

  def __call__(self, x, cache=None, *, segment_ids=None, positions=None):
    """x: [B, T, D] -> (y [B, T, D], cache or None). Packed rows (no cache):
    ``segment_ids`` (int [B, T] document ids) restart the linear state at every
    document and confine the window branch to the query's document, whose
    ``positions`` (int [B, T]) place its RoPE."""
    q, k, v = self._features(x)
    h0 = None if cache is None else cache["h"]
    o, h_t = normalized_linear_attention(q, k, v, h0=h0, chunk_size=self.chunk_size,
                                         impl=self.impl, eps=self.eps,
                                         segment_ids=segment_ids)
    y = self._linear_out(o, x)
    new = None if cache is None else {"h": h_t}
    if self.attn is not None:
      if cache is None:
        y = y + self.attn(x, segment_ids=segment_ids, positions=positions)[0]
      elif segment_ids is not None or positions is not None:
        raise ValueError("Based: segment_ids / positions are given with a cache; "
                         "expected them only for a cacheless forward pass")
      else:
        y_w, new["window"] = self._window_attend(x, cache["window"])
        y = y + y_w
    return y, new

  def step(self, x_t, cache):
    """x_t: [B, D] -> (y_t [B, D], cache)."""
    q, k, v = self._features(x_t)
    o, h = normalized_linear_attention_step(q, k, v, cache["h"], eps=self.eps)
    y = self._linear_out(o, x_t)
    new = {"h": h}
    if self.attn is not None:
      y_w, new["window"] = self._window_attend(x_t[:, None], cache["window"])
      y = y + y_w[:, 0]
    return y, new
