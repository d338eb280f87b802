"""Parity labels against counting ones by hand."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lsm.tasks.parity import Parity


def _bits(inputs):
  return [int(t) - 1 for t in inputs]  # tokens 1, 2 are bits 0, 1


def test_worked_example():
  ex = Parity(mode="running").example(np.random.default_rng(0), 12)
  ones = 0
  for t, bit in enumerate(_bits(ex["inputs"])):
    ones += bit
    assert ex["targets"][t] == 1 + ones % 2


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 200))
def test_final_answer_is_the_parity_of_all_bits(seed, size):
  ex = Parity().example(np.random.default_rng(seed), size)
  bits = _bits(ex["inputs"])
  assert set(bits) <= {0, 1} and len(bits) == size
  assert np.flatnonzero(ex["mask"]).tolist() == [size - 1]
  assert ex["targets"][-1] == 1 + sum(bits) % 2


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 200))
def test_running_answers_are_prefix_parities(seed, size):
  ex = Parity(mode="running").example(np.random.default_rng(seed), size)
  bits = _bits(ex["inputs"])
  assert ex["mask"].all()
  want = [1 + sum(bits[:t + 1]) % 2 for t in range(size)]
  assert ex["targets"].tolist() == want


def test_bits_are_balanced():
  ex = Parity().example(np.random.default_rng(0), 20000)
  assert abs(np.mean(_bits(ex["inputs"])) - 0.5) < 0.02


def test_bad_mode():
  with pytest.raises(ValueError, match=r"mode='last'.*\['final', 'running'\]"):
    Parity(mode="last")
