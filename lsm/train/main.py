r"""``lsm-train``: train (or resume) a model from an ml-collections config.

lsm-train --config=configs/gla.py:smoke=True --workdir=/tmp/gla \
  --config.optim.lr=1e-3 --config.train.num_steps=200

(also ``python -m lsm.train``). The config is locked: a misspelt override key
or a value of the wrong type stops the run before anything starts. Every config
value, data source and the workdir are checked before anything is written:
bad input is one line (``lsm-train: error: model.n_heads=0: expected a positive
int``), exit code 2; ``--traceback`` adds the traceback. A run that finishes
prints a summary: final losses, throughput, where its files are, and the
``lsm-eval`` / ``lsm-generate`` / ``lsm-plot`` commands for it.

Several processes (hosts): start the same command in each; under SLURM, Open MPI
or a TPU slice it joins them through ``jax.distributed`` by itself, elsewhere
add ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``. See
lsm/train/distributed.py and launch/.
"""

import logging
import os
import shlex
import statistics
import sys
from pathlib import Path

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lsm.train import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config: configs/<file>.py[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, metrics, config.json. A run "
    "resumes from the newest checkpoint found here.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process runs (see lsm/train/distributed.py and launch/).
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Join a multi-process run through jax.distributed: auto (when SLURM, Open "
    "MPI, a TPU slice or --coordinator_address says so), on, off.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (with --num_processes "
    "and --process_id); otherwise taken from the cluster environment.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process, in [0, num_processes).")
_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s", 300, "Seconds to wait for the coordinator and for "
    "every process to join before stopping with an error.")
_SUMMARY = flags.DEFINE_boolean(
    "summary", True, "At the end, print the run's final losses, throughput, "
    "files and the commands that evaluate, sample and plot it.")
_SAMPLE_TOKENS = flags.DEFINE_integer(
    "sample_tokens", 0, "With the summary: also print a sample of this many "
    "tokens from the final model (text runs; 0 for none).", lower_bound=0)

PROG = "lsm-train"


def check_workdir(workdir: str) -> Path:
  """The workdir may exist (as a directory) or be creatable; nothing is made."""
  path = Path(workdir)
  if path.exists() and not path.is_dir():
    raise cli.UsageError(f"--workdir={workdir}: is a file; expected a directory "
                         "(created if missing)")
  parent = path.absolute()
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise cli.UsageError(f"--workdir={workdir}: {parent} is a file; expected a "
                         "directory path")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise cli.UsageError(f"--workdir={workdir}: {parent} is not writable; "
                         "expected a directory this user can write")
  return path


def check_config(config):
  """Every section, the data source, tokenizer and task, without writing
  anything (the trainer's own checks: ``loop.RunConfig.from_config`` and
  ``loop.check_inputs``); returns the typed RunConfig. Raises cli.UsageError
  (one line)."""
  from lsm.train import loop
  try:
    run = loop.RunConfig.from_config(config)
    loop.check_inputs(run)
  except ValueError as e:
    raise cli.UsageError(cli.one_line(e)) from None
  return run


def main(argv):
  cli.check_args(argv)
  # Orbax and grain log every file they write at INFO through absl; keep
  # theirs at WARNING and lsm's own at INFO.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("lsm").setLevel(logging.INFO)
  workdir = check_workdir(_WORKDIR.value)
  run = check_config(_CONFIG.value)
  import jax  # after the checks: bad input fails fast
  from lsm.train import distributed, loop
  distributed.initialize(distributed.DistributedOptions(
      mode=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
      timeout_s=_TIMEOUT.value))
  if jax.process_index() != 0:
    # Process 0 speaks for the run; the others only warn.
    logging.getLogger("lsm").setLevel(logging.WARNING)
  loop.train(_CONFIG.value, workdir)
  if _SUMMARY.value and jax.process_index() == 0:
    print(summary(workdir, run, sys.argv), flush=True)
    if _SAMPLE_TOKENS.value and run.data.source != "task":
      print(sample(workdir, _SAMPLE_TOKENS.value), flush=True)


def _command(*parts: str) -> str:
  return " ".join(shlex.quote(p) for p in parts)


