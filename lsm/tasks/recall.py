"""Associative recall: MQAR (Zoology, Arora et al. 2023; Based, Arora et al. 2024)
and noisy in-context recall (MAD, Poli et al. 2024, as in the DeltaNet paper's
synthetic evaluations, Yang et al. 2024).
"""

import dataclasses
from typing import ClassVar

import numpy as np

from lsm.tasks.base import Task, check_int


def _check_fraction(task: str, field: str, value, *, closed_high: bool) -> None:
  ok = (isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and 0 <= value and (value <= 1 if closed_high else value < 1))
  if not ok:
    want = "[0, 1]" if closed_high else "[0, 1)"
    raise ValueError(f"{task}: {field}={value!r}; expected a number in {want}")


@dataclasses.dataclass(frozen=True)
class MQAR(Task):
  """Multi-query associative recall, Zoology's generator (zoology/data/
  multiquery_ar.py) with token 0 kept free for padding.

  Layout for size T and N = num_pairs, V = vocab_size::

    k_1 v_1 k_2 v_2 ... k_N v_N | query region of T - 2N tokens

  Keys are N distinct ids from [1, V//2), values N distinct ids from [V//2, V).
  Every key is queried exactly once: the query for key j sits at offset
  2·g_j of the query region, where the gaps g_j are N distinct slots drawn
  without replacement from {0, ..., (T - 2N)//2 - 1} with P(g) ∝ (g + 1)^(α-1)
  (Zoology's power law: small α puts queries near the pairs, α = 1 is uniform).
  Its answer, the key's value, is the target at the query position. Every other
  query-region token is uniform over [1, V) (Zoology's random_non_queries, which
  draws from [0, V); 0 is padding here).

  size = T, the sequence length in tokens (Zoology's input_seq_len; it need not
  be even: an odd T leaves one filler token at the end). L = T, T >= 4N.
  chance = 1 / (V - V//2), a uniform guess over the values.

  Options: vocab_size (default 8192), num_pairs (N, default 8), alpha (default
  0.01, Zoology's power_a).
  """
  name: ClassVar[str] = "mqar"
  vocab_size: int = 8192
  num_pairs: int = 8
  alpha: float = 0.01

  def __post_init__(self):
    check_int(self.name, "num_pairs", self.num_pairs, 1)
    # N distinct keys in [1, V//2) and N distinct values in [V//2, V).
    check_int(self.name, "vocab_size", self.vocab_size, 2 * self.num_pairs + 2)
    a = self.alpha
    if (isinstance(a, (bool, np.bool_))
        or not isinstance(a, (int, float, np.integer, np.floating)) or not a > 0):
      raise ValueError(f"{self.name}: alpha={a!r}; expected a number > 0")

  @property
  def chance(self) -> float:
    return 1.0 / (self.vocab_size - self.vocab_size // 2)

  @property
  def min_size(self) -> int:
    # Zoology's bound: room for N distinct query slots after the pairs.
    return 4 * self.num_pairs

  def max_tokens(self, size: int) -> int:
    return self.check_size(size)

  def _generate(self, rng, size):
    n, v = self.num_pairs, self.vocab_size
    keys = 1 + rng.choice(v // 2 - 1, size=n, replace=False)
    values = v // 2 + rng.choice(v - v // 2, size=n, replace=False)
    slots = (size - 2 * n) // 2
    p = (np.arange(1, slots + 1, dtype=np.float64)) ** (self.alpha - 1)
    gaps = rng.choice(slots, size=n, replace=False, p=p / p.sum())
    inputs = rng.integers(1, v, size=size)
    inputs[0:2 * n:2] = keys
    inputs[1:2 * n:2] = values
    where = 2 * n + 2 * gaps
    inputs[where] = keys
    targets = np.zeros(size, np.int32)
    mask = np.zeros(size, bool)
    targets[where] = values
    mask[where] = True
    return inputs, targets, mask


@dataclasses.dataclass(frozen=True)
class NoisyRecall(Task):
  """MAD's noisy in-context recall in its benchmark (multi-query) form (mad-lab,
  mad/data/instances.py, configs/tasks/noisy-in-context-recall.yml).

  Token ids, with K = num_keys, V = num_values, Z = noise_vocab_size::

    keys 1..K    values K+1..K+V    noise K+V+1..K+V+Z    (vocab_size K+V+Z+1)

  The sequence is size//2 two-token slots. Each key gets one value, uniform
  over the values, for the whole sequence. Every slot but the last is, with
  probability frac_noise, two uniform noise tokens, otherwise a pair ``k v``
  with k uniform over the keys; one uniformly chosen slot among them is always
  a pair. Wherever a pair's key already appeared in an earlier pair, its value
  is a target, at the key position. The last slot is a probe: a key drawn
  uniformly from those seen, and its value as a target. The noise has its own
  vocabulary, so a model must learn to skip it.

  size = T, the sequence length in tokens (MAD's seq_len); L = 2·(T // 2), so an
  odd T loses one token. T >= 4.

  Differences from mad-lab, all for well-definedness: the always-a-pair slot is
  drawn among the non-probe slots (mad-lab can draw the probe slot, and then an
  all-noise sequence has no key to probe); the last value token stays in the
  inputs (mad-lab drops it; nothing is predicted from it either way).
  chance = 1 / num_values.

  Options: num_keys (8), num_values (8), noise_vocab_size (16), frac_noise
  (0.2): MAD's baseline, vocab_size 32 with 16 noise tokens.
  """
  name: ClassVar[str] = "noisy_recall"
  num_keys: int = 8
  num_values: int = 8
  noise_vocab_size: int = 16
  frac_noise: float = 0.2

  def __post_init__(self):
    check_int(self.name, "num_keys", self.num_keys, 1)
    check_int(self.name, "num_values", self.num_values, 1)
    check_int(self.name, "noise_vocab_size", self.noise_vocab_size, 0)
    _check_fraction(self.name, "frac_noise", self.frac_noise, closed_high=False)
    if self.frac_noise > 0 and self.noise_vocab_size == 0:
      raise ValueError(f"{self.name}: noise_vocab_size=0 with frac_noise="
                       f"{self.frac_noise}; expected noise_vocab_size >= 1")

  @property
  def vocab_size(self) -> int:
    return 1 + self.num_keys + self.num_values + self.noise_vocab_size

  @property
  def chance(self) -> float:
    return 1.0 / self.num_values

  @property
  def min_size(self) -> int:
    return 4  # one pair and the probe

  def max_tokens(self, size: int) -> int:
    return 2 * (self.check_size(size) // 2)

  def _generate(self, rng, size):
    k, v = self.num_keys, self.num_values
    slots = size // 2
    n = slots - 1  # context slots; the last slot is the probe
    value_of = 1 + k + rng.integers(0, v, size=k)  # [K] value token of each key
    keys = 1 + rng.integers(0, k, size=n)
    noise = rng.random(n) < self.frac_noise
    noise[rng.integers(0, n)] = False
    noise_tokens = 1 + k + v + rng.integers(0, max(self.noise_vocab_size, 1),
                                            size=(n, 2))
    pairs = np.stack([keys, value_of[keys - 1]], axis=1)  # [n, 2]
    body = np.where(noise[:, None], noise_tokens, pairs)
    # A pair is probed when its key was the key of an earlier pair.
    pair_slots = np.flatnonzero(~noise)
    pair_keys = keys[pair_slots]
    seen_keys, first = np.unique(pair_keys, return_index=True)
    repeat = np.ones(len(pair_slots), bool)
    repeat[first] = False
    probe = seen_keys[rng.integers(0, len(seen_keys))]
    inputs = np.concatenate([body.reshape(-1), [probe, value_of[probe - 1]]])
    targets = np.zeros(2 * slots, np.int32)
    mask = np.zeros(2 * slots, bool)
    answered = np.append(2 * pair_slots[repeat], 2 * n)
    targets[answered] = value_of[inputs[answered] - 1]
    mask[answered] = True
    return inputs, targets, mask
