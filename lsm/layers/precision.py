"""The float32-parameter mark: parameters that stay float32 in a low-precision
step and are never weight-decayed.

A layer creates such a parameter as a ``Float32Param`` (``sharding.param(...,
float32=True)``; ``sharding.linear`` marks its bias) where it defines it, so the
policy is written once, beside the math it protects, and no name list has to
follow the layers:

- decay rates and step sizes of recurrences (A / a_log, dt / dt_bias, S4D's
  A, B, C: bf16's 8 mantissa bits would move eigenvalues, and e.g. S4D's
  imaginary parts reach ~100 rad at init, so a rounding of 0.25 rad), skip
  gains D;
- norm scales and biases (cheap vectors, on the residual path).

Everything else with two or more dimensions is a weight matrix: cast to the
compute dtype for the forward and backward pass, and decayed by AdamW. The
trainer reads the mark through ``float32_mask``: the compute-dtype cast
(lsm.train.step) and the weight-decay mask (lsm.train.optim) both use it.
Weight decay would pull a marked parameter towards 0 (for a_log: towards no
forgetting), which the papers avoid (Mamba's A_log / D, S4's A, B and dt).

A ``Float32Param`` is an ``nnx.Param``: ``nnx.Param`` filters, parameter
counts and the checkpointed pure dict see it like any other parameter.
"""

import jax
from flax import nnx


class Float32Param(nnx.Param):
  """An ``nnx.Param`` kept float32 in low-precision steps and never
  weight-decayed (module docstring)."""


def float32_mask(state: nnx.State) -> dict:
  """The mark of every parameter of ``state`` (an ``nnx.State`` of Variables,
  e.g. ``nnx.state(model, nnx.Param)``; abstract ones from ``nnx.eval_shape``
  will do), as a pure dict like ``nnx.to_pure_dict(state)``: True where the
  parameter is a ``Float32Param``."""
  marks = jax.tree.map(lambda v: isinstance(v, Float32Param), state,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(marks)
