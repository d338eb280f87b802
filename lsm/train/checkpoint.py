"""Checkpoints: an Orbax CheckpointManager holding, per step, the train state
(``state``), the data pipeline's position (``data_position``: every record
shard's iterator state, in one JSON that any process count can read) and the
run's record (``meta``: the whole resolved config and the process count), so a
resumed run continues on exactly the batches it would have seen, on the same or
another number of processes.

Restoring tells a damaged step from one that does not fit the run:

- A step whose files cannot be read (its metadata, or its arrays on restore:
  a missing or truncated file surfaces only then, with varying exception types)
  is damaged. It is skipped with a warning naming the step and moved to
  ``<workdir>/damaged_checkpoints/<step>`` once an older step restored: kept for
  inspection, never deleted, and out of the way of the step number the resumed
  run will save again. If every step is damaged, restoring raises
  ``AllCheckpointsDamaged`` naming them (nothing is moved), so a workdir holding
  checkpoints never silently starts again at step 0.
- A step that reads but was written by a run whose train state differs (the
  tree, shapes or dtypes of Orbax's metadata against this run's abstract state)
  or whose recorded settings change the state (the model section, the
  optimiser chain, the data position's layout) raises ``CheckpointMismatch``
  with one line per difference, before any array is read or file moved.
  Checkpoints written before the config was recorded (meta holds only
  ``model``) are compared on what they hold.
"""

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from lsm.data import pipeline
from lsm.models.lm import LMConfig
from lsm.train import distributed

log = logging.getLogger(__name__)

# Lines of a mismatch shown before "... and N more".
MAX_LINES = 24


class CheckpointMismatch(ValueError):
  """The workdir's checkpoints were written by a run this one cannot resume.

  ``lines`` holds one line per difference (config fields and state paths).
  """

  def __init__(self, header: str, lines: Sequence[str], footer: str):
    shown = list(lines[:MAX_LINES])
    if len(lines) > MAX_LINES:
      shown.append(f"... and {len(lines) - MAX_LINES} more")
    self.lines = [header, *[f"  {ln}" for ln in shown], footer]
    super().__init__("\n".join(self.lines))


# The name the trainer's callers know from before damage and mismatch were told
# apart.
ConfigMismatchError = CheckpointMismatch


class AllCheckpointsDamaged(ValueError):
  """Every checkpoint step in the workdir is unreadable."""


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


# Data settings that decide the sequence of training batches and the layout of
# the saved data position: a resume must read the same records the same way.
DATA_POSITION_FIELDS = (
    "source", "globs", "name", "text_key", "train_split", "document",
    "validation_fraction", "tokenizer", "tokenizer_path", "seq_len",
    "batch_size", "seed", "shuffle", "row_shuffle_window", "shards")


def _model_settings(model: Mapping) -> dict:
  """A recorded model section as it decides the model: fields recorded before
  they existed at their defaults, and options only of the mixers it uses (a
  config may carry options for every mixer)."""
  defaults = {}
  for field in dataclasses.fields(LMConfig):
    if field.default is not dataclasses.MISSING:
      defaults[field.name] = field.default
    elif field.default_factory is not dataclasses.MISSING:
      defaults[field.name] = field.default_factory()
  out = {**defaults, **model}
  used = {out.get("mixer"), *(out.get("pattern") or ())}
  out["mixer_kwargs"] = {k: v for k, v in (out.get("mixer_kwargs") or {}).items()
                         if k in used}
  return out


def settings_diff(saved: Mapping, current: Mapping) -> list[str]:
  """The recorded settings of ``saved`` (a checkpoint's meta) that change what
  ``current`` (this run's meta) would restore into, one line each."""
  lines = [f"model.{d}" for d in config_diff(
      _model_settings(saved.get("model", {})),
      _model_settings(current.get("model", {})))]
  old, new = saved.get("config"), current.get("config")
  if not old:  # written before the whole config was recorded
    return lines
  clip = [bool(c.get("optim", {}).get("clip_norm")) for c in (old, new)]
  if clip[0] != clip[1]:
    lines.append(
        f"optim.clip_norm: checkpoint has {old['optim'].get('clip_norm')!r}, "
        f"config has {new['optim'].get('clip_norm')!r} (the optimiser chain "
        f"{'loses' if clip[0] else 'gains'} its clipping part)")
  # A linearisation stage's state is not another stage's (lsm.train.linearize).
  lin_old, lin_new = old.get("linearize") or {}, new.get("linearize") or {}
  for field in ("stage", "student", "teacher"):
    if lin_old.get(field) != lin_new.get(field):
      lines.append(f"linearize.{field}: checkpoint has {lin_old.get(field)!r}, "
                   f"config has {lin_new.get(field)!r} (each linearisation "
                   "stage is its own run, in its own workdir)")
  data_old, data_new = old.get("data", {}), new.get("data", {})
  for field in DATA_POSITION_FIELDS:
    if field in data_old and _normal(data_old[field]) != _normal(
        data_new.get(field)):
      lines.append(f"data.{field}: checkpoint has {data_old[field]!r}, config "
                   f"has {data_new.get(field)!r} (the saved data position is "
                   "for the recorded pipeline)")
  return lines


