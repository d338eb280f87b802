"""Parameter initialisers annotated with logical axis names.

Annotations are metadata only (``eager_sharding=False``): layers are built the
same way on one CPU and on a mesh, and the trainer maps the logical names
(lsm.parallel.axes) to mesh axes with its rules.
"""

from flax import nnx

from lsm.layers.precision import Float32Param


def sharded(init, *axes):
  """``init`` with the logical axis names ``axes`` (one per parameter dim)."""
  return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def param(value, *axes, float32: bool = False):
  """An nnx.Param holding ``value`` with logical axis names ``axes``; with
  ``float32``, a ``Float32Param``: kept float32 in low-precision steps and never
  weight-decayed (lsm.layers.precision)."""
  kind = Float32Param if float32 else nnx.Param
  return kind(value, out_sharding=tuple(axes), eager_sharding=False)


def linear(d_in: int, d_out: int, ax_in, ax_out, *, rngs: nnx.Rngs,
           bias: bool = False) -> nnx.Linear:
  """The mixers' projection: an ``nnx.Linear`` [d_in, d_out] with a LeCun-normal
  kernel on logical axes (``ax_in``, ``ax_out``) and, with ``bias``, a zero
  bias on ``ax_out``, marked ``Float32Param`` (lsm.layers.precision)."""
  layer = nnx.Linear(d_in, d_out, use_bias=bias, rngs=rngs,
                     kernel_init=sharded(nnx.initializers.lecun_normal(),
                                         ax_in, ax_out),
                     bias_init=sharded(nnx.initializers.zeros, ax_out))
  if bias:
    # nnx.Linear makes its bias an nnx.Param; swap in the marked type (same
    # value and metadata; built by nnx.Linear so the rng stream is unchanged).
    layer.bias = Float32Param(layer.bias[...], **layer.bias.get_metadata())
  return layer
