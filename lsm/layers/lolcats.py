"""LoLCATs attention (Zhang et al. 2024, "LoLCATs: On Low-Rank Linearizing of
Large Language Models"): a pretrained softmax-attention layer's q, k, v, o with
Hedgehog feature maps (lsm.layers.hedgehog) for the far past and exact softmax
attention over the last W tokens, mixed in one normalisation.

For query t of head h (its kv head as the teacher's grouped-query layout says),
with q, k rotated by RoPE as in the teacher, scores s_ts = q_t . k_s / sqrt(K),
m_t = max of s_ts over the window, gamma_h = sigmoid(window_factor_h):

  a_ts = gamma_h exp(s_ts - m_t)            t - W < s <= t   (the window)
  a_ts = (1 - gamma_h) phi_q(q_t) . phi_k(k_s)    s <= t - W   (linear)
  y_t  = sum_s a_ts v_s / sum_s a_ts,       out = y W_o

phi(x) = [softmax(x W + b), softmax(-x W - b)] per head (F features a half,
W starting at the identity when F = K). The window keeps the exact local
attention the feature map approximates worst; everything older lives in a
[2F, V + 1] state per head, so decoding is O(W) in the context length. m_t
shifts only the window terms (as LoLCATs' reference does); gamma starts at 0.1
(window_factor = logit(0.1), the paper's initialisation).

Computation: the linear sum over s <= t - W is the causal linear attention
over all s <= t (lsm.ops.gla, ungated, on [v, 1]) minus its window part,
which the banded window computation has at hand; the window is computed in
blocks of C = min(W, T) queries against the C + W keys that can reach them,
so memory is O(T W) per head, and a decoding step reads W + 1 keys. Decoding keeps a ring of the last W (rotated) keys and values
and the state of every key so far.

The layer subclasses ``Attention``: it takes the teacher's constructor options
(grouped-query heads, biases, q/k norm, RoPE and its scaling) and has its
parameters under the same names, so a pretrained attention layer's weights load
into it as they are; ``teacher(x)`` is that softmax attention, the target of
LoLCATs' attention transfer (lsm.models.distill). The new parameters are the
feature maps (fq_w, fq_b, fk_w, fk_b) and window_factor.

Simplified: LoLCATs also has a variant with terraced windows ("tk" blocks) for
its kernels; this is the plain sliding window.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers.attention import Attention
from lsm.layers.hedgehog import hedgehog_feature_map
from lsm.layers.sharding import param
from lsm.ops.gla import gla_step
from lsm.parallel import axes, sequence

# logit(0.1): LoLCATs' initial window factor.
INIT_WINDOW_FACTOR = math.log(0.1 / 0.9)


class LolcatsAttention(Attention):
  """LoLCATs linear + sliding-window attention over a teacher's projections.

  Args:
    d_model, n_heads, n_kv_heads, head_dim, rope_base, rope_scaling, qkv_bias,
      o_bias, qk_norm, norm_eps, window: the teacher attention's options
      (``Attention``); ``window`` is the teacher's own sliding window (used by
      ``teacher``), not the student's.
    local_window: W, the student's softmax window (LoLCATs: 64).
    feature_dim: F per half of the feature map; None for the head dim K.
    init_window_factor: window_factor's initial value (logit of gamma).
    chunk_size, impl: as lsm.ops.gla.gla for the linear part.
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    return dict(n_heads=max(1, d_model // 64))

  def flops_per_token(self, seq_len: int) -> float:
    """The linear part (12 H 2F (V + 1)) plus the banded window (2W keys a
    query, 4 H K each for QK^T and AV, times 3 for forward and backward)."""
    K = self.head_dim
    return (12.0 * self.n_heads * 2 * self.feature_dim * (K + 1)
            + 12.0 * self.n_heads * K * min(2 * self.local_window, seq_len))

  def __init__(self, d_model: int, *, n_heads: int, local_window: int = 64,
               feature_dim: int | None = None,
               init_window_factor: float = INIT_WINDOW_FACTOR, eps: float = 1e-6,
               chunk_size: int = 64, rngs: nnx.Rngs, **attention):
    super().__init__(d_model, n_heads=n_heads, rngs=rngs, **attention)
    if not isinstance(local_window, int) or local_window < 1:
      raise ValueError(f"LolcatsAttention: local_window={local_window!r}; "
                       "expected a positive int")
    K = self.head_dim
    F = K if feature_dim is None else feature_dim
    if not isinstance(F, int) or F < 1:
      raise ValueError(f"LolcatsAttention: feature_dim={feature_dim!r}; expected "
                       "None or a positive int")
    self.local_window, self.feature_dim = local_window, F
    self.eps, self.chunk_size = float(eps), chunk_size

    def feature_weights():  # identity where F = K (Hedgehog's init)
      eye = jnp.eye(K, F, dtype=jnp.float32)
      return jnp.broadcast_to(eye, (n_heads, K, F))

    self.fq_w = param(feature_weights(), axes.HEADS, None, axes.STATE_K)
    self.fk_w = param(feature_weights(), axes.HEADS, None, axes.STATE_K)
    self.fq_b = param(jnp.zeros((n_heads, F), jnp.float32), axes.HEADS,
                      axes.STATE_K, float32=True)
    self.fk_b = param(jnp.zeros((n_heads, F), jnp.float32), axes.HEADS,
                      axes.STATE_K, float32=True)
    self.window_factor = param(
        jnp.full((n_heads,), init_window_factor, jnp.float32), axes.HEADS,
        float32=True)

  def teacher(self, x, *, segment_ids=None, positions=None):
    """The softmax attention this layer replaces (same weights): [B, T, D]."""
    return Attention.__call__(self, x, segment_ids=segment_ids,
                              positions=positions)[0]

  # -- pieces -------------------------------------------------------------

  def _qkv(self, x, positions):
    B, T, _ = x.shape
    q, k = self._qk(x, positions)
    v = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
    return q, k, v.astype(q.dtype)

  def _repeat(self, x):
    """[..., n_kv_heads, K] -> [..., H, K] (each kv head to its query heads)."""
    return jnp.repeat(x, self.n_heads // self.n_kv_heads, axis=-2)

  def _phi_k(self, k):
    return hedgehog_feature_map(self._repeat(k), self.fk_w[...], self.fk_b[...])

  def _window_terms(self, q, k, v, q_pos, k_pos, q_doc=None, k_doc=None):
    """Per query: the gamma-weighted softmax numerator and denominator over
    its window, and the window's linear numerator and denominator (to subtract
    from the all-past linear sums).

    Args:
      q: [B, T, H, K] rotated queries at positions q_pos [T] (or [B, T]).
      k, v: [B, S, Hkv, K] rotated keys and values at k_pos [S] (or [B, S]),
        S = W + T: the W positions before q's first, then q's own.
      q_doc, k_doc: optional [B, T] / [B, S] document ids (-1: none).

    Returns:
      (num [B, T, H, V], den [B, T, H]) float32: window softmax part plus
      minus the window's linear part.
    """
    B, T, H, K = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    W, G = self.local_window, H // Hkv
    C = min(W, T)  # queries per block (1 when decoding)
    n = -(-T // C)
    pad = n * C - T
    f32 = jnp.float32

    def pad_t(x, axis=1, value=0):
      widths = [(0, 0)] * x.ndim
      widths[axis] = (0, pad)
      return jnp.pad(x, widths, constant_values=value)

    q_pos = jnp.broadcast_to(q_pos, (B, T))
    k_pos = jnp.broadcast_to(k_pos, (B, S))
    # Query block b (C queries) sees keys [b C, b C + C + W) of the S + pad
    # keys: the window of its first query through its last.
    qb = pad_t(q).reshape(B, n, C, Hkv, G, K)
    qpb = pad_t(q_pos, value=-1).reshape(B, n, C)
    kp, vp = pad_t(k), pad_t(v)
    kpos = pad_t(k_pos, value=jnp.iinfo(jnp.int32).max)
    idx = (jnp.arange(n)[:, None] * C + jnp.arange(C + W)[None, :])  # [n, C + W]
    kb, vb, kposb = kp[:, idx], vp[:, idx], kpos[:, idx]  # [B, n, C + W, ...]
    allowed = ((kposb[:, :, None, :] <= qpb[..., None])
               & (kposb[:, :, None, :] > qpb[..., None] - W)
               & (kposb[:, :, None, :] >= 0))  # [B, n, C, C + W]
    if q_doc is not None:
      qdb = pad_t(q_doc, value=-2).reshape(B, n, C)
      kdb = pad_t(k_doc, value=-3)[:, idx]
      allowed &= kdb[:, :, None, :] == qdb[..., None]
    hi = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bnqhgk,bnshk->bnhgqs", qb.astype(f32), kb.astype(f32),
                        precision=hi) / math.sqrt(K)
    mask = allowed[:, :, None, None]  # [B, n, 1, 1, C, C + W]
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    gamma = jax.nn.sigmoid(self.window_factor[...]).reshape(Hkv, G)
    a_sm = gamma[:, :, None, None] * jnp.where(mask, jnp.exp(scores - m), 0.0)
    # The window's linear weights phi_q . phi_k (to subtract).
    phi_q = hedgehog_feature_map(qb.reshape(B, n, C, H, K), self.fq_w[...],
                                 self.fq_b[...]).reshape(B, n, C, Hkv, G, -1)
    phi_k = hedgehog_feature_map(jnp.repeat(kb, G, axis=-2), self.fk_w[...],
                                 self.fk_b[...]).reshape(B, n, C + W, Hkv, G, -1)
    a_ln = jnp.einsum("bnqhgf,bnshgf->bnhgqs", phi_q, phi_k, precision=hi)
    a_ln = jnp.where(mask, a_ln, 0.0) * (1.0 - gamma)[:, :, None, None]
    a = a_sm - a_ln
    num = jnp.einsum("bnhgqs,bnshv->bnqhgv", a, vb.astype(f32), precision=hi)
    den = jnp.sum(a, axis=-1)  # [B, n, Hkv, G, W]
    num = num.reshape(B, n * C, H, -1)[:, :T]
    den = jnp.moveaxis(den, -1, 2).reshape(B, n * C, H)[:, :T]
    return num, den

  def _mix(self, q, k, v, h0, *, q_pos, k_pos, ring_k, ring_v, segment_ids=None):
    """(o [B, T, H, V] float32, h_T): all-past linear sums from h0 minus the
    window's, plus the window softmax, normalised together."""
    B, T = q.shape[:2]
    W = self.local_window
    phi_q = hedgehog_feature_map(q, self.fq_w[...], self.fq_b[...])
    vr = self._repeat(v)
    ones = jnp.ones((*vr.shape[:-1], 1), vr.dtype)
    args = (phi_q.astype(v.dtype), self._phi_k(k).astype(v.dtype),
            jnp.concatenate([vr, ones], -1))
    if T == 1 and h0 is not None:  # decoding: the op's one-token form
      lin, h_t = gla_step(*(a[:, 0] for a in args), None, h0, scale=1.0)
      lin = lin[:, None]
    else:
      lin, h_t = sequence.gla(*args, None, h0=h0, scale=1.0,
                              chunk_size=self.chunk_size, impl=self.impl,
                              segment_ids=segment_ids)
    lin = lin.astype(jnp.float32) * (1.0 - jax.nn.sigmoid(
        self.window_factor[...]))[:, None]
    k_all = jnp.concatenate([ring_k.astype(k.dtype), k], axis=1)
    v_all = jnp.concatenate([ring_v.astype(v.dtype), v], axis=1)
    q_doc = k_doc = None
    if segment_ids is not None:
      q_doc = segment_ids
      k_doc = jnp.concatenate([jnp.full((B, W), -1, segment_ids.dtype),
                               segment_ids], axis=1)
    num, den = self._window_terms(q, k_all, v_all, q_pos, k_pos, q_doc, k_doc)
    num = num + lin[..., :-1]
    den = den + lin[..., -1]
    return num / (den[..., None] + self.eps), h_t

  def _out(self, o, x):
    B, T = o.shape[:2]
    y = self.o_proj(o.astype(x.dtype).reshape(B, T, -1))
    return y.astype(x.dtype)

  # -- the mixer protocol -------------------------------------------------

  def init_cache(self, batch: int, max_len: int | None = None, dtype=jnp.float32):
    """Ring of the last W rotated keys and values, the linear state of every
    key so far ([B, H, 2F, V + 1] float32) and the position: O(W)."""
    del max_len
    ring = (batch, self.local_window, self.n_kv_heads, self.head_dim)
    return {"k": jnp.zeros(ring, dtype), "v": jnp.zeros(ring, dtype),
            "h": jnp.zeros((batch, self.n_heads, 2 * self.feature_dim,
                            self.head_dim + 1), jnp.float32),
            "pos": jnp.zeros((), jnp.int32)}

  def __call__(self, x, cache=None, *, segment_ids=None, positions=None):
    """x: [B, T, D] -> (y [B, T, D], cache or None). Packed rows (no cache):
    ``segment_ids`` confine window and state to each document, ``positions``
    place RoPE."""
    B, T, _ = x.shape
    W = self.local_window
    if cache is None:
      pos = jnp.zeros((), jnp.int32)
      q_pos = jnp.arange(T, dtype=jnp.int32) if positions is None else positions
      ring_shape = (B, W, self.n_kv_heads, self.head_dim)
      ring_k = ring_v = jnp.zeros(ring_shape, x.dtype)
      h0 = None
    else:
      self._check_no_documents(segment_ids, positions)
      pos = cache["pos"]
      q_pos = pos + jnp.arange(T, dtype=jnp.int32)
      ring_k, ring_v, h0 = cache["k"], cache["v"], cache["h"]
    q, k, v = self._qkv(x, q_pos)
    ring_pos = pos - W + jnp.arange(W, dtype=jnp.int32)  # < 0: empty slots
    if cache is None and positions is not None:
      k_pos = jnp.concatenate(
          [jnp.broadcast_to(ring_pos, (B, W)), positions], axis=1)
    else:
      k_pos = jnp.concatenate([ring_pos, q_pos])
    o, h_t = self._mix(q, k, v, h0, q_pos=q_pos, k_pos=k_pos, ring_k=ring_k,
                       ring_v=ring_v, segment_ids=segment_ids)
    y = self._out(o, x)
    if cache is None:
      return y, None
    k_all = jnp.concatenate([ring_k, k.astype(ring_k.dtype)], axis=1)
    v_all = jnp.concatenate([ring_v, v.astype(ring_v.dtype)], axis=1)
    return y, {"k": k_all[:, T:], "v": v_all[:, T:], "h": h_t, "pos": pos + T}

  def step(self, x_t, cache):
    """x_t: [B, D] -> (y_t [B, D], cache)."""
    y, cache = self(x_t[:, None], cache)
    return y[:, 0], cache
