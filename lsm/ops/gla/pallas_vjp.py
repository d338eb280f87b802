r"""The custom VJP the GLA Pallas backends share: padding, kernel order, and the
gate gradient's sequence-long suffix sum.

A backend (``pallas_triton``, ``pallas_tpu``, ``pallas_mosaic_gpu``) supplies
four launchers on padded [B, T, H, D] arrays (T a multiple of the chunk, K and
V powers of two >= 16; the gates g either [B, T, H, K] per channel or
[B, T, H, 1], one per head as the op received them, reshaped: the kernels tell
the two apart by g's last dim and read one gate per token for the latter (a
[C, 1] column per chunk in Triton and TPU, a [1, C] row of prefix sums in
Mosaic GPU, whose TMA boxes need 16-byte rows), and dg comes back in g's
shape;
states transposed to [B, H, V, K], see ``chunk_tiles``), each also taking
``docs``: None, or the (cols, rows) document index of packed rows from
``segments.kernel_docs``, which every kernel turns into the masks of
``segments.DocTiles``:

  forward(q, k, v, g, h0t)          -> o (q's dtype), h_Tt
  states(k, v, g, h0t)              -> h_in [B, H, N, V, K], the state entering
                                       each chunk
  dstates(q, do, g, dh_Tt)          -> dh_out [B, H, N, V, K], the gradient for
                                       the state leaving each chunk; dh0t
  grads(q, k, v, g, do, h_in, dh_out) -> dq, dk, dv (input dtypes), dg

each also taking ``scale``, ``chunk_size`` and ``interpret`` keywords (the
kernels apply the query scale to outputs and to the incoming ``do`` after
loading, so no low-precision rounding of scaled values happens outside them).

Backward recomputes the chunk states instead of storing them. Storing costs
N * K * V float32 per head per layer (at T=4096, K=V=128, chunk 64: 4 MiB per
head, 2x the layer's bf16 q, k, v, g together) for the whole forward pass of the
model, which is what limits sequence length in training; recomputing costs one
more pass of the state kernel, which reads k, v, g once and does one [C, K] x
[C, V] product per chunk, a small fraction of the backward.

The gate gradient is finished chunk by chunk inside the grads kernel (see
``chunk_tiles.chunk_grads``): no sequence-long pass and no final-state term that
would cancel against the last key's.
"""

import functools
import types

import jax
import jax.numpy as jnp

from lsm.ops.common import kernel_shapes, segments


def make_gla(**launchers):
  """The impl function ``gla(q, k, v, log_g, *, h0, scale, chunk_size, interpret)``
  from a backend's four launchers (keywords forward, states, dstates, grads)."""
  backend = types.SimpleNamespace(**launchers)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
  def core(q, k, v, g, h0t, docs, scale, chunk_size, interpret):
    return backend.forward(q, k, v, g, h0t, docs=docs, scale=scale,
                           chunk_size=chunk_size, interpret=interpret)

  def core_fwd(q, k, v, g, h0t, docs, scale, chunk_size, interpret):
    o, h_tt = core(q, k, v, g, h0t, docs, scale, chunk_size, interpret)
    return (o, h_tt), (q, k, v, g, h0t, docs)

  def core_bwd(scale, chunk_size, interpret, res, cts):
    q, k, v, g, h0t, docs = res
    do, dh_tt = cts
    kw = dict(docs=docs, scale=scale, chunk_size=chunk_size, interpret=interpret)
    h_in = backend.states(k, v, g, h0t, **kw)
    dh_out, dh0t = backend.dstates(q, do, g, dh_tt, **kw)
    dq, dk, dv, dg = backend.grads(q, k, v, g, do, h_in, dh_out, **kw)
    return dq, dk, dv, dg, dh0t, jax.tree.map(jnp.zeros_like, docs)

  core.defvjp(core_fwd, core_bwd)

  def gla(q, k, v, log_g, *, h0, scale: float, chunk_size: int = 64,
          interpret=False, resets=None):
    """Pallas GLA. Arguments as in ``lsm.ops.gla.gla`` (``log_g`` already
    float32, [B, T, H, K] per channel or [B, T, H] one per head, ``h0``
    float32 [B, H, K, V], ``resets`` None or ``segments.resets(segment_ids)``);
    the api has checked chunk_size and the head dims against
    ``kernel_shapes``."""
    T, K, V = q.shape[1], q.shape[-1], v.shape[-1]
    Kp, Vp = kernel_shapes.padded_dim(K), kernel_shapes.padded_dim(V)
    Tp = kernel_shapes.num_chunks(T, chunk_size) * chunk_size

    def pad(x, d):
      return kernel_shapes.pad_axis(kernel_shapes.pad_axis(x, 1, Tp), 3, d)

    h0t = jnp.swapaxes(h0, 2, 3)
    h0t = kernel_shapes.pad_axis(kernel_shapes.pad_axis(h0t, 2, Vp), 3, Kp)
    docs = None
    if resets is not None:  # padded tokens join the last document, unchanged
      docs = segments.kernel_docs(
          kernel_shapes.pad_axis(resets, 1, Tp), chunk_size)
    if log_g.ndim == 3:  # one gate per head: a [B, Tp, H, 1] view, no K axis
      g = kernel_shapes.pad_axis(log_g, 1, Tp)[..., None]
    else:
      g = pad(log_g, Kp)
    o, h_tt = core(pad(q, Kp), pad(k, Kp), pad(v, Vp), g, h0t,
                   docs, scale, chunk_size, interpret)
    return o[:, :T, :, :V], jnp.swapaxes(h_tt, 2, 3)[:, :, :K, :V]

  return gla