def _key(entry) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _leaves(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{dotted path: (shape, dtype name)} of a tree of arrays or array metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not hasattr(leaf, "shape"):
      continue
    out[".".join(_key(p) for p in path)] = (tuple(leaf.shape),
                                            jax.numpy.dtype(leaf.dtype).name)
  return out


def _show(spec) -> str:
  shape, dtype = spec
  return f"{dtype}[{','.join(map(str, shape))}]"


def state_diff(saved_tree, abstract_state) -> list[str]:
  """The state paths whose presence, shape or dtype differ, one line each."""
  saved, want = _leaves(saved_tree), _leaves(abstract_state)
  lines = []
  for path in sorted(set(saved) | set(want)):
    if path not in want:
      lines.append(f"state.{path}: in the checkpoint ({_show(saved[path])}), "
                   "not in this run")
    elif path not in saved:
      lines.append(f"state.{path}: in this run ({_show(want[path])}), not in "
                   "the checkpoint")
    elif saved[path] != want[path]:
      lines.append(f"state.{path}: checkpoint has {_show(saved[path])}, this "
                   f"run has {_show(want[path])}")
  return lines


class Checkpointer:
  """Saves every ``every`` steps (asynchronously), keeps the last ``keep`` and
  every ``keep_period``-th; restores the newest readable step that fits.

  Nothing is written to disk until the first save (a refused run leaves a new
  workdir uncreated and an old one as it was).
  """

  def __init__(self, workdir: str | Path, *, every: int, keep: int,
               keep_period: int | None = None, async_save: bool = True):
    self.workdir = Path(workdir)
    self.directory = self.workdir / "checkpoints"
    self.every = every
    # The interval is kept here, not in Orbax's options, which also save the
    # first step of every run.
    self._options = dict(max_to_keep=keep, keep_period=keep_period,
                         enable_async_checkpointing=async_save)
    self.manager = self._open(create=False)
    self._writable = False

  def _open(self, *, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(create=create, **self._options)
    return ocp.CheckpointManager(self.directory.absolute(), options=options)

  def save(self, step: int, state, data_iter, meta: Mapping, *,
           force: bool = False) -> bool:
    """Saves if ``step`` is due (or ``force``); returns whether it saved.

    Every process calls it at the same steps (the data position is gathered
    across them). The position is read now, before the loop draws the next
    batch; the arrays are written in the background.
    """
    if not force and (not self.every or step % self.every):
      return False
    position = [s for states in distributed.gather_json(
        pipeline.shard_states(data_iter)) for s in states]
    if not self._writable:
      # Every process passes here at its first save (whether or not another
      # process has made the directory yet), so the barrier always pairs up.
      if jax.process_index() == 0:
        self.directory.mkdir(parents=True, exist_ok=True)
      distributed.barrier("lsm_checkpoint_dir")
      self.manager.close()
      self.manager = self._open(create=True)
      self._writable = True
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data_position=ocp.args.JsonSave(
                                  {"shards": position}),
                              meta=ocp.args.JsonSave(dict(meta)))
    return self.manager.save(step, args=args, force=True)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _read_meta(self, step: int) -> dict:
    meta = self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, Mapping):
      raise ValueError(f"meta is a {type(meta).__name__}, expected a dict")
    return dict(meta)

  def _read_tree(self, step: int):
    return ocp.StandardCheckpointHandler().metadata(
        self.directory.absolute() / str(step) / "state")

  def recorded(self) -> dict | None:
    """The meta of the newest step whose meta reads (None if there is none)."""
    for step in reversed(self.steps()):
      try:
        return self._read_meta(step)
      except Exception:  # pylint: disable=broad-except
        continue
    return None

  def restore(self, abstract_state, meta: Mapping, *, n_shards: int
              ) -> tuple[int, Any, list] | None:
    """(step, state, data position) from the newest readable step, or None
    when the workdir holds no checkpoint. Reads only: damaged steps newer than
    the restored one are moved aside once it restored.

    Args:
      abstract_state: this run's state as ShapeDtypeStructs with shardings.
      meta: this run's record (what ``save`` is given): ``model``, ``config``
        and ``process_count``.
      n_shards: the record shards this run reads (its ``data.shards``); the
        data position is their iterator states, in shard order (see
        ``pipeline.set_shard_states``).

    Raises:
      CheckpointMismatch: a readable step does not fit this run (nothing on
        disk is touched).
      AllCheckpointsDamaged: no step can be read (nothing is moved).
    """
    damaged: list[tuple[int, Exception]] = []
    for step in reversed(self.steps()):
      try:
        saved = self._read_meta(step)
        tree = self._read_tree(step)
      except Exception as e:  # pylint: disable=broad-except
        damaged.append((step, e))
        continue
      lines = settings_diff(saved, meta) + state_diff(tree, abstract_state)
      if lines:
        raise CheckpointMismatch(
            f"{self.directory} holds a checkpoint (step {step}) that this run "
            "cannot resume:", lines,
            "Use another --workdir, the recorded settings, or "
            "--config.train.start_fresh=True to archive the old run and start "
            "from step 0.")
      try:
        state, position = self._restore_arrays(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        damaged.append((step, e))
        continue
      if len(position) != n_shards:
        raise CheckpointMismatch(
            f"{self.directory} holds a checkpoint (step {step}) that this run "
            "cannot resume:",
            [f"data.shards: the checkpoint's data position holds "
             f"{len(position)} record shards, this run reads {n_shards}"],
            "Use the recorded data.shards, another --workdir, or "
            "--config.train.start_fresh=True.")
      for bad, error in damaged:
        self._quarantine(bad, error)
      if saved.get("row_layout", 1) != meta.get("row_layout", 1):
        # Written before documents started with the document-start token
        # (layout 1): the model resumes exactly, the data position lands
        # within a token or so of where the old code would have read.
        log.warning("checkpoint at step %d was written with packed-row layout "
                    "%s; this run packs rows with layout %s (lsm.data.pipeline."
                    "ROW_LAYOUT), so its batches are not those the old run "
                    "would have read next", step, saved.get("row_layout", 1),
                    meta.get("row_layout", 1))
      return step, state, position
    if damaged:
      raise AllCheckpointsDamaged(
          f"every checkpoint in {self.directory} is damaged: " + "; ".join(
              f"step {s} ({type(e).__name__}: {str(e)[:120]})"
              for s, e in damaged) + ". Nothing was moved; use another "
          "--workdir, or --config.train.start_fresh=True to archive them and "
          "start from step 0.")
    return None

  def _restore_arrays(self, step: int, abstract_state) -> tuple[Any, list]:
    step_dir = self.directory / str(step)
    if (step_dir / "data_position").is_dir():
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data_position=ocp.args.JsonRestore()))
      return out["state"], list(out["data_position"]["shards"])
    # Written before the data position was one JSON: each process wrote its
    # own iterator state (grain's process_<i>-of-<n>.json).
    files = sorted(step_dir.glob("data/process_*-of-*.json"),
                   key=lambda p: int(p.name.split("_")[1].split("-")[0]))
    if not files:
      raise FileNotFoundError(f"{step_dir} has no data position")
    position = []
    for f in files:
      local = json.loads(f.read_text())
      position += local["shards"] if "shards" in local else [local]
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return out["state"], position

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
                "(%s: %s); moved it to %s and resumed from an older step",
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
  names = ["checkpoints", "damaged_checkpoints", "metrics.jsonl", "tensorboard",
           "config.json"]
  present = [n for n in names if (workdir / n).exists()]
  if not present or jax.process_index() != 0:
    return None
  dest = workdir / "archive" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  dest.mkdir(parents=True, exist_ok=False)
  for name in present:
    shutil.move(str(workdir / name), str(dest / name))
  log.warning("start_fresh: moved the previous run's %s to %s", present, dest)
  return dest
