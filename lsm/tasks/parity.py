"""Parity of a binary string (Deletang et al. 2023 "parity_check"; Grazzi et al.
2024, "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues").

Tokens: 1 = bit 0, 2 = bit 1; vocab_size 3. The answers reuse them: 1 = even
number of ones, 2 = odd.

size = n, the number of input bits (Deletang's length; Grazzi et al.'s
sequence_length counts the answer token too, so it is n + 1). L = n.

mode="final": one answer, the parity of all n bits, at the last bit (the papers'
format: Grazzi et al. put the answer after the last bit and score only it).
mode="running": an answer at every position t, the parity of bits[:t+1].
"""

import dataclasses
from typing import ClassVar

import numpy as np

from lsm.tasks.base import Task, check_choice

MODES = ("final", "running")
BIT0 = 1  # bit b is token BIT0 + b


@dataclasses.dataclass(frozen=True)
class Parity(Task):
  """Parity of n uniformly random bits. Options: mode ("final" | "running")."""
  name: ClassVar[str] = "parity"
  mode: str = "final"

  def __post_init__(self):
    check_choice(self.name, "mode", self.mode, MODES)

  @property
  def vocab_size(self) -> int:
    return BIT0 + 2

  @property
  def chance(self) -> float:
    return 0.5

  @property
  def min_size(self) -> int:
    return 1

  def max_tokens(self, size: int) -> int:
    return self.check_size(size)

  def _generate(self, rng, size):
    bits = rng.integers(0, 2, size=size)
    running = np.cumsum(bits) % 2
    inputs = BIT0 + bits
    if self.mode == "running":
      return inputs, BIT0 + running, np.ones(size, bool)
    targets = np.zeros(size, np.int32)
    mask = np.zeros(size, bool)
    targets[-1] = BIT0 + running[-1]
    mask[-1] = True
    return inputs, targets, mask
