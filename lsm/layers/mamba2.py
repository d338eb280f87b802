"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and
Efficient Algorithms Through Structured State Space Duality"), the SSD mixer,
on lsm.ops.gla with one gate per head.

SSD is a selective SSM whose transition is a scalar per head, A_t = a_t I, with
B and C shared by the head's channels. Per head h (head width P, state N):

  [z, x, B, C, dt] = u W_in,   (x, B, C) <- silu(conv1d(x, B, C))   (width 4)
  dt_t = softplus(dt_t + dt_bias_h),   a_t = exp(dt_t A_h),  A_h = -exp(A_log_h)
  H_t = a_t H_{t-1} + B_t^T (dt_t x_t)          H_t in R^{N x P}
  y_t = C_t H_t + D_h x_t
  out = RMSNorm(y (.) silu(z)) W_out

which is exactly ``gla`` with q = C, k = B, v = dt x, log_g = dt A (one gate
per head) and scale 1, so the mixer gets the chunked and Pallas impls,
decoding (``gla_step``), packed documents and LASP-2 sequence parallelism from
the op. B and C go to the op as one key group ([B, T, 1, N] for H heads): the
chunked impl forms C B^T once for all heads and never copies B or C per head
(the other impls get them repeated to H heads inside the op).

Simplified: one group (B and C shared by all heads: the paper's ngroups = 1
default); the norm is RMSNorm per head (the paper's grouped RMSNorm with one
group per head); no dt clamping (dt_min / dt_max only shape the init here,
log-uniform in [1e-3, 1e-1] as in the paper).

Negative eigenvalues: ``eigenvalue_range="signed"`` uses a_t = 2 exp(dt_t A) - 1
in [-1, 1], as Mamba's option of the same name (Grazzi et al. 2025). The gla op
takes log-gates, so the layer runs it on |a_t| with the values and the
outputs multiplied by the running sign parity s_t and the final state by s_T
(lsm/ops/gla/signed.py's identity with the sign moved from q and k, shared by
the heads, to v and o, per head: s_t q_t (sum_s ... (s_s k_s)^T v_s) =
s_t (q_t sum_s ... k_s^T (s_s v_s)); exact, no new kernel; the parity is a
cumulative sum over the whole row, taken before LASP-2 splits it).
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lsm.layers.conv import ShortConv
from lsm.layers.norm import RMSNorm
from lsm.layers.sharding import param, sharded
from lsm.ops.gla import gla_step, signed
from lsm.parallel import axes, sequence

EIGENVALUE_RANGES = ("positive", "signed")


@functools.partial(jax.checkpoint, static_argnums=(5,))
def _skip_gate_norm(o, x, z, D, scale, eps: float):
  """RMSNorm((o + D x) silu(z)) per head in float32 (Mamba-2's order: gate,
  then normalise): o, x, z [..., H, P], D [H], scale [P]. Rematerialised in
  the backward pass from o, x and z, which are kept anyway, instead of
  storing its six float32 [..., E] intermediates per layer."""
  y = o.astype(jnp.float32) + D[:, None] * x.astype(jnp.float32)
  y = y * jax.nn.silu(z.astype(jnp.float32))
  return y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + eps) * scale


