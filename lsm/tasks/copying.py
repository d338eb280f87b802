"""Selective copying (MAD, Poli et al. 2024: mad-lab mad/data/instances.py and
configs/tasks/selective-copying.yml; one of the DeltaNet paper's synthetic
evaluations; after the selective copying task of Gu & Dao's Mamba).
"""

import dataclasses
from typing import ClassVar

import numpy as np

from lsm.tasks.base import Task, check_int


@dataclasses.dataclass(frozen=True)
class SelectiveCopy(Task):
  """Copy the N non-blank tokens of a noisy region, in order, after a delimiter.

  Token ids, with A = alphabet_size: symbols 1..A, blank A+1, copy delimiter
  A+2; vocab_size A+3. For size T and N = num_tokens::

    region of T - N - 1 tokens | COPY | N blanks

  The region holds N symbols, uniform over the alphabet (repeats allowed), at
  uniformly random positions (a random N-subset, in order) and blanks
  elsewhere. The targets are the N symbols in order, at the N blank positions
  after the delimiter (MAD's format: the outputs are read off blank inputs, not
  teacher-forced).

  size = T, the sequence length in tokens (MAD's seq_len); L = T, T >= 2N + 1.
  chance = 1 / A.

  Difference from mad-lab: it inserts its blanks before uniformly chosen
  symbols with numpy's global generator, so the last symbol always ends the
  region and the example does not follow the given rng; here the positions are
  a uniform subset drawn from ``rng``.

  Options: num_tokens (N, default 16), alphabet_size (A, default 14: MAD's
  baseline vocab_size 16 less its blank and copy tokens).
  """
  name: ClassVar[str] = "selective_copy"
  num_tokens: int = 16
  alphabet_size: int = 14

  def __post_init__(self):
    check_int(self.name, "num_tokens", self.num_tokens, 1)
    check_int(self.name, "alphabet_size", self.alphabet_size, 2)

  @property
  def blank(self) -> int:
    return self.alphabet_size + 1

  @property
  def copy_token(self) -> int:
    return self.alphabet_size + 2

  @property
  def vocab_size(self) -> int:
    return self.alphabet_size + 3

  @property
  def chance(self) -> float:
    return 1.0 / self.alphabet_size

  @property
  def min_size(self) -> int:
    return 2 * self.num_tokens + 1

  def max_tokens(self, size: int) -> int:
    return self.check_size(size)

  def _generate(self, rng, size):
    n = self.num_tokens
    region = size - n - 1
    symbols = 1 + rng.integers(0, self.alphabet_size, size=n)
    where = np.sort(rng.choice(region, size=n, replace=False))
    inputs = np.full(size, self.blank, np.int32)
    inputs[where] = symbols
    inputs[region] = self.copy_token
    targets = np.zeros(size, np.int32)
    mask = np.zeros(size, bool)
    targets[region + 1:] = symbols
    mask[region + 1:] = True
    return inputs, targets, mask
