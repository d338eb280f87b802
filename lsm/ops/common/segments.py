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

import functools

import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from lsm.ops import _dispatch
from lsm.ops.common import tiles

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
  return doc_masks(_chunk_docs(reset, chunk))


def _chunk_docs(reset, chunk: int):
  """float32 [B, N, C]: the documents started in t's chunk up to and including
  t (0 until the chunk's first reset)."""
  B, Tp = reset.shape
  r = reset.reshape(B, Tp // chunk, chunk).astype(jnp.float32)
  return jnp.cumsum(r, axis=-1)


def doc_masks(doc):
  """(same [..., C, C], carry [..., C], tail [..., C]) bool from a chunk-local
  document index ``doc`` [..., C] (as ``kernel_docs`` holds it)."""
  same = doc[..., :, None] == doc[..., None, :]
  return same, doc == 0, doc == doc[..., -1:]


def kernel_docs(reset, chunk: int):
  """The chunk-local document index of every token, as the Pallas kernels read
  it: d_t = the number of document starts in t's chunk up to and including t
  (0 until the chunk's first reset), float32 (exact for the small integers).

  Two layouts of the same values, so a kernel never transposes a vector: a
  column per token, ``cols`` [B, Tp, 1] (tiles [C, 1] or [16, 1]), and a row per
  chunk, ``rows`` [B, N, 1, C] (tiles [1, C] or [1, 16]; a whole chunk per
  block, which also meets TPU block-shape rules for any C). ``reset``: bool
  [B, Tp], Tp % chunk == 0, padding flagged False.
  """
  doc = _chunk_docs(reset, chunk)
  return doc.reshape(*reset.shape, 1), doc[:, :, None, :]


class DocTiles:
  """The masks of ``chunk_masks`` inside a kernel, read from the refs of
  ``kernel_docs`` for one chunk: ``col_ref`` with the chunk's [C, 1] column at
  rows ``start`` .. ``start + C`` (a whole-chunk block, or a whole-sequence
  block with a dynamic ``start``), and optionally ``row_ref`` with its [1, C]
  row (the pair masks ``same`` then read it; without it they form the row
  from the column by a masked sum). Tiles are loaded with static
  or ``pl.ds`` slices of the refs, which both Pallas lowerings accept, when a
  mask first needs them.

  Every mask is a bool tile, applied with ``cut`` / ``jnp.where`` (never as a
  -inf gate): same(i, j) [sub, sub]; carry(i), tail(i) [sub, 1] for sub-block
  i; carry_all(), tail_all() [C, 1] for the whole chunk; carry_out() [1, 1].
  """

  def __init__(self, col_ref, row_ref=None, *, chunk: int, sub: int, start=0):
    self._col_ref, self._row_ref = col_ref, row_ref
    self.chunk, self.sub, self.start = chunk, sub, start
    self._tiles = {}

  def _load(self, key, fn):
    if key not in self._tiles:
      self._tiles[key] = fn()
    return self._tiles[key]

  def _col(self, i=None):
    """[sub, 1] column of sub-block i, or the chunk's [C, 1] column."""
    if i is None:
      return self._load("col", lambda: self._col_ref[pl.ds(self.start, self.chunk), :])
    return self._load(("col", i), lambda: self._col_ref[
        pl.ds(self.start + i * self.sub, self.sub), :])

  def _row(self, j=None):
    """[1, sub] row of sub-block j, or the chunk's [1, C] row: from the row
    ref, or without one from the column by a masked sum (no transpose)."""
    if self._row_ref is not None:
      if j is None:
        return self._load("row", lambda: self._row_ref[...])
      return self._load(("row", j), lambda: self._row_ref[
          :, pl.ds(j * self.sub, self.sub)])

    def from_col():
      width = self.chunk if j is None else self.sub
      r = tiles.iota((self.chunk, width), 0)
      c = tiles.iota((self.chunk, width), 1) + (0 if j is None else j * self.sub)
      return jnp.sum(jnp.where(r == c, self._col(), 0.0), axis=0, keepdims=True)
    return self._load(("row", j), from_col)

  @property
  def last(self):
    """[1, 1]: the document index of the chunk's last token."""
    return self._load("last", lambda: self._col_ref[
        pl.ds(self.start + self.chunk - 1, 1), :])

  def same(self, i: int, j: int):
    """[sub, sub]: token t of block i and s of block j share a document."""
    return self._col(i) == self._row(j)

  def carry(self, i: int):
    """[sub, 1]: the state entering the chunk reaches token t of block i."""
    return self._col(i) == 0.0

  def tail(self, j: int):
    """[sub, 1]: token s of block j reaches the state leaving the chunk."""
    return self._col(j) == self.last

  def same_all(self):
    """[C, C]: tokens t and s of the chunk share a document."""
    return self._col() == self._row()

  def chunk_masks(self, pairs: bool = True):
    """(same [C, C], carry [C, 1], tail [C, 1], carry_out [1, 1]), the
    chunk's masks as values (for tile functions under ``jax.vjp``); same is
    None unless ``pairs`` (kernels that use no pair weights skip its
    registers)."""
    return (self.same_all() if pairs else None, self.carry_all(),
            self.tail_all(), self.carry_out())

  def carry_all(self):
    return self._col() == 0.0

  def tail_all(self):
    return self._col() == self.last

  def carry_out(self):
    """[1, 1]: the state entering the chunk leaves it (no reset inside)."""
    return self.last == 0.0


def doc_tiles(refs, n_docs: int, *, chunk: int, sub: int, start=0):
  """(DocTiles or None, the remaining refs) from a kernel's refs that start
  with ``n_docs`` document refs: 0 (no documents), 1 (cols) or 2 (cols, rows),
  in the order ``kernel_docs`` returns them."""
  if not n_docs:
    return None, refs
  row_ref = refs[1] if n_docs == 2 else None
  return (DocTiles(refs[0], row_ref, chunk=chunk, sub=sub, start=start),
          refs[n_docs:])


def with_doc_ref(kernel, n_inputs: int, n_docs: int):
  """A Pallas kernel body that takes its document refs by keyword: the
  launcher appends ``n_docs`` ``kernel_docs`` arrays (0; 1: the column; 2: the
  column and the row) as inputs after the kernel's own ``n_inputs``;
  ``kernel(*refs, doc_ref=column ref or None[, row_ref=row ref])``."""
  if not n_docs:
    return functools.partial(kernel, doc_ref=None)

  def body(*refs):
    docs = dict(doc_ref=refs[n_inputs])
    if n_docs == 2:
      docs["row_ref"] = refs[n_inputs + 1]
    return kernel(*refs[:n_inputs], *refs[n_inputs + n_docs:], **docs)
  return body


def pallas_call(kernel, n_inputs: int, docs, in_specs, doc_specs, args,
                **kwargs):
  """``pl.pallas_call(kernel, in_specs=..., **kwargs)(*args)``, with the
  ``kernel_docs`` arrays ``docs`` (None, or a tuple: the column, optionally
  the row) appended as inputs under ``doc_specs`` (as many) and handed to
  ``kernel`` by keyword (see ``with_doc_ref``)."""
  docs = () if docs is None else tuple(docs)
  return pl.pallas_call(
      with_doc_ref(kernel, n_inputs, len(docs)),
      in_specs=[*in_specs, *doc_specs[:len(docs)]], **kwargs)(*args, *docs)


def cut(mask, x):
  """x where ``mask`` (broadcast), else 0; x unchanged when mask is None (no
  documents)."""
  return x if mask is None else jnp.where(mask, x, 0.0)


def resolve(op: str, impl: str, accepts, call, segment_ids, batch: int,
            length: int):
  """The impl name and its extra keyword arguments for an op call.

  ``_dispatch.resolve`` for ``call`` (whose ``documents`` says whether
  ``segment_ids`` came: "auto" skips impls that do not take them, an explicit
  one raises); with ``segment_ids``, also checks them and passes ``resets=``.

  Raises:
    ValueError: bad ``segment_ids``, or an explicit impl that refuses the call.
  """
  if segment_ids is not None:
    check(op, segment_ids, batch, length)
  name = _dispatch.resolve(op, impl, accepts, call)
  return name, ({} if segment_ids is None else
                {"resets": resets(segment_ids)})
