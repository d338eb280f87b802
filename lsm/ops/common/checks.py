"""Input checks shared by the ops' public functions.

Every failure is a ValueError that names the op, the argument, what it got and what
was expected, e.g. ``gla: k has shape (2, 7, 4, 16); expected [B, T, H, K] =
(2, 8, 4, 16)``.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def _fmt(expected: Sequence[int | None]) -> str:
  return "(" + ", ".join("?" if e is None else str(e) for e in expected) + ")"


def check_shape(op: str, name: str, x, expected: Sequence[int | None],
                letters: Sequence[str]) -> None:
  """Checks rank and the known dims of ``x``; None in ``expected`` matches any."""
  shape = tuple(np.shape(x))
  ok = len(shape) == len(expected) and all(
      e is None or e == s for e, s in zip(expected, shape))
  if not ok:
    raise ValueError(f"{op}: {name} has shape {shape}; expected "
                     f"[{', '.join(letters)}] = {_fmt(expected)}")


def check_floating(op: str, name: str, x) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{op}: {name} has dtype {dtype}; expected a floating dtype "
                     "(float32, bfloat16 or float16)")


def check_same_dtype(op: str, name: str, x, ref_name: str, ref) -> None:
  if jnp.result_type(x) != jnp.result_type(ref):
    raise ValueError(f"{op}: {name} has dtype {jnp.result_type(x)}; expected "
                     f"{jnp.result_type(ref)}, the dtype of {ref_name}")


def check_state(op: str, name: str, h, expected: Sequence[int | None],
                letters: Sequence[str]) -> None:
  """Recurrent states are float32 by contract; anything else is a caller bug."""
  check_shape(op, name, h, expected, letters)
  if jnp.result_type(h) != jnp.float32:
    raise ValueError(f"{op}: {name} has dtype {jnp.result_type(h)}; expected "
                     "float32 (recurrent states are always float32)")


def check_qkv(op: str, q, k, v, *, step: bool = False,
              grouped: bool = False) -> tuple[int, ...]:
  """Checks queries, keys and values of a matrix-state op.

  Sequences: q, k [B, T, H, K] and v [B, T, H, V]; with ``step``, one token:
  q_t, k_t [B, H, K] and v_t [B, H, V]. One floating dtype for all three. With
  ``grouped``, q and k may have G heads for v's H, G a divisor of H (key
  groups: heads g * H / G ... (g + 1) * H / G - 1 share q and k's head g).

  Returns:
    (B, T, H, K, V), or (B, H, K, V) with ``step``; H is v's head count.
  """
  suffix, lead = ("_t", "BH") if step else ("", "BTH")
  qn, kn, vn = (n + suffix for n in "qkv")
  check_shape(op, qn, q, (None,) * (len(lead) + 1), lead + "K")
  *dims, K = np.shape(q)
  check_floating(op, qn, q)
  check_shape(op, kn, k, (*dims, K), lead + "K")
  check_same_dtype(op, kn, k, qn, q)
  if not grouped:
    check_shape(op, vn, v, (*dims, None), lead + "V")
  else:
    check_shape(op, vn, v, (*dims[:-1], None, None), lead + "V")
    G, H = dims[-1], np.shape(v)[-2]
    if H % G:
      raise ValueError(
          f"{op}: {vn} has {H} heads and {qn}, {kn} have {G}; expected "
          f"{qn}, {kn} with H heads or a divisor of H (key groups)")
    dims = [*dims[:-1], H]
  check_same_dtype(op, vn, v, qn, q)
  return (*dims, K, np.shape(v)[-1])


def check_chunk_size(op: str, chunk_size) -> None:
  """Chunked forms split a chunk into sub-chunks of 16 (see gla/chunked.py), so a
  chunk is either at most 16 long or a multiple of 16."""
  if (not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool)
      or chunk_size < 1 or (chunk_size > 16 and chunk_size % 16)):
    raise ValueError(f"{op}: chunk_size={chunk_size!r}; expected a positive int "
                     "that is at most 16 or a multiple of 16")


def check_scale(op: str, scale) -> None:
  if scale is not None and not isinstance(scale, (int, float, np.floating)):
    raise ValueError(f"{op}: scale={scale!r}; expected None or a Python float")
