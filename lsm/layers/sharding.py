"""Parameter initialisers annotated with logical axis names.

Annotations are metadata only (``eager_sharding=False``): layers are built the
same way on one CPU and on a mesh, and the trainer maps the logical names
(lsm.parallel.axes) to mesh axes with its rules.
"""

from flax import nnx


def sharded(init, *axes):
  """``init`` with the logical axis names ``axes`` (one per parameter dim)."""
  return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def param(value, *axes):
  """An nnx.Param holding ``value`` with logical axis names ``axes``."""
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)
