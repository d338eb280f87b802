"""Concat-then-split packing: no token lost or duplicated, segment ids and
positions line up with the document-start tokens, final padding and the targets
that cross into the next document are masked, state restores exactly."""

import json

import grain
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lsm.data.packing import PackIterDataset

BOS, EOS, PAD = 1, 2, 0
KEYS = ("inputs", "targets", "mask", "segment_ids", "positions")


def _docs(lengths, seed=0):
  """Documents of random tokens in [3, 500) starting with BOS (n >= 2: EOS last)."""
  rng = np.random.default_rng(seed)
  return [np.concatenate([[BOS], rng.integers(3, 500, size=max(n - 2, 0)),
                          [EOS] * (n > 1)]).astype(np.int32) for n in lengths]


def _pack(docs, seq_len):
  ds = grain.MapDataset.source(docs).to_iter_dataset()
  return PackIterDataset(ds, seq_len=seq_len, pad_id=PAD)


def test_worked_example():
  # Documents of 3, 7 and 2 tokens (values say doc and position), T = 4: rows of
  # 5. 12 -> 20 and 26 -> 30 cross into the next document: masked. 26 -> 30
  # crosses between rows too: 26 ends row 1 (a target only), 30 starts row 2.
  docs = [np.array([10, 11, 12]), np.array([20, 21, 22, 23, 24, 25, 26]),
          np.array([30, 31])]
  rows = list(_pack(docs, 4))
  assert len(rows) == 3
  want = [  # inputs, targets, mask, segment_ids, positions
      ([10, 11, 12, 20], [11, 12, 20, 21], [1, 1, 0, 1], [1, 1, 1, 2], [0, 1, 2, 0]),
      ([22, 23, 24, 25], [23, 24, 25, 26], [1, 1, 1, 1], [1, 1, 1, 1], [2, 3, 4, 5]),
      ([30, 31, 0, 0], [31, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0]),
  ]
  for row, expected in zip(rows, want):
    for key, value in zip(KEYS, expected):
      np.testing.assert_array_equal(row[key], value, err_msg=key)


def _check_rows(rows, docs, seq_len):
  stream = np.concatenate(docs)
  doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
  pos_of = np.concatenate([np.arange(len(d)) for d in docs])
  n = seq_len + 1
  assert len(rows) == -(-len(stream) // n)
  got = []
  for r, row in enumerate(rows):
    for key in KEYS:
      assert row[key].shape == (seq_len,), key
    assert row["mask"].dtype == bool
    assert all(row[k].dtype == np.int32 for k in KEYS if k != "mask")
    np.testing.assert_array_equal(row["inputs"][1:], row["targets"][:-1])
    tokens = np.append(row["inputs"], row["targets"][-1])
    start = r * n
    filled = min(n, len(stream) - start)
    if r < len(rows) - 1:
      assert filled == n, "only the last row may be padded"
    # A target counts iff it is a real token of the input's own document.
    at = np.arange(start, start + filled)
    same_doc = doc_of[at[1:]] == doc_of[at[:-1]]
    want_mask = np.zeros(seq_len, bool)
    want_mask[:filled - 1] = same_doc
    np.testing.assert_array_equal(row["mask"], want_mask)
    assert np.all(tokens[filled:] == PAD)
    assert np.all(row["segment_ids"][filled:] == 0)
    assert np.all(row["positions"][filled:] == 0)
    got.append(tokens[:filled])
    span = slice(r * n, r * n + min(filled, seq_len))
    k = span.stop - span.start
    np.testing.assert_array_equal(row["positions"][:k], pos_of[span])
    np.testing.assert_array_equal(row["segment_ids"][:k],
                                  doc_of[span] - doc_of[span.start] + 1)
    # Each segment change inside a row is a document's start token, at
    # position 0, and the target crossing into it is masked.
    seg = row["segment_ids"][:k]
    change = np.flatnonzero(seg[1:] != seg[:-1])
    assert np.all(row["inputs"][change + 1] == BOS)
    assert np.all(row["positions"][change + 1] == 0)
    assert not row["mask"][change].any()
  np.testing.assert_array_equal(np.concatenate(got), stream)


@settings(deadline=None, max_examples=60)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12),
       seq_len=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_no_token_lost_or_duplicated(lengths, seq_len, seed):
  docs = _docs(lengths, seed)
  _check_rows(list(_pack(docs, seq_len)), docs, seq_len)


@pytest.mark.parametrize("seq_len", [1, 7, 32])
def test_long_and_short_documents(seq_len):
  docs = _docs([1, 2, 3 * seq_len + 5, seq_len + 1, seq_len, 1, 2 * seq_len + 2], seed=1)
  _check_rows(list(_pack(docs, seq_len)), docs, seq_len)


def test_empty_documents_are_skipped():
  docs = _docs([3, 4], seed=2)
  with_empty = [np.zeros(0, np.int32), docs[0], np.zeros(0, np.int32), docs[1]]
  for a, b in zip(_pack(with_empty, 5), _pack(docs, 5), strict=True):
    for key in KEYS:
      np.testing.assert_array_equal(a[key], b[key])


def test_state_restores_every_position():
  docs = _docs([5, 17, 3, 9, 30, 2, 11], seed=3)
  seq_len = 6
  rows = list(_pack(docs, seq_len))
  ds = _pack(docs, seq_len)
  it = iter(ds)
  for k in range(len(rows) + 1):
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON
    fresh = iter(ds)
    fresh.set_state(state)
    rest = list(fresh)
    assert len(rest) == len(rows) - k
    for a, b in zip(rest, rows[k:]):
      for key in KEYS:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"after {k}: {key}")
    if k < len(rows):
      next(it)


def test_bad_inputs():
  with pytest.raises(ValueError, match="seq_len=0"):
    _pack(_docs([3]), 0)
  with pytest.raises(ValueError, match="shape \\(2, 2\\)"):
    next(iter(_pack([np.zeros((2, 2), np.int32)], 4)))
  with pytest.raises(ValueError, match="dtype float"):
    next(iter(_pack([np.zeros(3, np.float32)], 4)))
