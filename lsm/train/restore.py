"""A run reopened from its workdir, for evaluation, decoding and analysis.

``open_run(workdir)`` reads ``<workdir>/config.json`` (the resolved config the
trainer wrote), rebuilds the typed sections, and restores the newest (or a
given) checkpoint's parameters through the trainer's own restore
(``loop.load_model``), onto a mesh of the devices at hand: a run trained on
8 devices with fsdp=4 reopens on one CPU, and the other way round. Bad input
(no such directory, no config.json, no checkpoint, a step that was not kept)
raises ``cli.UsageError`` with one line naming it.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_collections

from lsm.data.pipeline import make_tokenizer_for
from lsm.train import checkpoint as ckpt_lib
from lsm.train import cli
from lsm.train import loop


@dataclasses.dataclass
class Run:
  """A restored run: its typed config, checkpoint step, model and tokenizer
  (None for synthetic-task runs, whose tokens are the task's)."""
  workdir: Path
  config: loop.RunConfig
  step: int
  model: Any
  tokenizer: Any


def check_workdir(workdir: str | None, flag: str = "--workdir") -> Path:
  """The workdir of a finished or running run (it must hold config.json)."""
  if not workdir:
    raise cli.UsageError(f"{flag} is missing; expected a run directory "
                         "written by lsm-train")
  path = Path(workdir)
  if not path.exists():
    raise cli.UsageError(f"{flag}={workdir}: no such directory; expected a run "
                         "directory written by lsm-train")
  if not path.is_dir():
    raise cli.UsageError(f"{flag}={workdir}: is a file; expected a run directory "
                         "written by lsm-train")
  if not (path / "config.json").is_file():
    raise cli.UsageError(f"{flag}={workdir}: has no config.json; expected a run "
                         "directory written by lsm-train")
  return path


def read_config(workdir: str | Path) -> tuple[ml_collections.ConfigDict,
                                               loop.RunConfig]:
  """config.json as a ConfigDict and as typed sections."""
  path = Path(workdir) / "config.json"
  try:
    raw = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise cli.UsageError(f"{path}: cannot be read as JSON ({cli.one_line(e)}); "
                         "expected the config.json lsm-train writes") from None
  if not raw.get("task"):
    raw.pop("task", None)
  try:
    run = loop.RunConfig.from_config(raw)
  except ValueError as e:
    raise cli.UsageError(f"{path}: {cli.one_line(e)}") from None
  return ml_collections.ConfigDict(raw), run


def checkpoint_steps(workdir: str | Path) -> list[int]:
  directory = Path(workdir) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def check_step(workdir: str | Path, step: int | None) -> int:
  """``step`` if the run kept a checkpoint there, else the newest; one-line
  errors otherwise."""
  steps = checkpoint_steps(workdir)
  if not steps:
    raise cli.UsageError(f"--workdir={workdir}: has no checkpoint; expected a "
                         "run that saved at least one (train.checkpoint_every, "
                         "or the end of the run)")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise cli.UsageError(f"--step={step}: no checkpoint at that step; expected "
                         f"one of {steps}")
  return step


def open_run(workdir: str | Path, step: int | None = None, *, devices=None) -> Run:
  """Restores a run's model at ``step`` (default: the newest checkpoint)."""
  workdir = check_workdir(str(workdir))
  config, run = read_config(workdir)
  step = check_step(workdir, step)
  # Any mesh: the parameters are laid out over the devices at hand with plain
  # data parallelism (replicated), whatever mesh the run trained on.
  config.mesh.shape = {"data": -1, "fsdp": 1, "seq": 1, "tensor": 1}
  try:
    step, model = loop.load_model(config, workdir, step=step, devices=devices)
  except ckpt_lib.ConfigMismatchError as e:
    raise cli.UsageError(cli.one_line(e)) from None
  tokenizer = None if run.data.source == "task" else make_tokenizer_for(run.data)
  return Run(workdir=workdir, config=run, step=step, model=model,
             tokenizer=tokenizer)
