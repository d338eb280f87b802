r"""Selective scan, fast and portable, pure JAX, without the [B, T, E, N] states.
The recurrence is defined in ``reference.py``; this computes the same function.

The hardware-aware scan of the Mamba paper, in XLA: the sequence is cut into
N = ceil(T / C) chunks of C tokens, and one ``lax.scan`` over the chunks carries
the float32 state h [B, E, N]. A chunk's body forms its decays a_t = exp(dt_t A)
and inputs dt_t x_t B_t, runs the recurrence over its C tokens from the carried
state and reads y_t = C_t . h_t + D x_t out inside the chunk, so no array over
all T tokens has the state's size: the decays, inputs and states of the whole
sequence are never written.

Backward. The chunk body is ``jax.checkpoint``-ed: the only residuals autodiff
keeps are the body's inputs, i.e. the N chunk-boundary states [N, B, E, N] and
the op's own inputs. The backward pass runs the chunks in reverse, recomputes
one chunk's decays and states from its boundary state, and differentiates
through it (O(C E N) per sequence, alive for one chunk at a time). Memory per
sequence: O(T/C * E * N + C * E * N) in forward and backward. No custom VJP is
needed for that bound; the temp-size test in tests/ops/test_selective_scan.py
holds autodiff to it.

Two forms of the chunk body, chosen per platform at lowering time by
``jax.lax.platform_dependent`` (as in ``lsm.ops.ssm_scan.chunked``):

- "sequential" (CPU): a ``lax.scan`` over the chunk's tokens, one token per
  step with the readout inside, so the forward holds one [B, E, N] state and
  nothing of size C E N. On a CPU the scan is memory-bound and this touches each
  value once.
- "associative" (GPU, TPU): ``jax.lax.associative_scan`` over the chunk's C
  tokens (O(log C) depth; a loop of T tiny steps is T kernel launches there),
  with the affine maps h -> a_t h + b_t composed as
  (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2), then one batched readout.

Both use only products and sums: exact for zero and signed decays. Padding to a
multiple of C uses dt = 0 (a = 1, b = 0: the state passes unchanged). All
arithmetic is float32; y comes back in x's dtype, gradients in the input dtypes.
"""

import functools
import math

import jax
import jax.numpy as jnp

from lsm.ops.selective_scan.reference import decay, grouped
from lsm.ops import _dispatch

# Every call (lsm.ops._dispatch).
ACCEPTS = _dispatch.ANYTHING

FORMS = ("sequential", "associative")
_HIGHEST = jax.lax.Precision.HIGHEST


def _combine(x1, x2):
  """Composes the affine maps x1 = (a1, b1), then x2 = (a2, b2)."""
  a1, b1 = x1
  a2, b2 = x2
  return a1 * a2, a2 * b1 + b2


def _chunk_sequential(h, A, D, x, dt, B, C, r, *, eigenvalue_range):
  """One chunk, token by token. h [B, G, P, N]; A [G, P, N]; D [G, P]; x, dt
  [C, B, G, P]; B, C [C, B, G, N]; r [C, B] resets. Returns (h after the chunk,
  y [C, B, G, P]), float32."""

  def step(h, inp):
    x_t, dt_t, B_t, C_t, r_t = inp
    a = jnp.where(r_t[:, None, None, None], 0.0, decay(dt_t, A, eigenvalue_range))
    h = a * h + (dt_t * x_t)[..., None] * B_t[..., None, :]
    y = jnp.einsum("bgpn,bgn->bgp", h, C_t, precision=_HIGHEST) + D * x_t
    return h, y

  return jax.lax.scan(step, h, (x, dt, B, C, r))


def _chunk_associative(h, A, D, x, dt, B, C, r, *, eigenvalue_range):
  """``_chunk_sequential``'s result by an associative scan over the chunk."""
  a = jnp.where(r[..., None, None, None], 0.0, decay(dt, A, eigenvalue_range))
  b = (dt * x)[..., None] * B[..., None, :]  # [C, B, G, P, N]
  b = b.at[0].add(a[0] * h)
  hs = jax.lax.associative_scan(_combine, (a, b), axis=0)[1]
  y = jnp.einsum("cbgpn,cbgn->cbgp", hs, C, precision=_HIGHEST) + D * x
  return hs[-1], y


_CHUNKS = {"sequential": _chunk_sequential, "associative": _chunk_associative}


def _scan_chunks(h0, A, D, xs, *, form, eigenvalue_range):
  """The scan over chunks; xs = (x, dt, B, C, r), each [N, C, B, ...]."""
  body = jax.checkpoint(
      functools.partial(_CHUNKS[form], eigenvalue_range=eigenvalue_range),
      prevent_cse=False)  # inside a scan, CSE across iterations cannot happen
  return jax.lax.scan(lambda h, inp: body(h, A, D, *inp), h0, xs)


def selective_scan(x, dt, A, B, C, *, D, h0, chunk_size=64,
                   eigenvalue_range="positive", resets=None, form=None):
  """Selective scan by chunks. Arguments as in ``lsm.ops.selective_scan.
  selective_scan`` (B, C already [B, T, G, N]; h0 a float32 array), with
  ``resets`` None or ``segments.resets(segment_ids)``. ``form``
  ("sequential" | "associative") forces one chunk body on any platform (for
  tests); None picks by platform as described above.

  A reset is a_t = 0 at a document's first token: exact, and the decay's
  gradient there is 0, as the output does not depend on it.
  """
  if form is not None and form not in FORMS:
    raise ValueError(
        f"selective_scan: form={form!r}; expected one of {FORMS} or None")
  Bsz, T, E = x.shape
  N = A.shape[1]
  xg, dtg, Ag, Bg, Cg, Dg, hg = grouped(x, dt, A, B, C, D, h0)
  r = jnp.zeros((Bsz, T), bool) if resets is None else resets
  L = min(chunk_size, T)
  n = math.ceil(T / L)
  pad = n * L - T

  def to_chunks(v):  # [B, T, ...] -> [N, C, B, ...], padded with zeros
    v = jnp.moveaxis(v, 1, 0)
    v = jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1))
    return v.reshape(n, L, *v.shape[1:])

  xs = tuple(map(to_chunks, (xg, dtg, Bg, Cg, r)))
  run = lambda f: functools.partial(  # noqa: E731
      _scan_chunks, form=f, eigenvalue_range=eigenvalue_range)
  if form is not None:
    h_t, y = run(form)(hg, Ag, Dg, xs)
  else:
    h_t, y = jax.lax.platform_dependent(
        hg, Ag, Dg, xs, cpu=run("sequential"), default=run("associative"))
  y = jnp.moveaxis(y.reshape(n * L, Bsz, E)[:T], 0, 1)
  return y.astype(x.dtype), h_t.reshape(Bsz, E, N)
