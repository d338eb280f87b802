"""Causal multi-head softmax attention with RoPE, for hybrid stacks.

For each query head n, at position t (its kv head is n // G, G = n_heads /
n_kv_heads, the grouping ``jax.nn.dot_product_attention`` uses):

  y_t = sum_s softmax_s(q_t . k_s / sqrt(head_dim) over allowed s) v_s,
  allowed s: s <= t, and t - window < s when ``window`` is set,

where q and k carry rotary position embeddings (Su et al. 2021, rotate-half
convention as in GPT-NeoX / Llama; lsm.layers.rope, with the frequency
scalings of pretrained checkpoints) at their absolute positions. Absolute
positions are what make prefill and decoding from a cache agree with the
parallel forward.

The options pretrained Llama-family checkpoints use (lsm.models.hf imports them):
biases on the q, k, v projections (Qwen2) and on the output projection (Llama's
``attention_bias``), and an RMSNorm over each head's channels of q and k before
RoPE (Qwen3's q/k norm).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers.norm import RMSNorm
from lsm.layers.rope import apply_rope, rope_frequencies
from lsm.layers.sharding import linear as sharded_linear
from lsm.parallel import axes, sequence

# The op impl names a config may pass to every mixer of a hybrid stack; attention
# accepts them (its own implementation is XLA's), and rejects anything else.
KNOWN_IMPLS = ("auto", "reference", "chunked", "pallas_mosaic_gpu", "pallas_triton",
               "pallas_gpu", "pallas_tpu")  # pallas_gpu: old name of pallas_triton


def ring_window_attention(q, k, v, ring, window: int):
  """Sliding-window attention of T new tokens over a ring of the previous
  ``window`` keys and values and their own: the decoding form of an attention
  window (Based's and Liger's window branches).

  Args:
    q: [B, T, H, K] rotated queries at positions pos..pos+T-1.
    k, v: [B, T, Hkv, K] their rotated keys and values.
    ring: {"k", "v": [B, W, Hkv, K] (slot j: position pos - W + j; negative
      positions are empty), "pos": int32 scalar}.
    window: W.

  Returns:
    (o [B, T, H, K] in q.dtype, the ring advanced by T).
  """
  T, W, pos = q.shape[1], window, ring["pos"]
  q_pos = pos + jnp.arange(T, dtype=jnp.int32)
  k_all = jnp.concatenate([ring["k"], k.astype(ring["k"].dtype)], axis=1)
  v_all = jnp.concatenate([ring["v"], v.astype(ring["v"].dtype)], axis=1)
  k_pos = jnp.concatenate([pos - W + jnp.arange(W, dtype=jnp.int32), q_pos])
  mask = ((k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - W)
          & (k_pos[None, :] >= 0))  # [T, W + T]
  o = jax.nn.dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
                                   mask=mask[None, None], implementation=None)
  return o, {"k": k_all[:, T:], "v": v_all[:, T:], "pos": pos + T}


def _concrete_int(x):
  """int(x) when x is a concrete value, None when it is traced (under jit)."""
  try:
    return int(x)
  except (jax.errors.ConcretizationTypeError, TypeError):
    return None


class Attention(nnx.Module):
  """Causal multi-head (optionally grouped-query, optionally sliding-window)
  softmax attention with RoPE. Follows the mixer protocol of lsm.layers.

  The cache is a KV buffer of ``max_len`` positions plus the number of positions
  written so far. Parameters are float32; the output comes back in x.dtype.

  Args:
    d_model: input and output width D.
    n_heads: number of query heads H.
    n_kv_heads: number of key/value heads; must divide n_heads (grouped-query
      attention, Ainslie et al. 2023). Defaults to n_heads.
    head_dim: per-head width K, even (RoPE rotates pairs). Defaults to
      d_model // n_heads, which must then divide exactly.
    rope_base: RoPE frequency base.
    rope_scaling: optional RoPE frequency scaling, a mapping as a Hugging Face
      config's ``rope_scaling`` (lsm.layers.rope: linear, llama3, yarn).
    qkv_bias: biases on the q, k and v projections.
    o_bias: a bias on the output projection.
    qk_norm: RMSNorm (scale over head_dim, epsilon ``norm_eps``) on each head
      of q and k, before RoPE.
    norm_eps: the q/k norms' epsilon.
    window: sliding-window length W, or None for full causal attention. Token t
      attends to positions t-W+1..t.
    impl: accepted so every mixer takes the same constructor arguments (hybrid
      stacks pass one config-wide impl such as "chunked" or "pallas_triton") and
      otherwise ignored: attention always calls
      ``jax.nn.dot_product_attention(..., implementation=None)``, which is XLA
      on CPU and, as of jax 0.10, on GPU too.
    rngs: parameter initialisation.
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options of the usual head structure at width ``d_model``
    (the size presets; GPT-3 ladder): heads of dim 64."""
    return dict(n_heads=max(1, d_model // 64))

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of QK^T and AV beyond the projections
    (``lsm.models.lm.flops_per_token``): 12 H d_h L, with L the keys a query
    sees on average: T / 2 causal, at most the window."""
    seen = seq_len / 2 if not self.window else min(self.window, seq_len / 2)
    return 12.0 * self.n_heads * self.head_dim * seen

  def __init__(self, d_model: int, *, n_heads: int, n_kv_heads: int | None = None,
               head_dim: int | None = None, rope_base: float = 10000.0,
               rope_scaling=None, qkv_bias: bool = False, o_bias: bool = False,
               qk_norm: bool = False, norm_eps: float = 1e-6,
               window: int | None = None, impl: str = "auto", rngs: nnx.Rngs):
    if n_heads < 1:
      raise ValueError(f"Attention: n_heads={n_heads}; expected a positive int")
    if n_kv_heads is None:
      n_kv_heads = n_heads
    if n_kv_heads < 1 or n_heads % n_kv_heads:
      raise ValueError(
          f"Attention: n_kv_heads={n_kv_heads}; expected a positive divisor of "
          f"n_heads={n_heads}")
    if head_dim is None:
      if d_model % n_heads:
        raise ValueError(
            f"Attention: d_model={d_model} is not divisible by n_heads={n_heads}; "
            f"expected n_heads to divide d_model, or an explicit head_dim")
      head_dim = d_model // n_heads
    if head_dim < 2 or head_dim % 2:
      raise ValueError(
          f"Attention: head_dim={head_dim}; expected an even int >= 2 (RoPE "
          f"rotates pairs of channels)")
    if window is not None and window < 1:
      raise ValueError(f"Attention: window={window}; expected None or an int >= 1")
    if rope_base <= 0:
      raise ValueError(f"Attention: rope_base={rope_base}; expected > 0")
    self.n_heads = n_heads
    self.n_kv_heads = n_kv_heads
    self.head_dim = head_dim
    self.rope_base = rope_base
    # Validated here (an unknown type raises at construction, not in a trace).
    rope_frequencies(head_dim, rope_base, rope_scaling)
    # Sorted (key, value) pairs: hashable, as static module attributes must be
    # (the graph definition is a static jit argument).
    self.rope_scaling = None if rope_scaling is None else tuple(
        sorted(dict(rope_scaling).items()))
    self.window = window
    if impl not in KNOWN_IMPLS:
      raise ValueError(f"Attention: impl={impl!r} is not one of {sorted(KNOWN_IMPLS)}")
    self.impl = impl  # recorded only; see the class docstring

    linear = functools.partial(sharded_linear, rngs=rngs)

    self.q_proj = linear(d_model, n_heads * head_dim, axes.EMBED, axes.HEADS,
                         bias=qkv_bias)
    self.k_proj = linear(d_model, n_kv_heads * head_dim, axes.EMBED, axes.HEADS,
                         bias=qkv_bias)
    self.v_proj = linear(d_model, n_kv_heads * head_dim, axes.EMBED, axes.HEADS,
                         bias=qkv_bias)
    self.o_proj = linear(n_heads * head_dim, d_model, axes.HEADS, axes.EMBED,
                         bias=o_bias)
    norm = lambda: (RMSNorm(head_dim, eps=norm_eps, axis_name=axes.STATE_K)  # noqa: E731
                    if qk_norm else None)
    self.q_norm, self.k_norm = nnx.data(norm()), nnx.data(norm())

  def _qk(self, x, positions):
    """Queries [B, T, H, K] and keys [B, T, n_kv_heads, K] at ``positions``:
    projected, q/k-normed when set, rotated."""
    B, T, _ = x.shape
    q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim)
    k = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    scaling = None if self.rope_scaling is None else dict(self.rope_scaling)
    return (apply_rope(q, positions, self.rope_base, scaling),
            apply_rope(k, positions, self.rope_base, scaling))

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
    """An empty KV cache.

    Args:
      batch: B.
      max_len: S, the most positions the cache can hold (prompt plus decoded).
      dtype: storage dtype of the keys and values.

    Returns:
      {"k": [B, S, n_kv_heads, K] dtype zeros, "v": the same,
       "pos": int32 scalar, the number of positions written (0)}.
    """
    if max_len < 1:
      raise ValueError(f"Attention.init_cache: max_len={max_len}; expected >= 1")
    shape = (batch, max_len, self.n_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "pos": jnp.zeros((), jnp.int32)}

  @staticmethod
  def _check_room(cache, T: int):
    """Raises before any compute if writing T positions must overflow the cache."""
    max_len = cache["k"].shape[1]
    if T > max_len:
      raise ValueError(
          f"Attention: writing T={T} positions into a cache of max_len={max_len}; "
          f"expected T <= max_len")
    pos = _concrete_int(cache["pos"])
    if pos is not None and pos + T > max_len:
      raise ValueError(
          f"Attention: cache pos={pos} plus T={T} exceeds max_len={max_len}; "
          f"expected pos + T <= max_len")

  def _check_no_documents(self, segment_ids, positions):
    """Raises when packed-row inputs come with a cache (this class and the
    linearised mixers built on it)."""
    if segment_ids is not None or positions is not None:
      raise ValueError(f"{type(self).__name__}: segment_ids / positions are "
                       "given with a cache; expected them only for a cacheless "
                       "forward pass (decoding continues one sequence)")

  def __call__(self, x, cache=None, *, segment_ids=None, positions=None):
    """Causal attention over x, or over the cache followed by x.

    Without a cache, x holds positions 0..T-1. With one, x holds positions
    pos..pos+T-1 (pos = cache["pos"]): its keys and values are written to the
    buffer at [pos, pos+T) and the queries attend over buffer positions
    0..pos+T-1 (within the window). Writing past the buffer raises a ValueError
    when it is detectable outside jit (T > max_len, or a concrete pos with
    pos + T > max_len). Under jit pos is traced and keeping pos + T <= max_len is
    the caller's responsibility: ``dynamic_update_slice`` clamps the start
    index, so an overflowing write would silently overwrite earlier positions.

    Packed rows (no cache): with ``segment_ids`` a query attends only to keys
    of its own document, and ``positions`` (the pipeline's, restarting at 0 in
    each document) place RoPE, so each document is attended as if alone.

    Args:
      x: [B, T, D] inputs.
      cache: optional dict from ``init_cache`` (or a previous call).
      segment_ids: optional int [B, T] document ids (lsm.data.packing).
      positions: optional int [B, T] RoPE positions; 0..T-1 when None.

    Returns:
      (y [B, T, D] in x.dtype, the updated cache with pos + T, or None when no
      cache was given).
    """
    B, T, _ = x.shape
    if cache is not None:
      self._check_no_documents(segment_ids, positions)
      self._check_room(cache, T)
    v = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)

    if cache is None:
      if positions is None:
        positions = jnp.arange(T, dtype=jnp.int32)
      q, k = self._qk(x, positions)
      # Causal (sliding-window) attention; with a seq mesh axis, keys and values
      # are gathered over it (LASP-2H, lsm.parallel.sequence).
      o = sequence.attention(q, k, v, window=self.window, segment_ids=segment_ids)
      new_cache = None
    else:
      max_len = cache["k"].shape[1]
      pos = cache["pos"]
      positions = pos + jnp.arange(T, dtype=jnp.int32)  # [T]
      q, k = self._qk(x, positions)
      start = (0, pos, 0, 0)
      k_buf = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype),
                                           start)
      v_buf = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype),
                                           start)
      # Explicit [T, S] mask from positions: pos is traced under jit, so is_causal
      # (which assumes queries and keys both start at 0) cannot express it. Keys
      # at >= pos+T (unwritten or stale) fail key <= query for every query.
      q_pos = positions[:, None]  # [T, 1]
      k_pos = jnp.arange(max_len, dtype=jnp.int32)[None, :]  # [1, S]
      mask = k_pos <= q_pos
      if self.window is not None:
        mask &= k_pos > q_pos - self.window
      o = jax.nn.dot_product_attention(q, k_buf.astype(q.dtype),
                                       v_buf.astype(q.dtype),
                                       mask=mask[None, None], implementation=None)
      new_cache = {"k": k_buf, "v": v_buf, "pos": pos + T}

    y = self.o_proj(o.reshape(B, T, self.n_heads * self.head_dim))
    return y.astype(x.dtype), new_cache

  def step(self, x_t, cache):
    """One decoding step.

    Args:
      x_t: [B, D] the input at position cache["pos"].
      cache: dict from ``init_cache`` or a previous call.

    Returns:
      (y_t [B, D] in x_t.dtype, the cache advanced by one position).
    """
    y, cache = self(x_t[:, None], cache)
    return y[:, 0], cache
