"""Synthetic task generators (state tracking, recall) and their metrics.

Numpy only (no JAX), so configs and data workers import this cheaply.

``TASKS`` maps each task name to its class; ``TaskConfig(**config.task)`` is the
one place task options are read and ``make_task(cfg)`` builds the task.
``lsm.tasks.base.TaskSource`` turns a task into grain-ready records and
``lsm.tasks.metrics`` scores predictions. Each module's docstring gives its
tasks' token layout, the meaning of ``size`` and the paper it follows.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

from lsm.tasks.arithmetic import ModularArithmetic, ModularArithmeticBrackets
from lsm.tasks.base import Task, TaskSource
from lsm.tasks.copying import SelectiveCopy
from lsm.tasks.parity import Parity
from lsm.tasks.permutation import Permutation
from lsm.tasks.recall import MQAR, NoisyRecall

TASKS: dict[str, type[Task]] = {
    "parity": Parity,
    "modular_arithmetic": ModularArithmetic,
    "modular_arithmetic_brackets": ModularArithmeticBrackets,
    "permutation": Permutation,
    "mqar": MQAR,
    "noisy_recall": NoisyRecall,
    "selective_copy": SelectiveCopy,
}


def _int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Which synthetic task, and at which sizes it is trained and evaluated.

  Attributes:
    name: a key of ``TASKS``.
    train_sizes: (lo, hi): training sizes are drawn uniformly from [lo, hi].
    eval_sizes: sizes evaluated one at a time (length generalisation).
    options: keyword arguments of the task class, e.g. {"group": "S5"}; a
      Mapping or anything with ``items()`` (an ml_collections ConfigDict).
  """
  name: str
  train_sizes: tuple[int, int]
  eval_sizes: tuple[int, ...] = ()
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not isinstance(self.name, str) or self.name not in TASKS:
      raise ValueError(f"TaskConfig: name={self.name!r}; expected one of "
                       f"{sorted(TASKS)}")
    sizes = self.train_sizes
    if (not isinstance(sizes, (tuple, list)) or len(sizes) != 2
        or not all(_int(s) and s >= 1 for s in sizes) or sizes[0] > sizes[1]):
      raise ValueError(f"TaskConfig: train_sizes={sizes!r}; expected (lo, hi), "
                       "ints with 1 <= lo <= hi")
    evals = self.eval_sizes
    if (not isinstance(evals, (tuple, list))
        or not all(_int(s) and s >= 1 for s in evals)):
      raise ValueError(f"TaskConfig: eval_sizes={evals!r}; expected a tuple of "
                       "ints >= 1")
    options = self.options
    if not isinstance(options, Mapping) and not hasattr(options, "items"):
      raise ValueError(f"TaskConfig: options={options!r}; expected a mapping of "
                       "task options")
    options = dict(options.items())
    if not all(isinstance(k, str) for k in options):
      raise ValueError(f"TaskConfig: options={options!r}; expected str keys")
    object.__setattr__(self, "train_sizes", tuple(sizes))
    object.__setattr__(self, "eval_sizes", tuple(evals))
    object.__setattr__(self, "options", options)


def make_task(cfg: TaskConfig) -> Task:
  """The task ``cfg`` names, built with its options; its sizes are checked too.

  Raises:
    ValueError: an unknown option (the message lists the valid ones), a bad
      option value, or a train/eval size below the task's minimum.
  """
  if not isinstance(cfg, TaskConfig):
    raise ValueError(f"make_task: cfg={cfg!r}; expected a TaskConfig")
  cls = TASKS[cfg.name]
  valid = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(cfg.options) - set(valid))
  if unknown:
    raise ValueError(f"TaskConfig: options {unknown} are not options of "
                     f"{cfg.name!r}; expected some of {valid}")
  task = cls(**cfg.options)
  task.check_size(cfg.train_sizes[0], "train_sizes[0]")
  for i, size in enumerate(cfg.eval_sizes):
    task.check_size(size, f"eval_sizes[{i}]")
  return task


__all__ = ["TASKS", "Task", "TaskConfig", "TaskSource", "make_task"]
