"""Shape legend and array aliases shared by every lsm module.

Shape letters used in docstrings and comments:

  B  batch            T  time (sequence length)     H  heads
  K  key / state dim  V  value dim                  D  model width
  C  chunk length     N  number of chunks           c  sub-chunk length

Matrix-valued recurrent states are always ``[B, H, K, V]`` float32. Inputs come as
``[B, T, H, D]``.
"""

from typing import Any, TypeAlias

import jax
import numpy as np

Array: TypeAlias = jax.Array
DType: TypeAlias = Any  # a numpy / jnp dtype or something np.dtype() accepts
ArrayLike: TypeAlias = jax.Array | np.ndarray
