"""Packed documents (``segment_ids``): checks and the masks every impl uses.

Convention (as lsm/data/packing.py emits): ``segment_ids`` is int [B, T], and a
token starts a new document where its id differs from the previous token's (0
marks padding, which is then a document of its own). The state entering a
document's first token is zero; token 0 of a row never resets, so ``h0`` enters
the row's first document only.

The impls never see -inf log gates: a reset is a mask. ``resets`` gives the
per-token flags; ``chunk_masks`` the three masks of a chunked form, from which
every term of a chunk is cut:

- same[t, s]: t and s are in one document (intra-chunk terms s <= t);
- carry[t]: the state entering the chunk reaches t (no reset in the chunk up to
  and including t);
- tail[s]: s is in the chunk's last document, so it reaches the state leaving
  the chunk. The incoming state itself leaves the chunk iff carry[C - 1].
"""

import jax.numpy as jnp
import numpy as np

from lsm.ops import _dispatch

# Impls that take ``resets``; the Pallas kernels do not have the masks yet.
IMPLS_WITH_RESETS = ("reference", "chunked")


def check(op: str, segment_ids, batch: int, length: int) -> None:
  """Raises ValueError unless ``segment_ids`` is an int [batch, length] array."""
  shape = tuple(np.shape(segment_ids))
  if shape != (batch, length):
    raise ValueError(f"{op}: segment_ids has shape {shape}; expected [B, T] = "
                     f"{(batch, length)}")
  dtype = jnp.result_type(segment_ids)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{op}: segment_ids has dtype {dtype}; expected an integer "
                     "dtype (document ids as lsm.data.packing emits them)")


def resets(segment_ids):
  """bool [B, T]: True where a token starts a document after token 0."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def document_index(segment_ids):
  """int32 [B, T]: the number of document starts up to each token; equal for
  two tokens iff they are in one document."""
  return jnp.cumsum(resets(segment_ids).astype(jnp.int32), axis=1)


def zero_at_resets(a, reset):
  """Decays a [B, T, ...] with a_t = 0 where ``reset`` (bool [B, T]): for an
  elementwise scan h_t = a_t h_{t-1} + b_t that is exactly the reset, and a's
  gradient there is 0, as nothing depends on it."""
  return jnp.where(reset.reshape(*reset.shape, *(1,) * (a.ndim - 2)),
                   jnp.zeros((), a.dtype), a)


def chunk_masks(reset, chunk: int):
  """The masks of a chunked form, for flags ``reset`` bool [B, Tp] (Tp % chunk
  == 0, padding flagged False).

  Returns:
    same: bool [B, N, C, C]; carry: bool [B, N, C]; tail: bool [B, N, C]
    (see the module docstring). Padded tokens join the row's last document,
    which they leave unchanged (zero keys and values, zero log gates).
  """
  B, Tp = reset.shape
  r = reset.reshape(B, Tp // chunk, chunk).astype(jnp.int32)
  doc = jnp.cumsum(r, axis=-1)  # documents started in the chunk up to t
  same = doc[..., :, None] == doc[..., None, :]
  carry = doc == 0
  tail = doc == doc[..., -1:]
  return same, carry, tail


def resolve(op: str, impl: str, impls, segment_ids, batch: int, length: int):
  """The impl name and its extra keyword arguments for an op call.

  Without ``segment_ids``: ``_dispatch.resolve_impl`` and no extras. With them:
  checks them, resolves ``impl`` among IMPLS_WITH_RESETS ("auto" picks
  "chunked" on every platform) and passes ``resets=``.

  Raises:
    ValueError: bad ``segment_ids``, or an explicit impl without resets.
  """
  if segment_ids is None:
    return _dispatch.resolve_impl(impl, supported=impls, op=op), {}
  check(op, segment_ids, batch, length)
  if impl == _dispatch.AUTO:
    impls = [n for n in impls if n in IMPLS_WITH_RESETS]
  name = _dispatch.resolve_impl(impl, supported=impls, op=op)
  if name not in IMPLS_WITH_RESETS:
    raise ValueError(f"{op}: impl={impl!r} does not take segment_ids yet; "
                     f"expected one of {[_dispatch.AUTO, *IMPLS_WITH_RESETS]} "
                     "with segment_ids")
  return name, {"resets": resets(segment_ids)}
