"""Modular arithmetic, without and with brackets (Deletang et al. 2023, "Neural
Networks and the Chomsky Hierarchy", tasks/regular/modular_arithmetic.py and
tasks/dcf/modular_arithmetic_brackets.py; used by Grazzi et al. 2024).

Both tasks share one token layout, for modulus m (5 by default)::

  digit d   1 + d        (ids 1..m; also the answer tokens)
  +         m + 1        -   m + 2        *   m + 3        =   m + 4
  (         m + 5        )   m + 6        (brackets task only)

so vocab_size is m + 5 without brackets and m + 7 with them (10 and 12 for m=5).
An example is the expression followed by "="; its one answer, the value mod m,
is the target at "=" (Grazzi et al. put it as the token after "=" and score only
it, which is the same thing in causal-LM format).
"""

import dataclasses
from typing import ClassVar

import numpy as np

from lsm.tasks.base import Task, check_int

DIGIT0 = 1


def _symbol_ids(modulus: int) -> dict[str, int]:
  return {"+": modulus + 1, "-": modulus + 2, "*": modulus + 3, "=": modulus + 4,
          "(": modulus + 5, ")": modulus + 6}


def _check_modulus(task: str, modulus) -> None:
  check_int(task, "modulus", modulus, 2)


@dataclasses.dataclass(frozen=True)
class ModularArithmetic(Task):
  """``d0 op d1 op ... d(n-1) =`` with digits in [0, m), ops in {+, -, *}, mod m.

  ``*`` binds tighter than ``+`` and ``-``, which are left-associative (ordinary
  precedence: ``1 - 2 * 3 = 0 (mod 5)``). Digits and operators are uniform and
  independent, as in Deletang et al.

  size = n, the number of operands (>= 1). The expression has 2n - 1 tokens
  (Deletang's odd ``length``, so n = (length + 1) / 2) and the example 2n
  (with "="); Grazzi et al.'s ``sequence_length`` also counts the answer token,
  so it is 2n + 1 (their training range 3..40 is n = 1..19).

  Options: modulus (default 5).
  """
  name: ClassVar[str] = "modular_arithmetic"
  modulus: int = 5

  def __post_init__(self):
    _check_modulus(self.name, self.modulus)

  @property
  def vocab_size(self) -> int:
    return self.modulus + 5

  @property
  def chance(self) -> float:
    # The papers' convention (uniform guess over m classes); the answer
    # distribution is close to, not exactly, uniform.
    return 1.0 / self.modulus

  @property
  def min_size(self) -> int:
    return 1

  def max_tokens(self, size: int) -> int:
    return 2 * self.check_size(size)

  def _generate(self, rng, size):
    m = self.modulus
    ids = _symbol_ids(m)
    digits = rng.integers(0, m, size=size)
    ops = rng.integers(0, 3, size=size - 1)  # 0: +, 1: -, 2: *
    inputs = np.empty(2 * size, np.int32)
    inputs[0:-1:2] = DIGIT0 + digits
    inputs[1:-1:2] = np.array([ids["+"], ids["-"], ids["*"]])[ops]
    inputs[-1] = ids["="]
    # Left to right: `term` is the running product, `total` the sum of finished
    # terms; everything stays reduced mod m so no int grows.
    total, term = 0, int(digits[0])
    for op, d in zip(ops.tolist(), digits[1:].tolist()):
      if op == 2:
        term = term * d % m
      else:
        total = (total + term) % m
        term = d if op == 0 else -d % m
    value = (total + term) % m
    targets = np.zeros(2 * size, np.int32)
    mask = np.zeros(2 * size, bool)
    targets[-1] = DIGIT0 + value
    mask[-1] = True
    return inputs, targets, mask


@dataclasses.dataclass(frozen=True)
class ModularArithmeticBrackets(Task):
  """Deletang et al.'s bracketed expressions mod m, then "=".

  An expression of length ℓ tokens is, for ℓ = 1, 2, 3, 4: ``d``, ``-d``,
  ``(d)``, ``(-d)`` with d uniform in [0, m); for ℓ >= 5: ``(A op B)`` where A
  has a uniform length in [1, ℓ - 4], B the remaining ℓ - 3 - len(A) tokens, and
  op is uniform over {+, -, *} (``mult=True``) or {+, -}. The only unary minus is
  on a single digit, and every binary operation is bracketed, so precedence
  never matters.

  size = ℓ, the expression length in tokens (Deletang's ``length``; Grazzi et
  al.'s ``sequence_length`` adds "=", the answer and a pad, so it is ℓ + 3).
  L = ℓ + 1.

  Options: modulus (default 5); mult (default True). Deletang et al.'s
  experiments build this task with mult=True (experiments/constants.py, though
  the class itself defaults to False) and Grazzi et al.'s generator defaults to
  mult=True, so both papers' numbers include ``*``; mult=False gives the
  {+, -} variant.
  """
  name: ClassVar[str] = "modular_arithmetic_brackets"
  modulus: int = 5
  mult: bool = True

  def __post_init__(self):
    _check_modulus(self.name, self.modulus)
    if not isinstance(self.mult, (bool, np.bool_)):
      raise ValueError(f"{self.name}: mult={self.mult!r}; expected a bool")

  @property
  def vocab_size(self) -> int:
    return self.modulus + 7

  @property
  def chance(self) -> float:
    return 1.0 / self.modulus

  @property
  def min_size(self) -> int:
    return 1

  def max_tokens(self, size: int) -> int:
    return self.check_size(size) + 1

  def _generate(self, rng, size):
    m = self.modulus
    ids = _symbol_ids(m)
    op_ids = (ids["+"], ids["-"], ids["*"])
    num_ops = 3 if self.mult else 2
    tokens: list[int] = []
    values: list[int] = []  # values of finished sub-expressions, innermost last
    # An explicit stack instead of recursion: depth grows like size / 4, which
    # would hit Python's recursion limit for sizes of a few thousand.
    todo: list[tuple[str, int]] = [("expr", size)]
    while todo:
      kind, arg = todo.pop()
      if kind == "expr" and arg <= 4:
        d = int(rng.integers(0, m))
        negate, bracket = arg in (2, 4), arg >= 3
        tokens += ([ids["("]] if bracket else []) + ([ids["-"]] if negate else [])
        tokens.append(DIGIT0 + d)
        tokens += [ids[")"]] if bracket else []
        values.append(-d % m if negate else d)
      elif kind == "expr":
        left = int(rng.integers(1, arg - 3))  # [1, arg - 4], as in Deletang et al.
        op = int(rng.integers(0, num_ops))
        tokens.append(ids["("])
        # Popped in reverse: left operand, operator, right operand, close.
        todo += [("close", op), ("expr", arg - 3 - left), ("op", op),
                 ("expr", left)]
      elif kind == "op":
        tokens.append(op_ids[arg])
      else:  # close: combine the two operands just finished
        tokens.append(ids[")"])
        b, a = values.pop(), values.pop()
        values.append((a + b) % m if arg == 0 else (a - b) % m if arg == 1
                      else a * b % m)
    tokens.append(ids["="])
    n = len(tokens)
    targets = np.zeros(n, np.int32)
    mask = np.zeros(n, bool)
    targets[-1] = DIGIT0 + values.pop()
    mask[-1] = True
    return np.array(tokens, np.int32), targets, mask
