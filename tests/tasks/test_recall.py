"""MQAR and noisy recall answers against a dict of each key's most recent value."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lsm.tasks.recall import MQAR, NoisyRecall


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), pairs=st.integers(1, 12),
       extra=st.integers(0, 40), alpha=st.sampled_from([0.01, 0.5, 1.0]))
def test_mqar_answers_are_the_recalled_values(seed, pairs, extra, alpha):
  v = 256
  task = MQAR(vocab_size=v, num_pairs=pairs, alpha=alpha)
  size = 4 * pairs + extra
  ex = task.example(np.random.default_rng(seed), size)
  inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
  assert len(inputs) == size
  recent = {}
  for t in range(0, 2 * pairs, 2):
    key, value = inputs[t], inputs[t + 1]
    assert 1 <= key < v // 2 <= value < v
    recent[key] = value
  assert len(recent) == pairs  # distinct keys
  assert len(set(recent.values())) == pairs  # distinct values
  asked = np.flatnonzero(ex["mask"]).tolist()
  assert len(asked) == pairs
  assert all(t >= 2 * pairs and (t - 2 * pairs) % 2 == 0 for t in asked)
  assert sorted(inputs[t] for t in asked) == sorted(recent)  # each key once
  for t in asked:
    assert targets[t] == recent[inputs[t]]


def test_mqar_worked_layout():
  ex = MQAR(vocab_size=16, num_pairs=2, alpha=1.0).example(
      np.random.default_rng(0), 8)
  k1, v1, k2, v2 = ex["inputs"][:4].tolist()
  asked = np.flatnonzero(ex["mask"]).tolist()
  assert asked == [4, 6]  # two pairs, two query slots: both used
  assert {ex["inputs"][4]: ex["targets"][4], ex["inputs"][6]: ex["targets"][6]} == {
      k1: v1, k2: v2}


def test_mqar_power_law_puts_queries_near_the_pairs():
  def mean_gap(alpha):
    task = MQAR(vocab_size=1024, num_pairs=4, alpha=alpha)
    rng = np.random.default_rng(0)
    gaps = [(np.flatnonzero(task.example(rng, 256)["mask"]) - 8) // 2
            for _ in range(200)]
    return np.mean(gaps)
  # 124 slots: uniform draws average ~62; with alpha=0.01, P(g) ~ 1/(g + 1)
  # and the mean is near 124 / ln(124) ~ 26.
  assert 50 < mean_gap(1.0) < 75
  assert 15 < mean_gap(0.01) < 35


def test_mqar_defaults_and_chance():
  task = MQAR()
  assert (task.vocab_size, task.num_pairs, task.alpha) == (8192, 8, 0.01)
  assert task.chance == 1 / 4096 and task.min_size == 32
  with pytest.raises(ValueError, match="size=31"):
    task.example(np.random.default_rng(0), 31)


@pytest.mark.parametrize("kw, match", [
    ({"num_pairs": 0}, "num_pairs=0"),
    ({"vocab_size": 17, "num_pairs": 8}, "vocab_size=17"),
    ({"alpha": 0}, "alpha=0"),
    ({"alpha": "1"}, "alpha='1'"),
])
def test_mqar_bad_options(kw, match):
  with pytest.raises(ValueError, match=match):
    MQAR(**kw)


def _check_noisy(task, ex):
  """Slot structure, then the reference: a key position answers iff its key was
  in an earlier pair, with the most recent value of that key."""
  k, v = task.num_keys, task.num_values
  inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
  mask = ex["mask"].tolist()
  recent = {}
  for t in range(0, len(inputs), 2):
    key, value = inputs[t], inputs[t + 1]
    assert not mask[t + 1]
    if key > k + v or value > k + v:
      assert key > k + v and value > k + v  # noise fills whole slots
      assert not mask[t]
      continue
    assert 1 <= key <= k < value <= k + v
    assert mask[t] == (key in recent)
    if mask[t]:
      assert targets[t] == recent[key]
      assert value == recent[key]  # one value per key per sequence
    recent[key] = value
  assert mask[-2]  # the final probe
  return inputs


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(4, 150),
       frac=st.sampled_from([0.0, 0.2, 0.8, 0.99]))
def test_noisy_recall_answers_are_the_recalled_values(seed, size, frac):
  task = NoisyRecall(frac_noise=frac)
  ex = task.example(np.random.default_rng(seed), size)
  assert len(ex["inputs"]) == 2 * (size // 2)
  inputs = _check_noisy(task, ex)
  if frac == 0:
    assert max(inputs) <= task.num_keys + task.num_values


def test_noisy_recall_noise_rate():
  task = NoisyRecall(frac_noise=0.6)
  ex = task.example(np.random.default_rng(0), 20000)
  noise_slots = np.mean(ex["inputs"][::2] > task.num_keys + task.num_values)
  assert abs(noise_slots - 0.6) < 0.02


def test_noisy_recall_layout_and_chance():
  task = NoisyRecall()
  assert task.vocab_size == 33 and task.chance == 1 / 8 and task.min_size == 4
  assert task.max_tokens(129) == 128


@pytest.mark.parametrize("kw, match", [
    ({"num_keys": 0}, "num_keys=0"),
    ({"num_values": -1}, "num_values=-1"),
    ({"frac_noise": 1.0}, r"frac_noise=1.0.*\[0, 1\)"),
    ({"frac_noise": -0.1}, "frac_noise=-0.1"),
    ({"noise_vocab_size": 0}, "noise_vocab_size=0 with frac_noise=0.2"),
])
def test_noisy_recall_bad_options(kw, match):
  with pytest.raises(ValueError, match=match):
    NoisyRecall(**kw)
