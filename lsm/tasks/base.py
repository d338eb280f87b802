"""The Task contract and TaskSource, the grain-compatible record source of a task.

A task turns ``(rng, size)`` into one unpadded example in causal-LM format::

  inputs   int32 [L]   token ids, never 0 (0 is padding)
  targets  int32 [L]   the answer at position t, predicted from inputs[:t+1];
                       0 where mask is False
  mask     bool  [L]   True at answer positions

``size`` is the length the papers vary (input symbols, operands, group elements,
sequence tokens: each task's docstring says which); ``L <= max_tokens(size)``.

``TaskSource(task, seed=..., sizes=(lo, hi))`` is random access: record i comes
from ``np.random.default_rng([seed, i])`` alone, with its size drawn uniformly
from [lo, hi] by that generator, so a record is the same on any machine (with
the same numpy version: numpy may change Generator streams between releases),
in any access order, and grain only needs to checkpoint the index to resume.
"""

import abc
import operator
from typing import ClassVar

import numpy as np

EXAMPLE_KEYS = ("inputs", "targets", "mask")  # what lsm.data.pipeline batches


class Task(abc.ABC):
  """A synthetic task. Subclasses are frozen dataclasses holding their options.

  Subclasses set ``name`` (the key in ``lsm.tasks.TASKS``) and implement
  ``vocab_size``, ``chance``, ``min_size``, ``max_tokens`` and ``_generate``.
  """

  name: ClassVar[str]

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of token ids used, padding (0) included: every id is below this."""

  @property
  @abc.abstractmethod
  def chance(self) -> float:
    """Accuracy of the best constant or uniform guess at an answer position."""

  @property
  @abc.abstractmethod
  def min_size(self) -> int:
    """The smallest valid ``size`` for these options."""

  @abc.abstractmethod
  def max_tokens(self, size: int) -> int:
    """An upper bound on L for examples of ``size`` (exact for every task here)."""

  @abc.abstractmethod
  def _generate(self, rng: np.random.Generator,
                size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, mask) of one example; ``size`` is already checked."""

  def example(self, rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """One unpadded example of task size ``size``.

    Args:
      rng: the only source of randomness, so equal generators give equal examples.
      size: the task's length parameter (see the task's docstring), an int
        >= ``min_size``.

    Returns:
      {"inputs": int32 [L], "targets": int32 [L], "mask": bool [L]}, L <=
      ``max_tokens(size)``; targets are 0 where mask is False.
    """
    if not isinstance(rng, np.random.Generator):
      raise ValueError(f"{self.name}: rng={rng!r}; expected a numpy.random.Generator")
    size = self.check_size(size)
    inputs, targets, mask = self._generate(rng, size)
    return {"inputs": np.asarray(inputs, np.int32),
            "targets": np.asarray(targets, np.int32),
            "mask": np.asarray(mask, bool)}

  def check_size(self, size, what: str = "size") -> int:
    """``size`` as an int, or ValueError if it is not an int >= ``min_size``."""
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)):
      raise ValueError(f"{self.name}: {what}={size!r}; expected an int >= "
                       f"{self.min_size}")
    if size < self.min_size:
      raise ValueError(f"{self.name}: {what}={size}; expected an int >= "
                       f"{self.min_size} for {self!r}")
    return int(size)


# --- option checks shared by the task modules ----------------------------------


def check_int(task: str, field: str, value, low: int) -> None:
  """ValueError unless ``value`` is an int >= ``low``."""
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))
      or value < low):
    raise ValueError(f"{task}: {field}={value!r}; expected an int >= {low}")


def check_choice(task: str, field: str, value, choices) -> None:
  """ValueError unless ``value`` is one of ``choices``."""
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{task}: {field}={value!r}; expected one of {list(choices)}")


# --- records -------------------------------------------------------------------


class TaskSource:
  """Random-access padded records of ``task``: ``len(source)``, ``source[i]``.

  Record i is ``task.example(rng, size)`` with ``rng = np.random.default_rng(
  [seed, i])`` and ``size = rng.integers(sizes[0], sizes[1] + 1)`` drawn first,
  padded at the end to ``seq_len`` with 0 (mask False). It depends on
  (task, seed, sizes, i) only: not on seq_len, the access order or the machine.

  Args:
    task: the Task.
    seed: an int >= 0; sources with different seeds give different records.
    sizes: (lo, hi), inclusive range of the task size, lo >= task.min_size.
    seq_len: padded length; default ``task.max_tokens(sizes[1])``. A shorter one
      raises ValueError here rather than at some record.
    num_records: ``len(source)``; the default is effectively endless (grain's
      shuffle and repeat handle epochs).
  """

  def __init__(self, task: Task, *, seed: int, sizes: tuple[int, int],
               seq_len: int | None = None, num_records: int = 2**31 - 1):
    if not isinstance(task, Task):
      raise ValueError(f"TaskSource: task={task!r}; expected an lsm.tasks Task")
    check_int("TaskSource", "seed", seed, 0)
    check_int("TaskSource", "num_records", num_records, 1)
    try:
      lo, hi = sizes
    except (TypeError, ValueError):
      raise ValueError(f"TaskSource: sizes={sizes!r}; expected a pair (lo, hi) "
                       "of task sizes") from None
    lo = task.check_size(lo, "sizes[0]")
    hi = task.check_size(hi, "sizes[1]")
    if hi < lo:
      raise ValueError(f"TaskSource: sizes={sizes!r}; expected lo <= hi")
    need = task.max_tokens(hi)
    if seq_len is None:
      seq_len = need
    check_int("TaskSource", "seq_len", seq_len, 1)
    if seq_len < need:
      raise ValueError(f"TaskSource: seq_len={seq_len} is shorter than the "
                       f"{need} tokens that {task.name} examples of size {hi} "
                       f"need; expected seq_len >= {need}")
    self.task = task
    self.seed = int(seed)
    self.sizes = (lo, hi)
    self.seq_len = int(seq_len)
    self.num_records = int(num_records)

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    i = operator.index(index)
    if not 0 <= i < self.num_records:
      raise IndexError(f"TaskSource: index {index} out of range [0, "
                       f"{self.num_records})")
    rng = np.random.default_rng([self.seed, i])
    size = int(rng.integers(self.sizes[0], self.sizes[1] + 1))
    ex = self.task.example(rng, size)
    n = ex["inputs"].shape[0]
    if n > self.seq_len:  # only reachable if a task's max_tokens is wrong
      raise ValueError(f"TaskSource: record {i} of {self.task.name} has {n} "
                       f"tokens; expected at most seq_len={self.seq_len}")
    out = {}
    for key in EXAMPLE_KEYS:
      padded = np.zeros(self.seq_len, ex[key].dtype)
      padded[:n] = ex[key]
      out[key] = padded
    return out

  def __repr__(self) -> str:
    return (f"TaskSource({self.task!r}, seed={self.seed}, sizes={self.sizes}, "
            f"seq_len={self.seq_len}, num_records={self.num_records})")

