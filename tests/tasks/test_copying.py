"""Selective copying answers against filtering the blanks out by hand."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lsm.tasks.copying import SelectiveCopy


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 20), extra=st.integers(0, 60),
       alphabet=st.integers(2, 30))
def test_answers_are_the_symbols_in_order(seed, n, extra, alphabet):
  task = SelectiveCopy(num_tokens=n, alphabet_size=alphabet)
  size = 2 * n + 1 + extra
  ex = task.example(np.random.default_rng(seed), size)
  inputs = ex["inputs"].tolist()
  assert len(inputs) == size
  delimiter = size - n - 1
  assert inputs.index(task.copy_token) == delimiter
  assert inputs[delimiter + 1:] == [task.blank] * n
  symbols = [x for x in inputs[:delimiter] if x != task.blank]
  assert len(symbols) == n and all(1 <= x <= alphabet for x in symbols)
  assert np.flatnonzero(ex["mask"]).tolist() == list(range(delimiter + 1, size))
  assert ex["targets"][delimiter + 1:].tolist() == symbols


def test_symbol_positions_are_spread_over_the_region():
  task = SelectiveCopy(num_tokens=4, alphabet_size=8)
  rng = np.random.default_rng(0)
  hits = np.zeros(40 - 5)
  for _ in range(500):
    hits += task.example(rng, 40)["inputs"][:35] != task.blank
  # 4 of 35 positions per example: ~57 hits each, none favoured (unlike
  # mad-lab's insertion, where the last symbol always ends the region).
  assert hits.min() > 25 and hits.max() < 95


def test_layout_and_chance():
  task = SelectiveCopy()
  assert (task.blank, task.copy_token, task.vocab_size) == (15, 16, 17)
  assert task.chance == 1 / 14 and task.min_size == 33


@pytest.mark.parametrize("kw, match", [
    ({"num_tokens": 0}, "num_tokens=0"),
    ({"alphabet_size": 1}, "alphabet_size=1"),
])
def test_bad_options(kw, match):
  with pytest.raises(ValueError, match=match):
    SelectiveCopy(**kw)
