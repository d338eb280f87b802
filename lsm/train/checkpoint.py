"""Checkpoints: an Orbax CheckpointManager holding, per step, the train state
(``state``), the data iterator's position (``data``) and the run's model
config (``meta``), so a resumed run continues on exactly the batches it would have
seen, and a workdir can refuse a run whose model differs from its checkpoints.

Damaged steps (a missing or truncated file surfaces only on restore, with varying
exception types) are skipped with a warning naming the step, and moved to
``<workdir>/damaged_checkpoints/<step>``: kept for inspection, never deleted, and
out of the way of the step number the resumed run will save again.
"""

import logging
import shutil
import time
from collections.abc import Mapping
from typing import Any
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from lsm.data import pipeline
from lsm.train import distributed

log = logging.getLogger(__name__)


class ConfigMismatchError(ValueError):
  """The workdir's checkpoints were written by a run with another model."""


def config_diff(saved: Mapping, current: Mapping, prefix: str = "") -> list[str]:
  """Human-readable differences between two JSON-like config dicts."""
  out = []
  for key in sorted(set(saved) | set(current), key=str):
    name = f"{prefix}{key}"
    a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += config_diff(a, b, name + ".")
    elif _normal(a) != _normal(b):
      out.append(f"{name}: checkpoint has {a!r}, config has {b!r}")
  return out


def _normal(x):
  return [_normal(v) for v in x] if isinstance(x, (list, tuple)) else x


class Checkpointer:
  """Saves every ``every`` steps (asynchronously), keeps the last ``keep`` and
  every ``keep_period``-th; restores the newest readable step."""

  def __init__(self, workdir: str | Path, *, every: int, keep: int,
               keep_period: int | None = None, async_save: bool = True):
    self.workdir = Path(workdir)
    self.directory = self.workdir / "checkpoints"
    self.every = every
    # The interval is kept here, not in Orbax's options, which also save the
    # first step of every run.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period,
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory.absolute(),
                                         options=options)

  def save(self, step: int, state, data_iter, meta: Mapping, *,
           force: bool = False) -> bool:
    """Saves if ``step`` is due (or ``force``); returns whether it saved.

    The data iterator's position is read now (each process writes its own),
    before the loop draws the next batch; the arrays are written in the
    background.
    """
    if not force and (not self.every or step % self.every):
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=pipeline.iterator_save_args(data_iter),
                              meta=ocp.args.JsonSave(dict(meta)))
    return self.manager.save(step, args=args, force=True)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, abstract_state, model_meta: Mapping, data_iter
              ) -> tuple[int, Any] | None:
    """(step, state) from the newest readable step, or None; ``data_iter`` (a
    fresh iterator of the run's pipeline) is moved to the saved position.

    Raises:
      ConfigMismatchError: the newest readable step was written for another
        model (its ``meta.model`` differs from ``model_meta``).
    """
    for step in reversed(self.steps()):
      try:
        meta = self.manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # pylint: disable=broad-except
        self._quarantine(step, e)
        continue
      diff = config_diff(meta.get("model", {}), model_meta)
      if diff:
        raise ConfigMismatchError(
            f"{self.directory} holds a checkpoint (step {step}) of a different "
            "model:\n  " + "\n  ".join(f"model.{d}" for d in diff) +
            "\nUse another --workdir, or set --config.train.start_fresh=True to "
            "archive the old run and start from step 0.")
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=pipeline.iterator_restore_args(data_iter)))
      except Exception as e:  # pylint: disable=broad-except
        self._quarantine(step, e)
        continue
      return step, out["state"]
    return None

  def restore_state(self, abstract_state, step: int | None = None):
    """(step, state) of ``step`` (default: the newest), without the data
    iterator: for evaluation and analysis of a finished run."""
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    step = steps[-1] if step is None else step
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return step, out["state"]

  def _quarantine(self, step: int, error: Exception):
    dest = self.workdir / "damaged_checkpoints" / str(step)
    log.warning("checkpoint at step %d is damaged and cannot be restored "
                "(%s: %s); moving it to %s and trying the previous step",
                step, type(error).__name__, str(error)[:300], dest)
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      if dest.exists():
        dest = dest.with_name(f"{step}-{int(time.time())}")
      shutil.move(str(self.directory / str(step)), str(dest))
    distributed.barrier(f"lsm_quarantine_{step}")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def archive_run(workdir: str | Path) -> Path | None:
  """Moves a previous run's outputs into ``workdir/archive/<UTC time>/``.

  For ``train.start_fresh``: nothing is deleted. Returns the archive path, or
  None when there was nothing to move.
  """
  workdir = Path(workdir)
  names = ["checkpoints", "metrics.jsonl", "tensorboard", "config.json"]
  present = [n for n in names if (workdir / n).exists()]
  if not present or jax.process_index() != 0:
    return None
  dest = workdir / "archive" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  dest.mkdir(parents=True, exist_ok=False)
  for name in present:
    shutil.move(str(workdir / name), str(dest / name))
  log.warning("start_fresh: moved the previous run's %s to %s", present, dest)
  return dest
