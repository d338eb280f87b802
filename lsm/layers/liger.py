"""Liger attention (Lan et al. 2025, "Liger: Linearizing Large Language Models
to Gated Recurrent Structures"): a pretrained attention layer turned into gated
linear attention plus a sliding window, with no new parameters.

With the teacher's projections (before RoPE) q_t [H, K], k_t and v_t [Hkv, K]
(each kv head serving its query heads, as the teacher's grouped-query layout
says):

  gate (pooled from the key projection):  log g_t = log sigmoid(k_t) / 16
  GLA:   S_t = diag(g_t) S_{t-1} + softmax(k_t)^T v_t,  o_t = softmax(q_t) S_t
  window: softmax attention of the rotated q, k over the last W tokens
  out = (o_t / 2 + window_t / 2) W_o

The feature maps are softmaxes over each head's channels (Liger's choice: no
learned map), and the gate is the key projection itself, pooled to the key
width (an identity pooling when, as in Liger's models, the gate and key widths
agree), scaled by Liger's gate normaliser 1/16. Everything trainable is the
teacher's: Liger fine-tunes it with LoRA and the next-token loss alone, so
there is no attention-transfer stage for it.

The layer subclasses ``Attention`` (same options, same parameter names: a
pretrained attention layer loads as it is); ``teacher(x)`` is that softmax
attention. Decoding keeps the [K, V] state per head and a ring of the last W
rotated keys and values: O(W) in the context length.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers.attention import Attention, ring_window_attention
from lsm.ops.gla import gla_step
from lsm.parallel import sequence

# Liger's gate logit normaliser: log g = log sigmoid(k) / 16.
GATE_NORMALIZER = 16.0


class LigerAttention(Attention):
  """Liger's GLA + sliding-window attention over a teacher's projections.

  Args:
    d_model, n_heads and the other ``Attention`` options: the teacher's
      (``window`` is the teacher's own window, used by ``teacher``).
    local_window: W of the softmax branch (Liger: 64).
    chunk_size, impl: as lsm.ops.gla.gla.
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    return dict(n_heads=max(1, d_model // 64))

  def flops_per_token(self, seq_len: int) -> float:
    K = self.head_dim
    return (12.0 * self.n_heads * K * K
            + 12.0 * self.n_heads * K * min(self.local_window, seq_len / 2))

  def __init__(self, d_model: int, *, n_heads: int, local_window: int = 64,
               chunk_size: int = 64, rngs: nnx.Rngs, **attention):
    super().__init__(d_model, n_heads=n_heads, rngs=rngs, **attention)
    if not isinstance(local_window, int) or local_window < 1:
      raise ValueError(f"LigerAttention: local_window={local_window!r}; "
                       "expected a positive int")
    self.local_window, self.chunk_size = local_window, chunk_size

  def teacher(self, x, *, segment_ids=None, positions=None):
    """The softmax attention this layer replaces (same weights): [B, T, D]."""
    return Attention.__call__(self, x, segment_ids=segment_ids,
                              positions=positions)[0]

  def _branches(self, x, positions):
    """Raw and rotated q, k; v; GLA features and gate, per query head."""
    B, T, _ = x.shape
    G = self.n_heads // self.n_kv_heads
    q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim)
    k = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    rq, rk = self._qk(x, positions)
    f32 = jnp.float32
    phi_q = jax.nn.softmax(q.astype(f32), -1).astype(v.dtype)
    phi_k = jax.nn.softmax(k.astype(f32), -1).astype(v.dtype)
    log_g = jax.nn.log_sigmoid(k.astype(f32)) / GATE_NORMALIZER
    rep = lambda a: jnp.repeat(a, G, axis=2)  # noqa: E731
    return rq, rk, v, phi_q, rep(phi_k), rep(v), rep(log_g)

  def _out(self, o_lin, o_win, x):
    B, T = x.shape[:2]
    o = 0.5 * o_lin.astype(jnp.float32) + 0.5 * o_win.astype(jnp.float32)
    return self.o_proj(o.astype(x.dtype).reshape(B, T, -1)).astype(x.dtype)

  def init_cache(self, batch: int, max_len: int | None = None, dtype=jnp.float32):
    """The GLA state [B, H, K, K] float32 and a ring of the last W rotated
    keys and values: O(W)."""
    del max_len
    ring = (batch, self.local_window, self.n_kv_heads, self.head_dim)
    return {"h": jnp.zeros((batch, self.n_heads, self.head_dim, self.head_dim),
                           jnp.float32),
            "window": {"k": jnp.zeros(ring, dtype), "v": jnp.zeros(ring, dtype),
                       "pos": jnp.zeros((), jnp.int32)}}

  def __call__(self, x, cache=None, *, segment_ids=None, positions=None):
    """x: [B, T, D] -> (y [B, T, D], cache or None). Packed rows (no cache):
    ``segment_ids`` restart the state and confine the window to each
    document, ``positions`` place RoPE."""
    B, T, _ = x.shape
    if cache is not None:
      self._check_no_documents(segment_ids, positions)
      positions = cache["window"]["pos"] + jnp.arange(T, dtype=jnp.int32)
    elif positions is None:
      positions = jnp.arange(T, dtype=jnp.int32)
    rq, rk, v, phi_q, phi_k, v_h, log_g = self._branches(x, positions)
    o_lin, h_t = sequence.gla(phi_q, phi_k, v_h, log_g,
                              h0=None if cache is None else cache["h"], scale=1.0,
                              chunk_size=self.chunk_size, impl=self.impl,
                              segment_ids=segment_ids)
    if cache is None:
      o_win = sequence.attention(rq, rk, v, window=self.local_window,
                                 segment_ids=segment_ids)
      return self._out(o_lin, o_win, x), None
    o_win, ring = ring_window_attention(rq, rk, v, cache["window"],
                                        self.local_window)
    return self._out(o_lin, o_win, x), {"h": h_t, "window": ring}

  def step(self, x_t, cache):
    """x_t: [B, D] -> (y_t [B, D], cache)."""
    x = x_t[:, None]
    positions = cache["window"]["pos"][None]
    rq, rk, v, phi_q, phi_k, v_h, log_g = self._branches(x, positions)
    o_lin, h = gla_step(phi_q[:, 0], phi_k[:, 0], v_h[:, 0], log_g[:, 0],
                        cache["h"], scale=1.0)
    o_win, ring = ring_window_attention(rq, rk, v, cache["window"],
                                        self.local_window)
    return self._out(o_lin[:, None], o_win, x)[:, 0], {"h": h, "window": ring}
