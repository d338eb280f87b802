"""Modular arithmetic answers against Python's own evaluation of the expression
string (Python precedence, unary minus, and % that is never negative)."""

import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lsm.tasks.arithmetic import ModularArithmetic, ModularArithmeticBrackets


def _text(inputs, modulus):
  """Token ids -> the expression string, without the final "="."""
  symbols = {modulus + 1: "+", modulus + 2: "-", modulus + 3: "*", modulus + 4: "=",
             modulus + 5: "(", modulus + 6: ")"}
  chars = [str(t - 1) if 1 <= t <= modulus else symbols[t] for t in inputs.tolist()]
  assert chars[-1] == "=" and "=" not in chars[:-1]
  return "".join(chars[:-1])


def _answer(ex, modulus):
  assert np.flatnonzero(ex["mask"]).tolist() == [len(ex["mask"]) - 1]
  return int(ex["targets"][-1]) - 1


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 60),
       modulus=st.sampled_from([2, 5, 7]))
def test_flat_expressions_evaluate_like_python(seed, size, modulus):
  task = ModularArithmetic(modulus=modulus)
  ex = task.example(np.random.default_rng(seed), size)
  text = _text(ex["inputs"], modulus)
  assert re.fullmatch(r"\d([-+*]\d)*", text)  # digit op digit ... op digit
  assert len(text) == 2 * size - 1  # size = number of operands
  assert _answer(ex, modulus) == eval(text) % modulus  # pylint: disable=eval-used


def test_flat_worked_examples():
  # Deletang et al.'s docstring examples, mod 5.
  for text, value in (("1+2*3", 2), ("1-1-1", 4), ("0*1+4*3-2", 0)):
    assert eval(text) % 5 == value  # pylint: disable=eval-used
  # And one generated example, spelled out.
  ex = ModularArithmetic().example(np.random.default_rng(0), 3)
  assert ex["inputs"].tolist()[-1] == 9 and len(ex["inputs"]) == 6


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 120),
       mult=st.booleans())
def test_bracket_expressions_evaluate_like_python(seed, size, mult):
  task = ModularArithmeticBrackets(mult=mult)
  ex = task.example(np.random.default_rng(seed), size)
  text = _text(ex["inputs"], 5)
  assert len(text) == size  # size = expression length in tokens
  assert mult or "*" not in text
  assert text.count("(") == text.count(")")
  assert _answer(ex, 5) == eval(text) % 5  # pylint: disable=eval-used


def test_bracket_short_forms():
  """Lengths 1-4 are d, -d, (d), (-d); length 5 is (d op d)."""
  rng = np.random.default_rng(0)
  patterns = {1: r"\d", 2: r"-\d", 3: r"\(\d\)", 4: r"\(-\d\)", 5: r"\(\d[-+*]\d\)"}
  for size, pattern in patterns.items():
    for _ in range(20):
      text = _text(ModularArithmeticBrackets().example(rng, size)["inputs"], 5)
      assert re.fullmatch(pattern, text), (size, text)


def test_long_bracket_expressions_need_no_recursion():
  ex = ModularArithmeticBrackets().example(np.random.default_rng(0), 20000)
  assert len(ex["inputs"]) == 20001


def test_answers_cover_every_residue():
  rng = np.random.default_rng(0)
  for task in (ModularArithmetic(), ModularArithmeticBrackets()):
    seen = {_answer(task.example(rng, 9), 5) for _ in range(200)}
    assert seen == set(range(5))


@pytest.mark.parametrize("cls", [ModularArithmetic, ModularArithmeticBrackets])
@pytest.mark.parametrize("modulus", [1, 0, 2.5, True])
def test_bad_modulus(cls, modulus):
  with pytest.raises(ValueError, match="modulus="):
    cls(modulus=modulus)


def test_bad_mult():
  with pytest.raises(ValueError, match="mult='yes'"):
    ModularArithmeticBrackets(mult="yes")