class Mamba2(nnx.Module):
  """Mamba-2 (SSD) mixer: [B, T, D] -> [B, T, D] (protocol in
  lsm/layers/__init__.py).

  Args:
    d_model: width D.
    n_heads: heads H; the inner width E = expand * D is split into H heads of
      width P = E / H.
    state_size: N, the state rows per head (shared B, C width).
    expand: E / D.
    conv_width: width of the short convolution on (x, B, C).
    eigenvalue_range: "positive" (a_t = exp(dt_t A) in (0, 1], the paper) or
      "signed" (a_t = 2 exp(dt_t A) - 1 in [-1, 1]).
    chunk_size, impl: as lsm.ops.gla.gla.
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options of the paper's head structure at width ``d_model``
    (the size presets): expand 2, heads of dim P = 64 (2 D / 64 heads), state
    N = 128, B and C shared by all heads (one group)."""
    return dict(n_heads=max(1, 2 * d_model // 64), state_size=128, expand=2)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of the SSD recurrence beyond the projections
    (``lsm.models.lm.flops_per_token``): 12 H N P = 12 N times the inner width."""
    return 12.0 * self.state_size * self.inner

  def __init__(self, d_model: int, *, n_heads: int, state_size: int = 64,
               expand: int = 2, conv_width: int = 4,
               eigenvalue_range: str = "positive", chunk_size: int = 64,
               impl: str = "auto", rngs: nnx.Rngs):
    e = expand * d_model
    if eigenvalue_range not in EIGENVALUE_RANGES:
      raise ValueError(f"Mamba2: eigenvalue_range={eigenvalue_range!r}; expected "
                       f"one of {list(EIGENVALUE_RANGES)}")
    for name, value in (("n_heads", n_heads), ("state_size", state_size),
                        ("expand", expand), ("conv_width", conv_width)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Mamba2: {name}={value!r}; expected a positive int")
    if e % n_heads:
      raise ValueError(f"Mamba2: n_heads={n_heads}; expected a divisor of the "
                       f"inner width expand * d_model = {e}")
    self.n_heads, self.state_size, self.inner = n_heads, state_size, e
    self.chunk_size, self.impl = chunk_size, impl
    self.eigenvalue_range = eigenvalue_range
    init = nnx.initializers.lecun_normal()
    width = 2 * e + 2 * state_size + n_heads  # z, x, B, C, dt
    self.in_proj = nnx.Linear(d_model, width, use_bias=False, rngs=rngs,
                              kernel_init=sharded(init, axes.EMBED, axes.HEADS))
    self.conv = ShortConv(e + 2 * state_size, width=conv_width, rngs=rngs)
    # dt = softplus(. + dt_bias) starts log-uniform in [1e-3, 1e-1]; A_h in
    # [1, 16] as in the paper's init.
    dt = jnp.exp(jax.random.uniform(rngs.params(), (n_heads,), jnp.float32,
                                    math.log(1e-3), math.log(1e-1)))
    self.dt_bias = param(dt + jnp.log(-jnp.expm1(-dt)), axes.HEADS,
                         float32=True)
    a = jax.random.uniform(rngs.params(), (n_heads,), jnp.float32, 1.0, 16.0)
    self.A_log = param(jnp.log(a), axes.HEADS, float32=True)
    self.D = param(jnp.ones((n_heads,), jnp.float32), axes.HEADS, float32=True)
    self.norm = RMSNorm(e // n_heads, axis_name=axes.STATE_V)
    self.out_proj = nnx.Linear(e, d_model, use_bias=False, rngs=rngs,
                               kernel_init=sharded(init, axes.HEADS, axes.EMBED))

  def _split(self, u):
    """in_proj: [..., D] -> z [..., E], xBC [..., E + 2N], dt [..., H]."""
    e, n = self.inner, self.state_size
    zxbcdt = self.in_proj(u)
    return zxbcdt[..., :e], zxbcdt[..., e:2 * e + 2 * n], zxbcdt[..., 2 * e + 2 * n:]

  def _ssd_inputs(self, xbc, dt, dtype):
    """Conv output xBC [..., E + 2N] and raw dt [..., H] -> the gla operands
    q = C, k = B [..., 1, N] (one key group for all heads), v = dt x
    [..., H, P] (``dtype``; float32 for "signed", whose values the caller
    signs) and log_g = log |a| [..., H] float32, x for the D skip, and the
    decays' signs (bool [..., H], a_t < 0; None for "positive")."""
    e, n, h = self.inner, self.state_size, self.n_heads
    x, b, c = xbc[..., :e], xbc[..., e:e + n], xbc[..., e + n:]
    dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...])  # [..., H]
    log_g, negative = -jnp.exp(self.A_log[...]) * dt, None
    if self.eigenvalue_range == "signed":
      log_g, negative = signed.signed_log_decay(log_g)
    q, k = (y[..., None, :].astype(dtype) for y in (c, b))
    x = x.reshape(*x.shape[:-1], h, e // h)
    v = dt[..., None] * x.astype(jnp.float32)
    if negative is None:
      v = v.astype(dtype)
    return q, k, v, log_g, x, negative

  def _output(self, o, v, z, dtype):
    """o, v [..., H, P], z [..., E] -> [..., D]: D skip, gate, norm, out_proj."""
    z = z.reshape(*z.shape[:-1], self.n_heads, -1)
    y = _skip_gate_norm(o, v, z, self.D[...], self.norm.scale[...],
                        self.norm.eps)  # float32, as before into out_proj
    return self.out_proj(y.reshape(*y.shape[:-2], self.inner)).astype(dtype)

  def init_cache(self, batch: int, max_len: int | None = None):
    """{"conv": [B, W-1, E + 2N] float32, "h": [B, H, N, P] float32}, zeros;
    O(1) in ``max_len``."""
    del max_len
    h = self.n_heads
    return {"conv": self.conv.init_cache(batch),
            "h": jnp.zeros((batch, h, self.state_size, self.inner // h),
                           jnp.float32)}

  def __call__(self, u, cache=None, *, segment_ids=None, positions=None):
    """u: [B, T, D] -> (y [B, T, D] in u.dtype, cache or None). ``segment_ids``:
    optional int [B, T] document ids of packed rows: the state and the short
    convolution restart at every document (``positions`` is accepted for the
    mixer protocol and unused)."""
    del positions
    z, xbc, dt = self._split(u)
    conv_cache = None if cache is None else cache["conv"]
    xbc, new_conv = self.conv(xbc, conv_cache, segment_ids=segment_ids)
    q, k, v, log_g, x, negative = self._ssd_inputs(xbc, dt, u.dtype)
    if negative is not None:  # signed decays: the parity identity (docstring)
      sign = signed.parity(negative)[..., None]  # [B, T, H, 1]
      v = (v * sign).astype(u.dtype)
    h0 = None if cache is None else cache["h"]
    o, h_t = sequence.gla(q, k, v, log_g, h0=h0, scale=1.0,
                          chunk_size=self.chunk_size, impl=self.impl,
                          segment_ids=segment_ids)
    if negative is not None:
      o = o * sign                           # o_t = s_t o'_t
      h_t = h_t * sign[:, -1, :, :, None]  # H_T = s_T H'_T
    y = self._output(o, x, z, u.dtype)
    if cache is None:
      return y, None
    return y, {"conv": new_conv.astype(conv_cache.dtype), "h": h_t}

  def step(self, u_t, cache):
    """u_t: [B, D] -> (y_t [B, D], cache)."""
    z, xbc, dt = self._split(u_t)
    xbc, conv_cache = self.conv.step(xbc, cache["conv"])
    q, k, v, log_g, x, negative = self._ssd_inputs(xbc, dt, u_t.dtype)
    if negative is None:
      o, h = gla_step(q, k, v, log_g, cache["h"], scale=1.0)
    else:  # a h + k v = sign (|a| h + k (sign v)); o = q (a h + k v)
      sign = jnp.where(negative, -1.0, 1.0)[..., None]  # [B, H, 1]
      o, h = gla_step(q, k, (v * sign).astype(u_t.dtype), log_g, cache["h"],
                      scale=1.0)
      o, h = o * sign, h * sign[..., None]
    return self._output(o, x, z, u_t.dtype), {
        "conv": conv_cache.astype(cache["conv"].dtype), "h": h}
