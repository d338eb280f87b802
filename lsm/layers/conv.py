"""Short causal depthwise convolution (the k=4 conv of Mamba, DeltaNet, GLA)."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers.sharding import param
from lsm.ops.common import segments
from lsm.parallel import axes


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _conv(xp, w, bias, keep, silu: bool):
  """act(sum_i w_i x_{t-W+1+i} + bias) in float32 from the padded input xp
  [B, W-1+T, C]; ``keep`` None or bool [W, B, T] (tap i read at t). The W
  shifted taps and the activation's terms are recomputed in the backward pass
  from xp, which is kept, instead of being stored: without this the layer
  kept W + 3 float32 [B, T, C] arrays per convolution (Mamba-2 at the 20m
  preset: 224 of its 514 MiB of residuals at T = 8192)."""
  W = w.shape[0]
  T = xp.shape[1] - (W - 1)
  w = w.astype(jnp.float32)
  y = 0.0
  for i in range(W):
    tap = xp[:, i:i + T].astype(jnp.float32)
    if keep is not None:
      tap = jnp.where(keep[i][..., None], tap, 0.0)
    y = y + tap * w[i]
  y = y + bias
  return jax.nn.silu(y) if silu else y


class ShortConv(nnx.Module):
  """y_t = act(sum_{i<W} w_i * x_{t-W+1+i} + bias), per channel, causal.

  The cache is the last W-1 inputs, [B, W-1, C], so decoding costs O(W) per token.

  Args:
    channels: C.
    width: kernel width W.
    activation: applied after the convolution ("silu" or None).
    axis_name: logical axis of the channel dim.
  """

  def __init__(self, channels: int, *, width: int = 4, activation: str | None = "silu",
               axis_name: str = axes.HEADS, rngs: nnx.Rngs):
    if width < 1:
      raise ValueError(f"ShortConv: width={width}; expected a positive int")
    self.width = width
    self.activation = activation
    bound = width ** -0.5
    w = jax.random.uniform(rngs.params(), (width, channels), jnp.float32, -bound, bound)
    self.kernel = param(w, None, axis_name)
    self.bias = param(jnp.zeros((channels,), jnp.float32), axis_name,
                      float32=True)

  def init_cache(self, batch: int, dtype=jnp.float32):
    return jnp.zeros((batch, self.width - 1, self.kernel[...].shape[1]), dtype)

  def __call__(self, x, cache=None, *, segment_ids=None):
    """x: [B, T, C]; cache: optional [B, W-1, C] previous inputs (zeros = start);
    segment_ids: optional int [B, T] document ids of packed rows (a token
    starts a document where its id differs from the previous token's): no tap
    reads across a document start, so each document's first tokens see zeros
    before them, as at the start of a sequence. The cache's inputs belong to
    the first document.
    Returns (y [B, T, C] in x.dtype, new cache or None)."""
    T, W = x.shape[1], self.width
    if cache is None:
      # A pad, not a concatenate with zeros: with T sharded over ``seq`` XLA
      # then moves only the (W-1)-token halos between neighbours instead of
      # resharding the whole input.
      xp = jnp.pad(x, ((0, 0), (W - 1, 0), (0, 0)))  # [B, W-1+T, C]
    else:
      xp = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    keep = None
    if segment_ids is not None:
      # Tap i reads token t - (W-1) + i: kept while no document starts in
      # (t - (W-1) + i, t], i.e. the count of starts up to t is unchanged.
      doc = segments.document_index(segment_ids)
      docp = jnp.pad(doc, ((0, 0), (W - 1, 0)))  # the padding (or cache) is doc 0
      keep = jnp.stack([docp[:, i:i + T] == doc for i in range(W)])  # [W, B, T]
    y = _conv(xp, self.kernel[...], self.bias[...], keep,
              self.activation == "silu").astype(x.dtype)
    new_cache = None if cache is None else xp[:, T:]
    return y, new_cache

  def step(self, x_t, cache):
    """x_t: [B, C]; cache: [B, W-1, C]. Returns (y_t [B, C], cache)."""
    y, cache = self(x_t[:, None], cache)
    return y[:, 0], cache


def apply_each(convs, xs, cache, *, step: bool, segment_ids=None):
  """One ShortConv per input (e.g. the q, k, v convolutions of DeltaNet and
  MoM): whole sequences, or one decoding step each with ``step``.

  Args:
    convs: ShortConv modules, one per input.
    xs: their inputs, [B, T, C_i] (or [B, C_i] with ``step``).
    cache: a list of their caches, or None (sequences only).
    step: decode one token per input.
    segment_ids: optional int [B, T] document ids (sequences only).

  Returns:
    (outputs, the list of new caches; entries None without a cache).
  """
  outs, new_cache = [], []
  for i, (conv, x) in enumerate(zip(convs, xs)):
    c = None if cache is None else cache[i]
    y, c = conv.step(x, c) if step else conv(x, c, segment_ids=segment_ids)
    outs.append(y)
    new_cache.append(c)
  return outs, new_cache
