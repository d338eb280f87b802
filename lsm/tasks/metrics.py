"""Accuracy of predicted answer tokens: per token, per sequence, and scaled.

All functions take numpy (or anything ``np.asarray`` accepts) and return Python
floats. Counts are kept next to the ratios so that batches merge exactly
(``merge_metrics`` sums the counts, then recomputes the ratios).

scaled accuracy (Grazzi et al. 2024) = (accuracy - chance) / (1 - chance): 0 for
a model at chance, 1 for a perfect one, negative below chance.
"""

from collections.abc import Iterable, Mapping

import numpy as np

COUNT_KEYS = ("num_tokens", "num_correct_tokens", "num_sequences",
              "num_correct_sequences")


def scaled_accuracy(accuracy: float, chance: float) -> float:
  """(accuracy - chance) / (1 - chance); ``chance`` must be in [0, 1)."""
  if isinstance(chance, bool) or not 0 <= chance < 1:
    raise ValueError(f"scaled_accuracy: chance={chance!r}; expected a number in "
                     "[0, 1)")
  return (float(accuracy) - chance) / (1.0 - chance)


def sequence_metrics(predictions, targets, mask, chance: float) -> dict[str, float]:
  """Accuracies of ``predictions`` at the answer positions ``mask``.

  Args:
    predictions: int [..., T] predicted token ids (e.g. argmax of the logits).
    targets: int [..., T] answer ids, same shape.
    mask: bool [..., T], True at answer positions, same shape. The last axis is
      time; every other index is one sequence.
    chance: the task's chance accuracy, in [0, 1).

  Returns:
    token_accuracy: correct / answer positions (nan if there are none);
    sequence_accuracy: among sequences with at least one answer position (so
      fully padded rows don't count), the fraction answered entirely right
      (nan if there are none);
    scaled_accuracy: from token_accuracy and chance;
    and the counts behind them: num_tokens, num_correct_tokens, num_sequences,
    num_correct_sequences (as floats).
  """
  predictions, targets = np.asarray(predictions), np.asarray(targets)
  mask = np.asarray(mask)
  if predictions.ndim < 1 or not predictions.shape == targets.shape == mask.shape:
    raise ValueError(f"sequence_metrics: predictions {predictions.shape}, targets "
                     f"{targets.shape}, mask {mask.shape}; expected one shape "
                     "[..., T]")
  if mask.dtype != bool:
    raise ValueError(f"sequence_metrics: mask dtype {mask.dtype}; expected bool")
  t = mask.shape[-1]
  mask = mask.reshape(-1, t)
  correct = (predictions == targets).reshape(-1, t) & mask
  answered = mask.any(axis=1)
  all_right = (correct == mask).all(axis=1) & answered
  counts = {"num_tokens": float(mask.sum()),
            "num_correct_tokens": float(correct.sum()),
            "num_sequences": float(answered.sum()),
            "num_correct_sequences": float(all_right.sum())}
  return _ratios(counts, chance)


def merge_metrics(metrics: Iterable[Mapping[str, float]],
                  chance: float) -> dict[str, float]:
  """Combines ``sequence_metrics`` results of several batches: counts are summed,
  then the ratios recomputed (not averaged, so batch sizes don't skew them)."""
  counts = dict.fromkeys(COUNT_KEYS, 0.0)
  for i, m in enumerate(metrics):
    missing = [k for k in COUNT_KEYS if k not in m]
    if missing:
      raise ValueError(f"merge_metrics: metrics[{i}] lacks {missing}; expected "
                       "sequence_metrics results")
    for k in COUNT_KEYS:
      counts[k] += float(m[k])
  return _ratios(counts, chance)


def _ratios(counts: dict[str, float], chance: float) -> dict[str, float]:
  nan = float("nan")
  token = (counts["num_correct_tokens"] / counts["num_tokens"]
           if counts["num_tokens"] else nan)
  seq = (counts["num_correct_sequences"] / counts["num_sequences"]
         if counts["num_sequences"] else nan)
  return {"token_accuracy": token, "sequence_accuracy": seq,
          "scaled_accuracy": scaled_accuracy(token, chance), **counts}
