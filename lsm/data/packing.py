"""Concat-then-split packing of token documents into fixed-length LM rows.

The documents (1-D int arrays, each already starting with its document-start
token, see lsm.data.tokenizers) are concatenated into one stream, which is cut
into consecutive, non-overlapping rows of ``T + 1`` tokens. A row gives::

  inputs      = row[:-1]                      int32 [T]
  targets     = row[1:]                       int32 [T]
  mask        = target is a real token of     bool  [T]
                the input's own document
  segment_ids = 1-based document of inputs    int32 [T]  (0 on padding)
  positions   = position of inputs in its doc int32 [T]  (0 on padding)

Each document is its own segment, start token included, so a model that
restarts at segment starts predicts a document's first token from its start
token alone, as at inference. The target that crosses from one document into
the next (the next document's start token, predicted from the previous
document) is masked, as is padding: every document that fits in a row gets the
same targets, and the same losses, packed after others or alone.

A document cut by a row boundary continues in the next row as segment 1, its
positions carrying on from where they stopped. When the stream ends (a finite
split) the last partial row is padded with ``pad_id`` and masked. Joining every
row's ``T + 1`` tokens, padding removed, gives the document stream back exactly.

grain's ``ConcatThenSplitIterDataset`` is close, but restarts positions at 0 for
the continued part of a split document and packs rows of ``T``, not ``T + 1``, so
this is a small iterator of its own with the same checkpoint idea: the state is
the parent's state before the current document plus an offset into it.
"""

from typing import Any

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
  """Packs an IterDataset of 1-D int token arrays into dicts of ``[T]`` rows."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int = 0):
    """Wraps ``parent``.

    Args:
      parent: yields 1-D integer arrays (one document each, its start token
        and any EOS included).
      seq_len: T, the length of inputs/targets; rows hold T + 1 tokens.
      pad_id: token written into the padding of the final partial row.
    """
    super().__init__(parent)
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
      raise ValueError(f"PackIterDataset: seq_len={seq_len!r}; expected an int >= 1")
    self._seq_len = seq_len
    self._pad_id = int(pad_id)

  def __iter__(self) -> grain.DatasetIterator:
    return _PackIterator(self._parent.__iter__(), seq_len=self._seq_len,
                         pad_id=self._pad_id)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len}, pad_id={self._pad_id})"


class _PackIterator(grain.DatasetIterator):
  """See PackIterDataset. State: {parent, offset, has_doc} (JSON-friendly)."""

  def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id
    self._doc: np.ndarray | None = None  # the document being cut, if any
    self._offset = 0                     # its tokens already emitted
    self._doc_parent_state: dict[str, Any] | None = None  # parent before the doc
    self._arange = np.arange(seq_len + 1, dtype=np.int32)

  def _next_doc(self) -> bool:
    """Loads the next non-empty document; False when the parent is exhausted."""
    while True:
      state = self._parent.get_state()
      try:
        doc = next(self._parent)
      except StopIteration:
        return False
      doc = np.asarray(doc)
      if doc.ndim != 1 or not np.issubdtype(doc.dtype, np.integer):
        raise ValueError(f"PackIterDataset: a document has shape {doc.shape} and "
                         f"dtype {doc.dtype}; expected a 1-D integer token array")
      if doc.size:
        self._doc, self._offset, self._doc_parent_state = doc, 0, state
        return True

  def __next__(self) -> dict[str, np.ndarray]:
    n = self._seq_len + 1
    tokens = np.full(n, self._pad_id, dtype=np.int32)
    segment_ids = np.zeros(n, dtype=np.int32)
    positions = np.zeros(n, dtype=np.int32)
    filled = 0
    segment = 0
    while filled < n:
      if self._doc is None and not self._next_doc():
        break
      take = min(len(self._doc) - self._offset, n - filled)
      segment += 1
      end = filled + take
      tokens[filled:end] = self._doc[self._offset:self._offset + take]
      segment_ids[filled:end] = segment
      positions[filled:end] = self._arange[:take] + self._offset
      filled = end
      self._offset += take
      if self._offset == len(self._doc):
        self._doc, self._offset, self._doc_parent_state = None, 0, None
    if filled == 0:
      raise StopIteration
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        # targets[j] = row[j + 1] counts iff it is a real token (padding is
        # segment 0) of the same document as inputs[j].
        "mask": (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[1:] > 0),
        "segment_ids": segment_ids[:-1],
        "positions": positions[:-1],
    }

  def get_state(self) -> dict[str, Any]:
    if self._doc is None:
      return {"parent": self._parent.get_state(), "offset": 0, "has_doc": False}
    return {"parent": self._doc_parent_state, "offset": int(self._offset),
            "has_doc": True}

  def set_state(self, state: dict[str, Any]) -> None:
    self._doc, self._offset, self._doc_parent_state = None, 0, None
    self._parent.set_state(state["parent"])
    if state["has_doc"]:
      if not self._next_doc():
        raise ValueError(f"PackIterDataset: state {state} points into a document "
                         "the parent no longer yields; expected the same pipeline "
                         "that saved it")
      self._offset = int(state["offset"])

  def __str__(self) -> str:
    return f"PackIterator(seq_len={self._seq_len})"
