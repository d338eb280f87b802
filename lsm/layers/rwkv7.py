r"""RWKV-7 "Goose" time mixing (Peng et al. 2025, "RWKV-7 'Goose' with
Expressive Dynamic State Evolution").

Per token, from the previous token's input x' (the token shift: zeros at
t = 0 and at every packed document start; the cache's at a prefill's first
token):

    x_c  = x + (x' - x) o mu_c              c in {r, w, k, v, a, g}
    r = x_r W_r,  k = x_k W_k,  v = x_v W_v
    w = exp(-e^{-1/2} sigmoid(w0 + tanh(x_w A_w) B_w))     decay per key channel
    alpha = sigmoid(a0 + x_a A_a B_a)                      in-context rate
    kk = normalise(k o k_k)                                 per head, unit norm
    k~ = k o (1 + (alpha - 1) o k_a)

and per head, in RWKV's orientation (state [V, K]):

    S_t = S_{t-1} (diag(w_t) - kk_t (alpha_t o kk_t)^T) + v_t k~_t^T
    o_t = S_t r_t                                          (no 1/sqrt(K) scale)

The transition's rank-one part reads the state with kk (S kk) and writes the
result back along alpha o kk. In lsm's orientation (state S^T, [K, V]) that is
dplr's S_t = (diag(exp g) + b a^T) S_{t-1} + u v^T with

    g = log w = -e^{-1/2} sigmoid(...),  a = kk,  b = -(alpha o kk),  u = k~,

and scale 1 (RWKV-7 and flash-linear-attention's chunk_rwkv7 use none). The
output is

    y = W_o [ (GroupNorm_H(o) + ((r o k~ o r_k) summed over the head's K) v)
              o (sigmoid(x_g G_1) G_2) ]

with a GroupNorm of one group per head (eps 1e-5 per channel, times the head
width, as RWKV-7's 64e-5 at heads of 64) and the "bonus" that lets the current
token's value through, weighted by r . (k~ o r_k).

Token shift: RWKV-6 interpolated with data-dependent mixing coefficients
(ddlerp, a LoRA per coefficient); RWKV-7 goes back to a static, learned mu
per channel and coefficient, as in its paper and its reference code (RWKV-LM's
x070, flash-linear-attention's RWKV7Attention), so the lerp costs six
elementwise ops and no matmul. lsm follows RWKV-7: the mu are parameters, not
functions of x.

Simplified relative to RWKV-7: no value residual (RWKV-7 mixes each layer's v
towards the first layer's, v <- lerp(v, v_first, sigmoid(x_v V_1 V_2 + v0)),
which needs a tensor passed across layers; lsm's blocks pass none, so v is
x_v W_v in every layer and there is no v LoRA); K = V = D (no separate value
width); the four projections W_r, W_k, W_v, W_o use lsm's LeCun-normal init
(RWKV-7 uses orthogonal W_r, W_v, 0.1-scaled orthogonal W_k and a zero W_o,
which would leave a freshly built layer the zero map). The rest of the init is
RWKV-7's, as flash-linear-attention writes it, by depth l of n_layers L and
channel n of D with heads of N: mu_c = 1 - (n/D)^(p_c (1 - l/L)) (p = 0.2,
0.9, 0.7, 0.7, 0.9, 0.2 for r, w, k, v, a, g); w0 = -6 + 6 (n/(D-1))^(1 +
(l/(L-1))^0.3) + 0.5 + 2.5 z_n and a0 = -0.19 + 0.3 z_n + 0.4 (n/(D-1) -
1/2), with z_n the signed square of the channel's position in its head in
[-1, 1]; k_k = 0.71 - 0.1 (n/(D-1) - 1/2); k_a = 1.02; r_k = -0.04; the
GroupNorm scale ((l+1)/L)^0.7 and bias 0; LoRA down-projections zero and
up-projections orthogonal scaled by 0.1; LoRA ranks as
flash-linear-attention's defaults (``lora_ranks``). The recurrence, gates,
normalisation, bonus and output gate are the paper's.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsm.layers.delta_net import _l2norm
from lsm.layers.norm import standardize_heads
from lsm.layers.sharding import linear as sharded_linear, param, sharded
from lsm.ops.common import segments
from lsm.ops.dplr import dplr_step
from lsm.parallel import axes, sequence

# The decay's bound: log w = -e^{-1/2} sigmoid(.) lies in (-e^{-1/2}, 0).
_LOG_DECAY_SCALE = math.exp(-0.5)
# Rows of ``mu``: the six token-shift interpolations, in this order.
_MIXES = ("r", "w", "k", "v", "a", "g")
_MIX_POWERS = (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)


def token_shift(x, prev=None, *, segment_ids=None):
  """The previous token's input at every position.

  Args:
    x: [B, T, D] inputs.
    prev: optional [B, D], the input before x[:, 0] (a cache); zeros when None.
    segment_ids: optional int [B, T] document ids of packed rows: a token that
      starts a document sees zeros, as at the start of a sequence (``prev``
      belongs to the row's first document).

  Returns:
    [B, T, D] in x.dtype: x[:, t-1], with ``prev`` (or zeros) at t = 0.
  """
  if prev is None:
    # A pad, not a concatenate: with T sharded over ``seq`` XLA then moves a
    # one-token halo between neighbours (as lsm.layers.conv.ShortConv).
    shifted = jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0)))
  else:
    shifted = jnp.concatenate([prev[:, None].astype(x.dtype), x[:, :-1]], axis=1)
  if segment_ids is not None:
    starts = segments.resets(segment_ids)
    shifted = jnp.where(starts[..., None], jnp.zeros((), x.dtype), shifted)
  return shifted


def lora_ranks(d_model: int, head_dim: int) -> dict:
  """flash-linear-attention's RWKV-7 LoRA ranks at width D with heads of N:
  decay and in-context rate max(32, 32 round(2.5 sqrt(D) N / 64 / 32)), output
  gate max(32, 32 round(5 sqrt(D) / 32))."""
  factor = head_dim / 64
  decay = max(32, int(round(2.5 * d_model ** 0.5 * factor / 32) * 32))
  gate = max(32, int(round(5 * d_model ** 0.5 / 32) * 32))
  return dict(decay_rank=decay, a_rank=decay, gate_rank=gate)


def _channel_inits(d_model: int, head_dim: int, layer_index: int, n_layers: int):
  """RWKV-7's per-channel init (module docstring): (mu [6, D], w0, a0, k_k)."""
  n = np.arange(d_model, dtype=np.float64)
  depth = layer_index / max(n_layers - 1, 1)  # 0 at the first layer, 1 at the last
  remaining = 1.0 - layer_index / n_layers   # 1 at the first layer, towards 0
  frac = n / d_model
  linear = n / max(d_model - 1, 1) - 0.5
  half = max((head_dim - 1) / 2, 0.5)
  zigzag = ((n % head_dim) - (head_dim - 1) / 2) / half
  zigzag = zigzag * np.abs(zigzag)
  mu = np.stack([1.0 - frac ** (p * remaining) for p in _MIX_POWERS])
  w0 = (-6.0 + 6.0 * (n / max(d_model - 1, 1)) ** (1.0 + depth ** 0.3)
        + 0.5 + 2.5 * zigzag)
  a0 = -0.19 + 0.3 * zigzag + 0.4 * linear
  k_k = 0.71 - 0.1 * linear
  f32 = lambda y: jnp.asarray(y, jnp.float32)  # noqa: E731
  return f32(mu), f32(w0), f32(a0), f32(k_k)


class RWKV7(nnx.Module):
  """RWKV-7 time mixing: [B, T, D] -> [B, T, D] (protocol in
  lsm/layers/__init__.py; equations in the module docstring).

  Args:
    d_model: width D (also the key and value widths).
    n_heads: heads H, dividing D (RWKV-7: heads of 64, ``preset``).
    decay_rank, a_rank, gate_rank: LoRA ranks of the decay, the in-context
      rate and the output gate; None for flash-linear-attention's defaults
      (``lora_ranks``).
    layer_index, n_layers: the layer's depth in its stack (the init depends on
      it, as RWKV-7's).
    chunk_size: chunk length for the chunked op.
    impl: op implementation ("auto", "chunked", "reference").
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options of the paper's head structure at width ``d_model``:
    heads of 64 (RWKV-7's head size), K = V = D; one head below D = 64 (and
    the nearest head count below D / 64 that divides D where 64 does not)."""
    n = max(1, d_model // 64)
    while d_model % n:
      n -= 1
    return dict(n_heads=n)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of the recurrence beyond the projections
    (``lsm.models.lm.flops_per_token``): KDA's count for the dplr op, the delta
    rule's 18 H K V (a rank-one read and write plus the output read, forward
    and backward)."""
    del seq_len
    return 18.0 * self.key_dim * self.value_dim / self.n_heads

  def __init__(self, d_model: int, *, n_heads: int, decay_rank: int | None = None,
               a_rank: int | None = None, gate_rank: int | None = None,
               layer_index: int = 0, n_layers: int = 1, chunk_size: int = 64,
               impl: str = "auto", rngs: nnx.Rngs):
    name = type(self).__name__
    if not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
      raise ValueError(f"{name}: n_heads={n_heads!r}; expected a positive "
                       f"divisor of d_model {d_model}")
    if n_layers < 1 or not 0 <= layer_index < n_layers:
      raise ValueError(f"{name}: layer_index={layer_index!r}, n_layers="
                       f"{n_layers!r}; expected 0 <= layer_index < n_layers")
    head_dim = d_model // n_heads
    ranks = lora_ranks(d_model, head_dim)
    for key, value in (("decay_rank", decay_rank), ("a_rank", a_rank),
                       ("gate_rank", gate_rank)):
      if value is not None:
        if not isinstance(value, int) or value < 1:
          raise ValueError(f"{name}: {key}={value!r}; expected None or a "
                           "positive int")
        ranks[key] = value
    self.n_heads, self.key_dim, self.value_dim = n_heads, d_model, d_model
    self.chunk_size, self.impl = chunk_size, impl
    self.eps = 1e-5 * head_dim
    linear = functools.partial(sharded_linear, rngs=rngs)

    def lora_down(rank):  # zeros, RWKV-7's
      return nnx.Linear(d_model, rank, use_bias=False, rngs=rngs,
                        kernel_init=sharded(nnx.initializers.zeros,
                                            axes.EMBED, None))

    def lora_up(rank, width):  # orthogonal, scaled by 0.1, RWKV-7's
      return nnx.Linear(rank, width, use_bias=False, rngs=rngs,
                        kernel_init=sharded(nnx.initializers.orthogonal(0.1),
                                            None, axes.HEADS))

    mu, w0, a0, k_k = _channel_inits(d_model, head_dim, layer_index, n_layers)
    f32 = functools.partial(param, float32=True)
    self.mu = f32(mu, None, axes.EMBED)  # rows: _MIXES
    self.r_proj = linear(d_model, d_model, axes.EMBED, axes.HEADS)
    self.k_proj = linear(d_model, d_model, axes.EMBED, axes.HEADS)
    self.v_proj = linear(d_model, d_model, axes.EMBED, axes.HEADS)
    self.w_down, self.w_up = lora_down(ranks["decay_rank"]), lora_up(
        ranks["decay_rank"], d_model)
    self.w0 = f32(w0, axes.HEADS)
    self.a_down, self.a_up = lora_down(ranks["a_rank"]), lora_up(
        ranks["a_rank"], d_model)
    self.a0 = f32(a0, axes.HEADS)
    self.g_down, self.g_up = lora_down(ranks["gate_rank"]), lora_up(
        ranks["gate_rank"], d_model)
    self.k_k = f32(k_k, axes.HEADS)
    self.k_a = f32(jnp.full((d_model,), 1.02, jnp.float32), axes.HEADS)
    self.r_k = f32(jnp.full((d_model,), -0.04, jnp.float32), axes.HEADS)
    gn = ((layer_index + 1) / n_layers) ** 0.7
    self.gn_scale = f32(jnp.full((d_model,), gn, jnp.float32), axes.HEADS)
    self.gn_bias = f32(jnp.zeros((d_model,), jnp.float32), axes.HEADS)
    self.o_proj = linear(d_model, d_model, axes.HEADS, axes.EMBED)

  def _split(self, y):
    return y.reshape(*y.shape[:-1], self.n_heads, y.shape[-1] // self.n_heads)

  def _inputs(self, x, x_prev):
    """x, x_prev: [B, T, D] (or [B, D]) -> ``dplr``'s (q, a, b, u, v, log_g)
    and the bonus weights (r o k~ o r_k summed per head, float32 [..., H])."""
    f32, dt = jnp.float32, x.dtype
    delta = (x_prev.astype(f32) - x.astype(f32))
    mu = self.mu[...]
    xr, xw, xk, xv, xa, xg = (
        (x.astype(f32) + delta * mu[i]).astype(dt) for i in range(len(_MIXES)))
    r = self.r_proj(xr).astype(f32)
    k = self.k_proj(xk).astype(f32)
    v = self._split(self.v_proj(xv).astype(dt))
    d = self.w0[...] + self.w_up(jnp.tanh(self.w_down(xw))).astype(f32)
    log_g = self._split(-_LOG_DECAY_SCALE * jax.nn.sigmoid(d))
    alpha = jax.nn.sigmoid(self.a0[...] + self.a_up(self.a_down(xa)).astype(f32))
    kk = _l2norm(self._split(k * self.k_k[...]), eps=1e-12)  # float32, unit rows
    k = k * (1.0 + (alpha - 1.0) * self.k_a[...])
    bonus = jnp.sum(self._split(r * k * self.r_k[...]), axis=-1)  # [..., H]
    gate = jax.nn.sigmoid(self.g_down(xg).astype(f32))
    gate = self.g_up(gate.astype(dt)).astype(f32)
    a, b = kk, -self._split(alpha) * kk
    args = (self._split(r), a, b, self._split(k))
    q, a, b, u = (y.astype(dt) for y in args)
    return (q, a, b, u, v, log_g), (bonus, gate)

  def _output(self, o, v, extras, x):
    """GroupNorm per head + the bonus, times the output gate, then W_o."""
    bonus, gate = extras
    o = standardize_heads(o, self.eps) * self.gn_scale[...] + self.gn_bias[...]
    extra = bonus[..., None] * v.astype(jnp.float32)
    o = (o + extra.reshape(o.shape)) * gate
    return self.o_proj(o.astype(x.dtype)).astype(x.dtype)

  def init_cache(self, batch: int, max_len: int | None = None):
    del max_len  # O(1) in the context length
    H = self.n_heads
    return {"h": jnp.zeros((batch, H, self.key_dim // H, self.value_dim // H),
                           jnp.float32),
            "shift": jnp.zeros((batch, self.key_dim), jnp.float32)}

  def __call__(self, x, cache=None, *, segment_ids=None, positions=None):
    """x: [B, T, D] -> (y [B, T, D], cache or None). ``segment_ids``: optional
    int [B, T] document ids of packed rows: the state and the token shift
    restart at every document (``positions`` is accepted for the mixer
    protocol and unused)."""
    del positions
    prev = None if cache is None else cache["shift"]
    x_prev = token_shift(x, prev, segment_ids=segment_ids)
    args, extras = self._inputs(x, x_prev)
    h0 = None if cache is None else cache["h"]
    # sequence.dplr is the op, split over the mesh's seq axis if it has one.
    o, h_t = sequence.dplr(*args, h0=h0, scale=1.0, chunk_size=self.chunk_size,
                           impl=self.impl, segment_ids=segment_ids)
    y = self._output(o, args[4], extras, x)
    if cache is None:
      return y, None
    return y, {"h": h_t, "shift": x[:, -1].astype(jnp.float32)}

  def step(self, x_t, cache):
    """x_t: [B, D] -> (y_t [B, D], cache)."""
    args, extras = self._inputs(x_t, cache["shift"].astype(x_t.dtype))
    o, h = dplr_step(*args, cache["h"], scale=1.0)
    y = self._output(o, args[4], extras, x_t)
    return y, {"h": h, "shift": x_t.astype(jnp.float32)}
