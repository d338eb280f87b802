r"""Mamba-style selective SSM block (Gu & Dao 2023), with optional negative
eigenvalues (Grazzi et al. 2024).

With E = expand * d_model inner channels and N = state_size, per token t:

    x_t, z_t = in_proj(u_t)                           [E], [E]
    x_t      = silu(causal depthwise conv_W(x)_t)     (ShortConv)
    dt_t     = softplus(x_t W_dt + dt_bias)           [E], W_dt of rank ceil(D/16)
    B_t, C_t = x_t W_B, x_t W_C                       [N], [N]
    a_t      = exp(dt_t A)            eigenvalue_range="positive", in [0, 1]
             = 2 exp(dt_t A) - 1      eigenvalue_range="signed",   in [-1, 1]
    h_t      = a_t * h_{t-1} + (dt_t x_t) B_t^T       [E, N], A = -exp(A_log) [E, N]
    y_t      = out_proj((h_t C_t + D * x_t) * silu(z_t))

b_t = dt_t B_t x_t is Mamba's simplified ZOH (Euler for B). The signed range maps
Mamba's decay from [0, 1] onto [-1, 1] as Grazzi et al. do, which lets one layer
flip the sign of its state (parity, modular counting). The recurrence and the
readout h_t C_t + D x_t run through ``lsm.ops.selective_scan`` (through
``lsm.parallel.sequence``, so a mesh's seq axis splits T), which never writes
the [B, T, E, N] decays or states (the chunked impl keeps one state per chunk
boundary and recomputes a chunk's states in the backward pass), and
``selective_scan_step`` when decoding.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsm.layers.conv import ShortConv
from lsm.layers.sharding import param
from lsm.ops.selective_scan import selective_scan, selective_scan_step
from lsm.parallel import axes, sequence

EIGENVALUE_RANGES = ("positive", "signed")


def _check_impl(layer: str, impl: str) -> None:
  """Fails at construction on an impl ``selective_scan`` does not know (the
  op's message lists the choices). eval_shape only traces."""
  z = jax.ShapeDtypeStruct((1, 1, 1), jnp.float32)
  a = jax.ShapeDtypeStruct((1, 1), jnp.float32)
  try:
    jax.eval_shape(lambda x, a: selective_scan(x, x, a, x, x, impl=impl), z, a)
  except ValueError as e:
    raise ValueError(f"{layer}: {e}") from None


class Mamba(nnx.Module):
  """Selective SSM mixer: [B, T, D] -> [B, T, D] (module docstring has the math).

  Args:
    d_model: width D.
    n_heads: accepted and ignored (uniform mixer constructor): every inner
      channel has its own state.
    state_size: N, state entries per inner channel.
    expand: E = expand * d_model inner channels.
    conv_width: width W of the short causal convolution.
    eigenvalue_range: "positive" (a_t in [0, 1], Mamba) or "signed" (a_t in
      [-1, 1]).
    dt_min, dt_max: range of the log-uniform initial step size.
    impl: the ``selective_scan`` impl.
    chunk_size: tokens per chunk of the chunked selective scan (memory: one
      [B, E, N] state per chunk boundary, one chunk's states at a time).
  """

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options at width ``d_model`` (the size presets): the
    defaults (expand 2, state 16); Mamba has no heads."""
    del d_model
    return {}

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of the selective scan beyond the projections
    (``lsm.models.lm.flops_per_token``): 12 E N."""
    return 12.0 * self.d_inner * self.state_size

  def __init__(self, d_model: int, *, n_heads: int | None = None,
               state_size: int = 16, expand: int = 2, conv_width: int = 4,
               eigenvalue_range: str = "positive", dt_min: float = 1e-3,
               dt_max: float = 1e-1, impl: str = "auto", chunk_size: int = 64,
               rngs: nnx.Rngs):
    del n_heads  # one state per inner channel; accepted for a uniform constructor
    name = "Mamba"
    if eigenvalue_range not in EIGENVALUE_RANGES:
      raise ValueError(f"{name}: eigenvalue_range={eigenvalue_range!r} is not one "
                       f"of {sorted(EIGENVALUE_RANGES)}")
    for arg, value in (("state_size", state_size), ("expand", expand),
                       ("conv_width", conv_width), ("chunk_size", chunk_size)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {arg}={value!r}; expected a positive int")
    if not 0 < dt_min <= dt_max:
      raise ValueError(f"{name}: dt_min={dt_min!r}, dt_max={dt_max!r}; expected "
                       "0 < dt_min <= dt_max")
    _check_impl(name, impl)
    self.d_model = d_model
    self.d_inner = e = expand * d_model
    self.state_size = n = state_size
    self.eigenvalue_range = eigenvalue_range
    self.impl = impl
    self.chunk_size = chunk_size
    rank = math.ceil(d_model / 16)

    f32 = jnp.float32
    k_in, k_bc, k_down, k_up, k_dt, k_out = jax.random.split(rngs.params(), 6)
    # x and z get their own axis rather than sharing one 2E axis: sharding a
    # concatenated 2E axis would put x on some devices and z on others.
    self.in_proj = param(jax.random.normal(k_in, (d_model, 2, e), f32)
                         * d_model ** -0.5, axes.EMBED, None, axes.HEADS)
    self.conv = ShortConv(e, width=conv_width, activation="silu",
                          axis_name=axes.HEADS, rngs=rngs)
    self.bc_proj = param(jax.random.normal(k_bc, (e, 2, n), f32) * e ** -0.5,
                         axes.HEADS, None, axes.STATE_K)
    # Low-rank W_dt = dt_down @ dt_up, as in Mamba (dt_rank = ceil(D / 16)).
    self.dt_down = param(jax.random.normal(k_down, (e, rank), f32) * e ** -0.5,
                         axes.HEADS, None)
    self.dt_up = param(jax.random.uniform(k_up, (rank, e), f32, -rank ** -0.5,
                                          rank ** -0.5), None, axes.HEADS)
    # softplus(dt_bias) is log-uniform in [dt_min, dt_max] (Mamba's init):
    # dt_bias = softplus^{-1}(dt) = dt + log(1 - exp(-dt)).
    dt = jnp.exp(jax.random.uniform(k_dt, (e,), f32, math.log(dt_min),
                                    math.log(dt_max)))
    self.dt_bias = param(dt + jnp.log(-jnp.expm1(-dt)), axes.HEADS,
                         float32=True)
    # S4D-real: A_n = -(n + 1), the same for every channel.
    a_log = np.log(np.arange(1, n + 1, dtype=np.float64))
    self.a_log = param(jnp.broadcast_to(jnp.asarray(a_log, f32), (e, n)),
                       axes.HEADS, axes.STATE_K, float32=True)
    self.d = param(jnp.ones((e,), f32), axes.HEADS, float32=True)
    self.out_proj = param(jax.random.normal(k_out, (e, d_model), f32) * e ** -0.5,
                          axes.HEADS, axes.EMBED)

  # -- pieces ------------------------------------------------------------------

  def _gate_and_input(self, u, conv_cache, segment_ids=None):
    """in_proj and the short conv.

    Args:
      u: [B, T, D], any float dtype.
      conv_cache: optional [B, W-1, E] conv window.
      segment_ids: optional int [B, T] document ids (the conv restarts).

    Returns:
      x: [B, T, E] conv output; z: [B, T, E] gate (both u.dtype); the conv cache
      (None when none was given).
    """
    xz = jnp.einsum("btd,dke->btke", u, self.in_proj[...].astype(u.dtype))
    x, new_cache = self.conv(xz[:, :, 0], conv_cache, segment_ids=segment_ids)
    if conv_cache is not None:
      # ShortConv hands the window back in x's dtype; keep the cache's own, so
      # a lax.scan over step has a carry of fixed dtype (bf16 x, f32 cache).
      new_cache = new_cache.astype(conv_cache.dtype)
    return x, xz[:, :, 1], new_cache

  def _ssm_inputs(self, x):
    """The selective scan's inputs from the conv output x: [B, ..., E].

    Returns:
      x32: x in float32; dt: [B, ..., E] float32 step sizes; A: [E, N] float32
      (-exp(A_log)); b, c: [B, ..., N] float32 input and readout vectors B_t,
      C_t. The decays exp(dt A) are formed inside the op.
    """
    x32 = x.astype(jnp.float32)
    dt = jax.nn.softplus(x32 @ self.dt_down[...] @ self.dt_up[...]
                         + self.dt_bias[...])
    bc = jnp.einsum("...e,ekn->...kn", x32, self.bc_proj[...])
    return x32, dt, -jnp.exp(self.a_log[...]), bc[..., 0, :], bc[..., 1, :]

  def _output(self, y, x, z):
    """y: [B, T, E] float32 scan output (skip included); z: [B, T, E] gate.
    Returns [B, T, D] in x.dtype."""
    y = y * jax.nn.silu(z.astype(jnp.float32))
    return (y @ self.out_proj[...]).astype(x.dtype)

  def decays(self, u):
    """The decays a_t the layer would apply to u (no cache): [B, T, D] ->
    [B, T, E, N] float32, in [0, 1] ("positive") or [-1, 1] ("signed"). For
    analysis: the forward pass never forms this array."""
    x, _, _ = self._gate_and_input(u, None)
    _, dt, a, _, _ = self._ssm_inputs(x)
    a = jnp.exp(dt[..., None] * a)  # in (0, 1]
    return 2 * a - 1 if self.eigenvalue_range == "signed" else a

  # -- protocol ----------------------------------------------------------------

  def init_cache(self, batch: int, max_len: int | None = None):
    """{"conv": [B, W-1, E] float32, "h": [B, E, N] float32}, zeros.

    ``max_len`` is ignored: the cache is O(1) in the context length."""
    del max_len
    return {"conv": self.conv.init_cache(batch),
            "h": jnp.zeros((batch, self.d_inner, self.state_size), jnp.float32)}

  def __call__(self, u, cache=None, *, segment_ids=None, positions=None):
    """Parallel over T through selective_scan, from ``cache`` when given.

    Args:
      u: [B, T, D] input, any float dtype.
      cache: optional {"conv": [B, W-1, E], "h": [B, E, N] float32}.
      segment_ids: optional int [B, T] document ids of packed rows: the state
        and the short convolution restart at every document.
      positions: accepted for the mixer protocol; unused.

    Returns:
      y: [B, T, D] in u.dtype; the updated cache when one was given, else None.
    """
    del positions
    x, z, conv_cache = self._gate_and_input(
        u, None if cache is None else cache["conv"], segment_ids)
    x32, dt, a, b, c = self._ssm_inputs(x)
    # x in float32: the scan's output comes back in its dtype, and the gate and
    # out_proj below run in float32 (as before this layer used selective_scan).
    # sequence.selective_scan is the op, split over the mesh's seq axis if it
    # has one.
    y, h_t = sequence.selective_scan(
        x32, dt, a, b, c, D=self.d[...],
        h0=None if cache is None else cache["h"], chunk_size=self.chunk_size,
        impl=self.impl, eigenvalue_range=self.eigenvalue_range,
        segment_ids=segment_ids)
    y = self._output(y, x, z)
    return y, (None if cache is None else {"conv": conv_cache, "h": h_t})

  def step(self, u_t, cache):
    """One token through ShortConv.step and selective_scan_step.

    Args:
      u_t: [B, D] input, any float dtype.
      cache: {"conv": [B, W-1, E], "h": [B, E, N] float32}.

    Returns:
      y_t: [B, D] in u_t.dtype; the updated cache.
    """
    xz = jnp.einsum("bd,dke->bke", u_t, self.in_proj[...].astype(u_t.dtype))
    x, conv_cache = self.conv.step(xz[:, 0], cache["conv"])
    conv_cache = conv_cache.astype(cache["conv"].dtype)  # as in _gate_and_input
    z = xz[:, 1]
    x32, dt, a, b, c = self._ssm_inputs(x)
    y, h = selective_scan_step(x32, dt, a, b, c, cache["h"], D=self.d[...],
                               eigenvalue_range=self.eigenvalue_range)
    y = self._output(y[:, None], x[:, None], z[:, None])[:, 0]
    return y, {"conv": conv_cache, "h": h}
