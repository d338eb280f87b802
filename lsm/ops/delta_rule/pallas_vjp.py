r"""Padding, layout and the custom VJP shared by the two Pallas delta-rule impls.

The recurrence is defined in ``reference.py``. A backend supplies five kernels
(``Kernels``) on the kernel layout: batch and heads merged, time padded to N
whole chunks, head dims padded to ``kernel_shapes.padded_dim``, per-token
scalars as [C, 1] columns:

    q, k [BH, NC, Kp]; v [BH, NC, Vp]; beta, g [BH, NC, 1] float32;
    h0, h_T [BH, Kp, Vp] float32; per-chunk states [BH, N * Kp, Vp] float32;
    t [BH, NC, C] float32: rows n C .. n C + C - 1 hold chunk n's
    T = (I + L)^{-1} (``chunk_tiles.chunk_inverse``).

  prepare(k, beta, g) -> t                     chunk-parallel; the only kernel
                                               that inverts anything
  states(k, v, beta, g, t, h0) -> (h_in, h_T)  sequential over chunks; h_in[n]
                                               is the state entering chunk n
  output(q, k, v, beta, g, t, h_in) -> o       chunk-parallel, o in q.dtype
  state_grads(q, k, beta, g, t, do, dh_T) -> (dh_out, dh0)
                                               reverse-sequential; dh_out[n] is
                                               the cotangent of the state
                                               leaving chunk n
  input_grads(q, k, v, beta, g, t, do, h_in, dh_out) -> (dq, dk, dv, dbeta, dg)
                                               chunk-parallel, float32; the
                                               gradient through T is the closed
                                               form on the loaded T

Each also takes ``docs``: None, or the chunk-local document index of packed
rows (``segments.kernel_docs``: cols [BH, Tp, 1] float32, rows
[BH, N, 1, C]), from which the kernels cut their terms (``chunk_tiles.gates``).

The forward runs prepare, states, output; the backward prepare, states,
state_grads, input_grads. So each chunk's inverse (about 10 MFLOP of matmuls at
C = 64, as much as all of the output kernel's work on the chunk at K = V = 128)
is computed once per forward and once per backward, however many kernels and
value blocks then use it.

Recompute, not store: the forward keeps only its inputs as residuals and the
backward reruns ``prepare`` and ``states``. For the states this is clear: N
[K, V] float32 states per head would otherwise stay alive between forward and
backward in every layer, often more memory than all the layer's activations.
For T it is closer. Stored, T is C float32 per token and head: 256 bytes at
C = 64, as much as one bf16 [T, 128] input, so a third more residual memory
than q, k, v at K = V = 128 (two thirds more at C = 128). Recomputed, it costs
one chunk-parallel kernel in the backward: at C = 64, K = V = 128 about 11 of
the op's 95 MFLOP of matmuls per chunk for forward + backward (12 per cent), a
small fraction of a whole layer's (the projections dominate), with no
sequential dependence. Memory is the scarcer resource in training, and under
``jax.checkpoint`` of the layer a stored T would be recomputed anyway, so the
backward recomputes it.

Every chunk's gradient is local given its entering state and the cotangent of
its leaving state, so the gate gradient d log_g needs no cross-chunk cumsum.

Zero padding is inert: padded tokens have beta = 0 and log_g = 0 (they leave
the state unchanged), padded key channels are zero in q, k and h0, padded value
channels give outputs and states that are sliced off. Gradients of the padding
are dropped by the slicing's own VJP.
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from lsm.ops.common import kernel_shapes, segments


class Kernels(NamedTuple):
  """A backend's kernels on the kernel layout (see the module docstring); each
  is already bound to scale, chunk size and interpret mode."""
  prepare: Callable
  states: Callable
  output: Callable
  state_grads: Callable
  input_grads: Callable


def bind(prepare, states, output, state_grads, input_grads, *, scale: float,
         chunk: int, interpret) -> Kernels:
  """A backend's five launchers bound to one call's chunk size, interpret mode
  and (where they use it) query scale."""
  kw = dict(chunk=chunk, interpret=interpret)
  return Kernels(
      prepare=functools.partial(prepare, **kw),
      states=functools.partial(states, **kw),
      output=functools.partial(output, scale=scale, **kw),
      state_grads=functools.partial(state_grads, scale=scale, **kw),
      input_grads=functools.partial(input_grads, scale=scale, **kw))


def _core(kernels: Kernels):
  """(q, k, v, beta, g, h0) -> (o, h_T) on the kernel layout, with its VJP."""

  @jax.custom_vjp
  def core(q, k, v, beta, g, h0, docs):
    t = kernels.prepare(k, beta, g, docs=docs)
    h_in, h_t = kernels.states(k, v, beta, g, t, h0, docs=docs)
    return kernels.output(q, k, v, beta, g, t, h_in, docs=docs), h_t

  def fwd(q, k, v, beta, g, h0, docs):
    return core(q, k, v, beta, g, h0, docs), (q, k, v, beta, g, h0, docs)

  def bwd(res, cts):
    q, k, v, beta, g, h0, docs = res
    do, dh_t = cts
    do = do.astype(q.dtype)
    t = kernels.prepare(k, beta, g, docs=docs)  # recomputed, see the module docstring
    h_in, _ = kernels.states(k, v, beta, g, t, h0, docs=docs)
    dh_out, dh0 = kernels.state_grads(q, k, beta, g, t, do,
                                      dh_t.astype(jnp.float32), docs=docs)
    grads = kernels.input_grads(q, k, v, beta, g, t, do, h_in, dh_out,
                                docs=docs)
    return (*(d.astype(x.dtype) for d, x in zip((*grads, dh0), res)),
            jax.tree.map(jnp.zeros_like, docs))

  core.defvjp(fwd, bwd)
  return core


def _to_kernel(x, Tp: int, D: int | None):
  """[B, T, H, D] -> [B * H, Tp, Dp], or [B, T, H] -> [B * H, Tp, 1]."""
  if D is None:
    x = x[..., None]
    D = 1
  B, _, H = x.shape[:3]
  x = kernel_shapes.pad_axis(kernel_shapes.pad_axis(x, 1, Tp), 3, D)
  return jnp.swapaxes(x, 1, 2).reshape(B * H, Tp, D)


def _docs(resets, H: int, Tp: int, chunk: int):
  """``segments.kernel_docs`` for the kernel layout (the same for every
  head): (cols [B * H, Tp, 1], rows [B * H, N, 1, C]), or None."""
  if resets is None:
    return None
  docs = segments.kernel_docs(kernel_shapes.pad_axis(resets, 1, Tp), chunk)
  return tuple(jnp.repeat(x, H, axis=0) for x in docs)


def delta_rule(kernels: Kernels, q, k, v, beta, log_g, *, h0, chunk_size: int,
               resets=None):
  """The delta rule through ``kernels``; arguments as in
  ``chunked.delta_rule`` (scale is bound in the kernels; ``resets`` None or
  ``segments.resets(segment_ids)``: every kernel then also gets the
  chunk-local document index as ``docs``: cols [BH, Tp, 1] like the gates,
  and rows [BH, N, 1, C])."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  Kp, Vp = kernel_shapes.padded_dim(K), kernel_shapes.padded_dim(V)
  Tp = kernel_shapes.num_chunks(T, chunk_size) * chunk_size
  h0p = kernel_shapes.pad_axis(kernel_shapes.pad_axis(h0, 2, Kp), 3, Vp)
  o, h_t = _core(kernels)(
      _to_kernel(q, Tp, Kp), _to_kernel(k, Tp, Kp), _to_kernel(v, Tp, Vp),
      _to_kernel(beta.astype(jnp.float32), Tp, None),
      _to_kernel(log_g.astype(jnp.float32), Tp, None),
      h0p.reshape(B * H, Kp, Vp), _docs(resets, H, Tp, chunk_size))
  o = jnp.swapaxes(o.reshape(B, H, Tp, Vp), 1, 2)[:, :T, :, :V]
  return o, h_t.reshape(B, H, Kp, Vp)[:, :, :K, :V]
