"""Token, sequence and scaled accuracy on hand-made batches with known answers."""

import math

import numpy as np
import pytest

from lsm.tasks.metrics import merge_metrics, scaled_accuracy, sequence_metrics

# Three rows of T = 4: row 0 all right, row 1 one of two wrong, row 2 padding.
PRED = np.array([[5, 0, 7, 1], [3, 3, 9, 9], [1, 2, 3, 4]])
TARGET = np.array([[5, 6, 7, 0], [3, 4, 9, 9], [0, 0, 0, 0]])
MASK = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], bool)


def test_hand_made_batch():
  m = sequence_metrics(PRED, TARGET, MASK, chance=0.5)
  assert m == {"token_accuracy": 0.75, "sequence_accuracy": 0.5,
               "scaled_accuracy": 0.5, "num_tokens": 4.0,
               "num_correct_tokens": 3.0, "num_sequences": 2.0,
               "num_correct_sequences": 1.0}
  assert all(type(v) is float for v in m.values())


def test_unmasked_positions_never_count():
  wrong_elsewhere = np.where(MASK, PRED, 99)
  assert (sequence_metrics(wrong_elsewhere, TARGET, MASK, 0.5)
          == sequence_metrics(PRED, TARGET, MASK, 0.5))


def test_one_sequence_and_leading_axes():
  m = sequence_metrics(PRED[0], TARGET[0], MASK[0], chance=0.0)
  assert (m["token_accuracy"], m["sequence_accuracy"], m["num_sequences"]) == (
      1.0, 1.0, 1.0)
  stacked = sequence_metrics(PRED[None], TARGET[None], MASK[None], chance=0.5)
  assert stacked == sequence_metrics(PRED, TARGET, MASK, chance=0.5)


def test_nothing_to_score_is_nan():
  m = sequence_metrics(PRED[2:], TARGET[2:], MASK[2:], chance=0.2)
  assert math.isnan(m["token_accuracy"]) and math.isnan(m["sequence_accuracy"])
  assert math.isnan(m["scaled_accuracy"]) and m["num_tokens"] == 0


def test_merge_sums_counts_then_divides():
  parts = [sequence_metrics(PRED[i:i + 1], TARGET[i:i + 1], MASK[i:i + 1], 0.2)
           for i in range(3)]
  merged = merge_metrics(parts, chance=0.2)
  assert merged == pytest.approx(sequence_metrics(PRED, TARGET, MASK, 0.2))
  # Not the mean of per-batch ratios (1.0 and 0.5 would average to 0.75 too,
  # so weight them differently): 3 right of 4 answers.
  lopsided = [sequence_metrics(PRED[:1], TARGET[:1], MASK[:1], 0.0),
              sequence_metrics(np.array([[0, 0, 0]]), np.array([[1, 1, 1]]),
                               np.ones((1, 3), bool), 0.0)]
  assert merge_metrics(lopsided, 0.0)["token_accuracy"] == 2 / 5
  assert math.isnan(merge_metrics([], 0.5)["token_accuracy"])


def test_scaled_accuracy():
  assert scaled_accuracy(0.2, 0.2) == 0.0
  assert scaled_accuracy(1.0, 1 / 120) == pytest.approx(1.0)
  assert scaled_accuracy(0.6, 0.2) == pytest.approx(0.5)
  assert scaled_accuracy(0.0, 0.5) == -1.0
  for chance in (1.0, -0.1, True):
    with pytest.raises(ValueError, match="chance="):
      scaled_accuracy(0.5, chance)


def test_bad_inputs():
  with pytest.raises(ValueError, match="expected one shape"):
    sequence_metrics(PRED, TARGET[:, :3], MASK, 0.5)
  with pytest.raises(ValueError, match="mask dtype"):
    sequence_metrics(PRED, TARGET, MASK.astype(int), 0.5)
  with pytest.raises(ValueError, match="lacks"):
    merge_metrics([{"token_accuracy": 1.0}], 0.5)