def summary(workdir: Path, run, argv) -> str:
  """What the run reached and where its files are, with the commands that
  evaluate, sample and compare it."""
  from lsm.train.metrics import read_metrics
  records = read_metrics(workdir / "metrics.jsonl")
  train = [r for _, r in sorted(records.items()) if "loss" in r]
  evals = [(s, r) for s, r in sorted(records.items())
           if any(k.startswith("eval_") for k in r)]
  lines = ["", f"== run {workdir} =="]
  if train:
    last = train[-1]
    # The first record's rate includes compilation: report the median.
    rates = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    lines.append(f"step {last['step']}: train loss {last['loss']:.4f}"
                 + (f", {statistics.median(rates):,.0f} tokens/s (median)"
                    if rates else ""))
  if evals:
    step, rec = evals[-1]
    shown = {k: v for k, v in rec.items() if k.startswith("eval_") and
             (k.endswith("loss") or k.endswith("scaled_accuracy"))}
    lines.append(f"step {step}: " + ", ".join(
        f"{k.replace('_', ' ')} {v:.4f}" for k, v in sorted(shown.items())))
  if (workdir / "merged" / "config.json").is_file():
    lines.append(f"merged       {workdir / 'merged'} (the student, adapters "
                 "merged: evaluate it with --workdir there)")
  lines += [f"checkpoints  {workdir / 'checkpoints'}",
            f"metrics      {workdir / 'metrics.jsonl'}",
            f"tensorboard  tensorboard --logdir {workdir / 'tensorboard'}"]
  bin_dir = Path(argv[0]).parent if argv and "/" in argv[0] else None
  tool = lambda name: (str(bin_dir / name) if bin_dir and (  # noqa: E731
      bin_dir / name).exists() else name)
  lines.append("next:")
  lines.append("  " + _command(tool("lsm-eval"), f"--workdir={workdir}"))
  if run.data.source != "task":
    lines.append("  " + _command(tool("lsm-generate"), f"--workdir={workdir}",
                                 "--prompt=def ", "--max_new_tokens=200"))
  lines.append("  " + _command(tool("lsm-plot"), str(workdir), "--metric=loss",
                               f"--out={workdir / 'loss.png'}"))
  return "\n".join(lines)


def sample(workdir: Path, n_tokens: int, temperature: float = 0.8) -> str:
  """A sample of ``n_tokens`` from the newest checkpoint, starting a document."""
  import jax
  import numpy as np
  from lsm.models.decoding import generate
  from lsm.train import restore
  run = restore.open_run(workdir)
  prompt = run.tokenizer.encode_prompt()[None]   # [[document start]]
  out = generate(run.model, prompt, max_new_tokens=n_tokens,
                 key=jax.random.key(0), temperature=temperature, top_k=40)
  text = run.tokenizer.decode(np.asarray(out[0, 1:]))
  return (f"sample ({n_tokens} tokens, temperature {temperature}, top-k 40, "
          f"step {run.step}):\n{text}\n")


def _config_package_on_path(argv: list[str]):
  """Config files import their shared module as a package (``from configs import
  common``). ``python -m`` puts the working directory on sys.path, a console
  script does not: add the folder that holds the config's package, from any
  working directory."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = os.path.abspath(arg[len("--config="):].split(":", 1)[0])
      package = os.path.dirname(path)
      if os.path.exists(os.path.join(package, "__init__.py")):
        root = os.path.dirname(package)
        if root not in sys.path:
          sys.path.insert(0, root)


def run():
  _config_package_on_path(sys.argv)
  cli.run(main, PROG)


def linearize_main(argv):
  """``lsm-linearize``: lsm-train for configs with a linearize section
  (configs/linearize.py; lsm.train.linearize)."""
  if not _CONFIG.value or not _CONFIG.value.get("linearize"):
    raise cli.UsageError("--config has no linearize section; expected a "
                         "linearisation config such as configs/linearize.py "
                         "(lsm-train runs the others)")
  main(argv)


def run_linearize():
  _config_package_on_path(sys.argv)
  cli.run(linearize_main, "lsm-linearize")


if __name__ == "__main__":
  run()
