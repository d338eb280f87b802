r"""Padding, layout and the custom VJP shared by the two Pallas delta-rule impls.

The recurrence is defined in ``reference.py``. A backend supplies four kernels
(``Kernels``) on the kernel layout: batch and heads merged, time padded to N
whole chunks, head dims padded to ``kernel_shapes.padded_dim``, per-token
scalars as [C, 1] columns:

    q, k [BH, NC, Kp]; v [BH, NC, Vp]; beta, g [BH, NC, 1] float32;
    h0, h_T [BH, Kp, Vp] float32; per-chunk states [BH, N * Kp, Vp] float32.

  states(k, v, beta, g, h0) -> (h_in, h_T)     sequential over chunks; h_in[n]
                                               is the state entering chunk n
  output(q, k, v, beta, g, h_in) -> o          chunk-parallel, o in q.dtype
  state_grads(q, k, beta, g, do, dh_T) -> (dh_out, dh0)
                                               reverse-sequential; dh_out[n] is
                                               the cotangent of the state
                                               leaving chunk n
  input_grads(q, k, v, beta, g, do, h_in, dh_out) -> (dq, dk, dv, dbeta, dg)
                                               chunk-parallel, float32

Recompute, not store: the forward keeps only its inputs as residuals and the
backward reruns ``states`` (one cheap sequential pass; N [K, V] float32 states
per head would otherwise stay alive between forward and backward in every
layer, often more memory than all the layer's activations). Every chunk's
gradient is local given its entering state and the cotangent of its leaving
state, so the gate gradient d log_g needs no cross-chunk cumsum.

Zero padding is inert: padded tokens have beta = 0 and log_g = 0 (they leave
the state unchanged), padded key channels are zero in q, k and h0, padded value
channels give outputs and states that are sliced off. Gradients of the padding
are dropped by the slicing's own VJP.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from lsm.ops.common import kernel_shapes


class Kernels(NamedTuple):
  """A backend's kernels on the kernel layout (see the module docstring); each
  is already bound to scale, chunk size and interpret mode."""
  states: Callable
  output: Callable
  state_grads: Callable
  input_grads: Callable


def _core(kernels: Kernels):
  """(q, k, v, beta, g, h0) -> (o, h_T) on the kernel layout, with its VJP."""

  @jax.custom_vjp
  def core(q, k, v, beta, g, h0):
    h_in, h_t = kernels.states(k, v, beta, g, h0)
    return kernels.output(q, k, v, beta, g, h_in), h_t

  def fwd(q, k, v, beta, g, h0):
    return core(q, k, v, beta, g, h0), (q, k, v, beta, g, h0)

  def bwd(res, cts):
    q, k, v, beta, g, h0 = res
    do, dh_t = cts
    h_in, _ = kernels.states(k, v, beta, g, h0)
    dh_out, dh0 = kernels.state_grads(q, k, beta, g, do.astype(q.dtype),
                                      dh_t.astype(jnp.float32))
    grads = kernels.input_grads(q, k, v, beta, g, do.astype(q.dtype), h_in,
                                dh_out)
    return tuple(d.astype(x.dtype) for d, x in zip((*grads, dh0), res))

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


def delta_rule(kernels: Kernels, q, k, v, beta, log_g, *, h0, chunk_size: int):
  """The delta rule through ``kernels``; arguments as in
  ``chunked.delta_rule`` (scale is bound in the kernels)."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  Kp, Vp = kernel_shapes.padded_dim(K), kernel_shapes.padded_dim(V)
  Tp = kernel_shapes.num_chunks(T, chunk_size) * chunk_size
  h0p = kernel_shapes.pad_axis(kernel_shapes.pad_axis(h0, 2, Kp), 3, Vp)
  o, h_t = _core(kernels)(
      _to_kernel(q, Tp, Kp), _to_kernel(k, Tp, Kp), _to_kernel(v, Tp, Vp),
      _to_kernel(beta.astype(jnp.float32), Tp, None),
      _to_kernel(log_g.astype(jnp.float32), Tp, None),
      h0p.reshape(B * H, Kp, Vp))
  o = jnp.swapaxes(o.reshape(B, H, Tp, Vp), 1, 2)[:, :T, :, :V]
  return o, h_t.reshape(B, H, Kp, Vp)[:, :, :K, :V]
