r"""Continuous-time diagonal state-space layers: LSSL (Gu et al. 2021) and S4D
(Gu et al. 2022).

Each of the H = d_model channels is its own single-input single-output SSM

    x'(s) = A x(s) + B u(s),    y(s) = C x(s) + D u(s)

with a diagonal complex A of M = N / 2 modes (N = ``state_size``, the real
state dimension: the modes stand for conjugate pairs, so the real output is
twice the real part of the sum over the kept half). With step size dt (one
learnable log step per channel) the discretised recurrence is

    h_t = dA * h_{t-1} + dB * u_t,    y_t = 2 Re(sum_m C_m h_{t,m}) + D u_t,

    ZOH:      dA = exp(dt A),                   dB = (dA - 1) / A * B
    bilinear: dA = (1 + dt A/2) / (1 - dt A/2), dB = dt / (1 - dt A/2) * B

and two computation modes give the same function of the input:

* "conv" (training): with a zero initial state the layer is a causal
  convolution with the kernel K_l = 2 Re(sum_m C_m dB_m dA_m^l), l < T,
  computed by a Vandermonde product in blocks of steps (never the whole
  [T, H, M] matrix; see ``kernel``) and applied with an FFT of length 2T.
* "recurrent": the recurrence above through ``lsm.ops.ssm_scan`` (prefill from a
  cache, and whenever mode="recurrent") and ``ssm_scan_step`` (decoding).

Complex recurrences through a real op. ``ssm_scan`` is real-valued by contract
(it rejects complex a and b, and the state must be float32), and a complex decay
is a 2x2 rotation-and-scaling in real arithmetic, which no elementwise real
scan can express. But A is time-invariant, so with dA = r e^{i theta} the
rotating frame g_t = e^{-i theta (t+1)} h_t (t counted from the start of the
call) turns it into a real decay:

    g_t = r * g_{t-1} + e^{-i theta (t+1)} dB u_t,    g_{-1} = h_{-1},
    h_t = e^{i theta (t+1)} g_t,

so the real and imaginary parts of g are 2M independent real recurrences with
decay r = |dA| in [0, 1], which ``ssm_scan`` runs as they are. The state in the
cache is h itself, [Re h, Im h] along the last axis.

The phases e^{i theta t} (here and in the conv kernel's Vandermonde product)
come from ``_rotation``, which reduces theta * t modulo 2 pi without the
float32 rounding of the product: a plain exp(1j * theta * t) is off by about
|theta| t 6e-8 rad, 2e-3 rad at t = 1e4, which the rotating frame does not damp
(the error enters at absolute time t, not at the lag t - s).

Layer output: as in the S4/S4D blocks, the SSM output goes through a GELU and a
position-wise linear map back to d_model, which mixes the otherwise independent
channels.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsm.layers.sharding import param
from lsm.ops.ssm_scan import ssm_scan, ssm_scan_step
from lsm.parallel import axes, sequence

DISCRETIZATIONS = ("bilinear", "zoh")
MODES = ("conv", "recurrent")
S4D_INITS = ("inv", "lin")


def _check_choice(layer: str, name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{layer}: {name}={value!r} is not one of {sorted(choices)}")


def check_impl(layer: str, impl: str) -> None:
  """Fails at construction, not at the first call, on an impl ``ssm_scan`` does
  not know; the op's own check lists the valid choices. eval_shape only traces:
  nothing is computed."""
  z = jax.ShapeDtypeStruct((1, 1, 1), jnp.float32)
  try:
    jax.eval_shape(lambda a: ssm_scan(a, a, impl=impl), z)
  except ValueError as e:
    raise ValueError(f"{layer}: {e}") from None


def _check_dt_range(layer: str, dt_min: float, dt_max: float) -> None:
  if not 0 < dt_min <= dt_max:
    raise ValueError(f"{layer}: dt_min={dt_min!r}, dt_max={dt_max!r}; expected "
                     "0 < dt_min <= dt_max")


# 2 pi = _C1 + _C2 + _C3 with _C1, _C2 of 12 significant bits, so k * _C1 and
# k * _C2 are exact float32 products for integers |k| < 2^12 (Cody-Waite).
def _top_bits(x: float, bits: int) -> float:
  e = int(np.floor(np.log2(abs(x))))
  return float(np.ldexp(np.round(np.ldexp(x, bits - 1 - e)), e - bits + 1))


_C1 = _top_bits(2 * np.pi, 12)
_C2 = _top_bits(2 * np.pi - _C1, 12)
_C3 = float(np.float32(2 * np.pi - _C1 - _C2))
_LO_BITS = 12  # t = 2^12 q + t_lo; theta = theta_hi + theta_lo, 12 bits each


def _reduce(p):
  """p - 2 pi round(p / 2 pi) for exact float32 p with |p| < 2^14, to ~1e-7."""
  k = jnp.round(p / (2 * np.pi))
  return ((p - k * _C1) - k * _C2) - k * _C3


def _rotation(theta, steps):
  """e^{i theta t} for every t in ``steps``, with theta * t reduced mod 2 pi.

  Splitting theta = theta_hi + theta_lo (theta_hi: the top 12 significant bits)
  and t = 2^12 q + t_lo makes theta_hi * t_lo and theta_hi * 2^12 exact float32
  products, which ``_reduce`` brings into [-pi, pi]; what is left, (reduced
  theta_hi 2^12) * q and theta_lo * t, is 2^12 times smaller than theta * t, and
  so is its rounding error. Measured worst case over theta in [-pi, pi]: 5e-7
  rad for t < 2^12, 2e-6 at t = 1e4, 2e-5 at t = 1e5 (a plain exp(1j * theta *
  t): 5e-4, 1e-3, 1.5e-2). The exactness needs IEEE float32 arithmetic without
  reassociation, XLA's default on every backend (a fused multiply-add only
  makes it more exact). The gradient is that of theta * t (straight through),
  which the split does not change.

  Args:
    theta: [...] float32 angles in [-pi, pi].
    steps: [L] int32 non-negative times, < 2^24.

  Returns:
    [L, ...] complex64.
  """
  sg = jax.lax.stop_gradient
  th = sg(theta)
  bits = jax.lax.bitcast_convert_type(th, jnp.uint32)
  th_hi = jax.lax.bitcast_convert_type(bits & np.uint32(0xFFFFF000), jnp.float32)
  th_lo = th - th_hi  # exact
  expand = (slice(None),) + (None,) * theta.ndim
  t = steps[expand]
  t_lo = (t & (2 ** _LO_BITS - 1)).astype(jnp.float32)
  q = (t >> _LO_BITS).astype(jnp.float32)
  angle = (_reduce(th_hi * t_lo) + _reduce(th_hi * 2.0 ** _LO_BITS) * q
           + th_lo * t.astype(jnp.float32))
  naive = theta * t.astype(jnp.float32)
  # value: angle (naive - sg(naive) is exactly 0); gradient: d(theta t)/d theta.
  return jnp.exp(1j * (angle + (naive - sg(naive))))


def _split(h, m: int):
  """[..., 2M] real storage -> complex [..., M]."""
  return jax.lax.complex(h[..., :m], h[..., m:])


def _join(z):
  """complex [..., M] -> [..., 2M] float32 real storage [Re z, Im z]."""
  return jnp.concatenate([jnp.real(z), jnp.imag(z)], axis=-1).astype(jnp.float32)


# Steps of the convolution kernel formed at once (see _DiagonalSSM.kernel):
# [KERNEL_BLOCK, H, M] complex64 is 25 MB at H = 384, M = 32.
KERNEL_BLOCK = 256


def _kernel_block(log_r, theta, cdb, steps):
  """2 Re(sum_m cdb_m dA_m^l) for l in ``steps`` [L] int32: [H, L] float32,
  with dA^l = |dA|^l e^{i l theta} (log_r, theta, cdb: [H, M])."""
  vand = (jnp.exp(steps.astype(jnp.float32)[:, None, None] * log_r)
          * _rotation(theta, steps))  # [L, H, M]
  return 2 * jnp.real(jnp.einsum("hm,lhm->hl", cdb, vand))


class _DiagonalSSM(nnx.Module):
  """Shared body of LSSL and S4D; subclasses supply ``_init_ab`` and a name.

  Args:
    d_model: width D; also the number H of independent channel SSMs.
    n_heads: accepted and ignored (uniform mixer constructor): every channel is
      its own SSM.
    state_size: real state size N per channel, even (M = N / 2 complex modes).
    discretization: "zoh" or "bilinear".
    mode: training path, "conv" (FFT convolution) or "recurrent" (ssm_scan).
    dt_min, dt_max: range of the log-uniform initial step size.
    impl: the ``ssm_scan`` impl of the recurrent paths.
  """

  NAME = "_DiagonalSSM"

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options at width ``d_model`` (the size presets): the
    defaults; one SISO SSM per channel, no heads."""
    del d_model
    return {}

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token beyond the output map
    (``lsm.models.lm.flops_per_token``): 12 D N, the real-equivalent state
    (an estimate for both modes; the FFT convolution costs about as much)."""
    return 12.0 * self.d_model * self.state_size

  def __init__(self, d_model: int, *, n_heads: int | None = None,
               state_size: int = 64, discretization: str = "zoh",
               mode: str = "conv", dt_min: float = 1e-3, dt_max: float = 1e-1,
               impl: str = "auto", rngs: nnx.Rngs):
    del n_heads  # one SSM per channel; accepted for a uniform constructor
    name = self.NAME
    if not isinstance(state_size, int) or state_size < 2 or state_size % 2:
      raise ValueError(f"{name}: state_size={state_size!r}; expected a positive "
                       "even int (N/2 complex modes stand for conjugate pairs)")
    _check_choice(name, "discretization", discretization, DISCRETIZATIONS)
    _check_choice(name, "mode", mode, MODES)
    _check_dt_range(name, dt_min, dt_max)
    check_impl(name, impl)
    self.d_model = d_model
    self.state_size = state_size
    self.discretization = discretization
    self.mode = mode
    self.impl = impl

    h, m = d_model, state_size // 2
    a, b = self._init_ab(state_size)  # complex128 [M] each, from numpy
    f32 = jnp.float32
    log_dt = jax.random.uniform(rngs.params(), (h,), f32, math.log(dt_min),
                                math.log(dt_max))
    # Re A < 0 is kept by construction (Re A = -exp(log_a_real)), so every mode
    # stays stable under training, as in S4D.
    # The SSM's own parameters (dt, A, B, C, D) are Float32Params: the system
    # is discretised in float32 / complex64 (lax.complex takes no bf16), A's
    # imaginary parts reach ~100 at init (S4D-Lin, N = 64; more for S4D-Inv),
    # where bf16 rounds by up to 0.25 rad, and S4 exempts A, B and dt from
    # weight decay. out_proj is an ordinary matrix.
    self.log_dt = param(log_dt, axes.HEADS, float32=True)
    self.log_a_real = param(jnp.broadcast_to(jnp.asarray(np.log(-a.real), f32),
                                             (h, m)), axes.HEADS, axes.STATE_K,
                            float32=True)
    self.a_imag = param(jnp.broadcast_to(jnp.asarray(a.imag, f32), (h, m)),
                        axes.HEADS, axes.STATE_K, float32=True)
    self.b_real = param(jnp.broadcast_to(jnp.asarray(b.real, f32), (h, m)),
                        axes.HEADS, axes.STATE_K, float32=True)
    self.b_imag = param(jnp.broadcast_to(jnp.asarray(b.imag, f32), (h, m)),
                        axes.HEADS, axes.STATE_K, float32=True)
    # C ~ complex normal of unit variance (S4D's init); D ~ normal, as in S4D.
    kc, kd, ko = jax.random.split(rngs.params(), 3)
    c = jax.random.normal(kc, (2, h, m), f32) * math.sqrt(0.5)
    self.c_real = param(c[0], axes.HEADS, axes.STATE_K, float32=True)
    self.c_imag = param(c[1], axes.HEADS, axes.STATE_K, float32=True)
    self.d = param(jax.random.normal(kd, (h,), f32), axes.HEADS, float32=True)
    self.out_proj = param(jax.random.normal(ko, (h, d_model), f32) * h ** -0.5,
                          axes.HEADS, axes.EMBED)

  def _init_ab(self, state_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B): complex128 [N/2] initial diagonal and input vector."""
    raise NotImplementedError

  def _discretize(self):
    """The discretised diagonal system, float32 / complex64.

    Returns:
      log_r: [H, M] log |dA| (<= 0).
      theta: [H, M] arg dA, wrapped into [-pi, pi].
      cdb: [H, M] complex C * dB (what the conv kernel needs).
      db: [H, M] complex dB.
      c: [H, M] complex C.
    """
    dt = jnp.exp(self.log_dt[...])[:, None]
    a = jax.lax.complex(-jnp.exp(self.log_a_real[...]), self.a_imag[...])
    b = jax.lax.complex(self.b_real[...], self.b_imag[...])
    c = jax.lax.complex(self.c_real[...], self.c_imag[...])
    dta = dt * a
    if self.discretization == "zoh":
      log_r = jnp.real(dta)
      # wrap: same dA, smaller |theta| * t below, so less float32 phase error.
      theta = jnp.remainder(jnp.imag(dta) + jnp.pi, 2 * jnp.pi) - jnp.pi
      db = jnp.expm1(dta) / a * b
    else:
      den = 1 - dta / 2
      da = (1 + dta / 2) / den
      log_r = jnp.log(jnp.abs(da))
      theta = jnp.angle(da)
      db = dt / den * b
    return log_r, theta, c * db, db, c

  # -- protocol ----------------------------------------------------------------

  def init_cache(self, batch: int, max_len: int | None = None):
    """{"h": [B, H, N] float32 zeros}: [Re h, Im h] of the M complex modes.

    ``max_len`` is ignored: the cache is O(1) in the context length."""
    del max_len
    return {"h": jnp.zeros((batch, self.d_model, self.state_size), jnp.float32)}

  def __call__(self, x, cache=None, *, segment_ids=None, positions=None):
    """Parallel over T: FFT convolution (mode="conv", no cache, no sequence
    parallelism, no documents) or ssm_scan from ``cache["h"]`` (a zero state
    when there is no cache).

    Args:
      x: [B, T, D] input, any float dtype.
      cache: optional {"h": [B, H, N] float32} state before x.
      segment_ids: optional int [B, T] document ids of packed rows: the state
        restarts at every document. A convolution cannot restart, so with
        segment ids the recurrent form runs, in either mode (exact; the same
        function as the convolution on one document).
      positions: accepted for the mixer protocol; unused.

    Returns:
      y: [B, T, D] in x.dtype; the updated cache when one was given, else None.
    """
    # Under sequence parallelism (mesh seq > 1) the recurrent form runs instead
    # of the FFT: the same function, but its communication is one state summary
    # per device, where an FFT over a sharded T would gather the whole sequence.
    del positions
    if (cache is None and self.mode == "conv" and sequence.seq_size() == 1
        and segment_ids is None):
      s = self._conv(x.astype(jnp.float32))
      return self._output(s, x), None
    h0 = None if cache is None else cache["h"]
    s, h_t = self._scan(x.astype(jnp.float32), h0, segment_ids)
    return self._output(s, x), (None if cache is None else {"h": h_t})

  def step(self, x_t, cache):
    """One token through ``ssm_scan_step``.

    Args:
      x_t: [B, D] input, any float dtype.
      cache: {"h": [B, H, N] float32}.

    Returns:
      y_t: [B, D] in x_t.dtype; {"h": [B, H, N] float32} after the token.
    """
    m = self.state_size // 2
    log_r, theta, _, db, c = self._discretize()
    rot = jnp.exp(1j * theta)  # [H, M]
    # One step in the rotating frame: g = r h + e^{-i theta} dB u, h' = e^{i theta} g.
    u = jnp.conj(rot) * db * x_t.astype(jnp.float32)[..., None]  # [B, H, M]
    b_t = _join(u)
    a_t = jnp.broadcast_to(jnp.tile(jnp.exp(log_r), 2), b_t.shape)
    _, g = ssm_scan_step(a_t, b_t, cache["h"])
    h = rot * _split(g, m)
    s = 2 * jnp.sum(jnp.real(c * h), axis=-1)  # [B, H]
    y = self._output(s[:, None], x_t[:, None])[:, 0]
    return y, {"h": _join(h)}

  # -- the two computation modes ----------------------------------------------

  def kernel(self, length: int):
    """The convolution kernel K_l = 2 Re(sum_m C_m dB_m dA_m^l): [H, L] float32.

    The Vandermonde matrix dA_m^l is [L, H, M] complex: 0.8 GB per layer at
    L = 8192, H = 384, M = 32, and autodiff would keep it and its cotangent.
    So it is formed in blocks of KERNEL_BLOCK steps under ``lax.map``, each
    block contracted with C dB at once and rematerialised in the backward pass
    (``jax.checkpoint``): one block's [KERNEL_BLOCK, H, M] lives at a time, and
    the residuals are the [H, L] kernel's inputs only. The steps of a block are
    absolute times, so ``_rotation``'s exact phases are unchanged.
    """
    log_r, theta, cdb, _, _ = self._discretize()
    block = min(KERNEL_BLOCK, length)
    n = -(-length // block)
    steps = jnp.arange(n * block, dtype=jnp.int32).reshape(n, block)
    body = jax.checkpoint(_kernel_block, prevent_cse=False)
    k = jax.lax.map(lambda l: body(log_r, theta, cdb, l), steps)  # [n, H, block]
    return jnp.moveaxis(k, 0, 1).reshape(k.shape[1], n * block)[:, :length]

  def _conv(self, x):
    """SSM output from a zero state by FFT convolution: [B, T, H] float32 ->
    [B, T, H] float32 (without the D skip)."""
    t = x.shape[1]
    k = self.kernel(t)  # [H, T]
    # Length 2T makes the circular convolution a linear (hence causal) one.
    # One forward transform for the kernel and the input together, so every
    # FFT of a train step depends on the previous one: on XLA:CPU (jax 0.11.2)
    # an FFT runs on an intra-op pool worker and waits for the same pool, and
    # as many concurrent FFTs as workers deadlock the step (seen on 2 cores:
    # rfft(K) beside rfft(x), or one layer's kernel FFT beside another's).
    z_f = jnp.fft.rfft(jnp.concatenate([k.T[None], x], axis=0), n=2 * t,
                       axis=1)  # [1 + B, T+1, H]
    return jnp.fft.irfft(z_f[1:] * z_f[:1], n=2 * t, axis=1)[:, :t]

  def _scan(self, x, h0, segment_ids=None):
    """SSM output through ssm_scan in the rotating frame (module docstring).

    Args:
      x: [B, T, H] float32.
      h0: optional [B, H, N] float32 state.
      segment_ids: optional int [B, T] document ids. A reset zeroes the
        rotating-frame state g, hence h = phase * g: exact in this frame.

    Returns:
      [B, T, H] float32 output (without the D skip); [B, H, N] float32 state.
    """
    m = self.state_size // 2
    t = x.shape[1]
    log_r, theta, _, db, c = self._discretize()
    phase = _rotation(theta, jnp.arange(1, t + 1, dtype=jnp.int32))  # [T, H, M]
    u = jnp.conj(phase) * db * x[..., None]  # [B, T, H, M]
    b = _join(u)  # [B, T, H, N]
    a = jnp.broadcast_to(jnp.tile(jnp.exp(log_r), 2), b.shape)
    g, g_t = sequence.ssm_scan(a, b, h0=h0, impl=self.impl,  # split over seq
                               segment_ids=segment_ids)
    h = phase * _split(g, m)  # [B, T, H, M]
    s = 2 * jnp.sum(jnp.real(c * h), axis=-1)
    return s, _join(phase[-1] * _split(g_t, m))

  def _output(self, s, x):
    """D skip, GELU, position-wise linear: s [B, T, H] float32, x [B, T, D] ->
    [B, T, D] in x.dtype."""
    y = jax.nn.gelu(s + self.d[...] * x.astype(jnp.float32))
    return (y @ self.out_proj[...]).astype(x.dtype)


class LSSL(_DiagonalSSM):
  """Linear state-space layer (Gu et al. 2021) with the HiPPO-LegS matrices.

  LegS is A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k),
  B_n = sqrt(2n+1). It is diagonalisable (eigenvalues -1 .. -N), but its
  eigenvector matrix is hopeless in finite precision: its condition number is
  about 8e10 at N = 16 and 8e20 at N = 64, and V^{-1} B reaches 1e47 at N = 64,
  beyond float32's range. So, as S4 and S4D recommend, this takes LegS's
  normal-plus-low-rank form A = A_normal - P P^T (P_n = sqrt(n + 1/2)) and
  diagonalises the normal part A_normal = -I/2 + S (S skew-symmetric) with a
  unitary eigenbasis V, computed once at init in float64 (S4D-LegS):
  A = -1/2 + i omega (the N/2 modes with omega > 0, one per conjugate pair) and
  B = V^* B_LegS. Dropping the low-rank term changes the kernel, but the S4D
  paper shows this diagonal system reproduces the LegS kernel as N grows.
  Bilinear discretisation is the default, as in the LSSL paper. A, B, C, dt and
  D are trained.

  Args: as ``_DiagonalSSM``; state_size defaults to 64.
  """

  NAME = "LSSL"

  def __init__(self, d_model: int, *, n_heads: int | None = None,
               state_size: int = 64, discretization: str = "bilinear",
               mode: str = "conv", dt_min: float = 1e-3, dt_max: float = 1e-1,
               impl: str = "auto", rngs: nnx.Rngs):
    super().__init__(d_model, n_heads=n_heads, state_size=state_size,
                     discretization=discretization, mode=mode, dt_min=dt_min,
                     dt_max=dt_max, impl=impl, rngs=rngs)

  def _init_ab(self, state_size):
    n = np.arange(state_size, dtype=np.float64)
    q = np.sqrt(2 * n + 1)
    a = -np.tril(np.outer(q, q), -1) - np.diag(n + 1)
    p = np.sqrt(n + 0.5)
    skew = a + np.outer(p, p) + 0.5 * np.eye(state_size)
    omega, v = np.linalg.eigh(-1j * skew)  # skew = V diag(i omega) V^*
    keep = np.argsort(omega)[state_size // 2:]  # omega > 0: one per pair
    a_diag = -0.5 + 1j * omega[keep]
    b = v[:, keep].conj().T @ q
    return a_diag, b


class S4D(_DiagonalSSM):
  """Diagonal S4 (Gu et al. 2022): A_n = -1/2 + i * imag_n, B = 1, complex C.

  ``init`` picks imag_n for the N/2 modes n = 0 .. N/2 - 1: "lin" (S4D-Lin,
  pi n) or "inv" (S4D-Inv, N/pi (N/(2n+1) - 1)). ZOH discretisation is the
  default, as in the paper. A, B, C, dt and D are trained.

  Args: as ``_DiagonalSSM``, plus init: "lin" | "inv".
  """

  NAME = "S4D"

  def __init__(self, d_model: int, *, n_heads: int | None = None,
               state_size: int = 64, discretization: str = "zoh",
               mode: str = "conv", init: str = "lin", dt_min: float = 1e-3,
               dt_max: float = 1e-1, impl: str = "auto", rngs: nnx.Rngs):
    _check_choice(self.NAME, "init", init, S4D_INITS)
    self.a_init = init
    super().__init__(d_model, n_heads=n_heads, state_size=state_size,
                     discretization=discretization, mode=mode, dt_min=dt_min,
                     dt_max=dt_max, impl=impl, rngs=rngs)

  def _init_ab(self, state_size):
    n = np.arange(state_size // 2, dtype=np.float64)
    if self.a_init == "lin":
      imag = np.pi * n
    else:
      imag = state_size / np.pi * (state_size / (2 * n + 1) - 1)
    return -0.5 + 1j * imag, np.ones_like(n, dtype=np.complex128)
