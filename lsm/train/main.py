r"""``lsm-train``: train (or resume) a model from an ml-collections config.

lsm-train --config=configs/gla.py:smoke=True --workdir=/tmp/gla \
  --config.optim.lr=1e-3 --config.train.num_steps=200

(also ``python -m lsm.train``). The config is locked: a misspelt override key
or a value of the wrong type stops the run before anything starts.

Several processes (hosts): start the same command in each; under SLURM, Open MPI
or a TPU slice it joins them through ``jax.distributed`` by itself, elsewhere
add ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``. See
lsm/train/distributed.py and launch/.
"""

import logging
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

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


_started = False


def main(argv):
  global _started
  _started = True
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Orbax and grain log every file they write at INFO through absl; keep
  # theirs at WARNING and lsm's own at INFO.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("lsm").setLevel(logging.INFO)
  from lsm.train import distributed  # after flag parsing: a bad flag fails fast
  from lsm.train import loop
  distributed.initialize(distributed.DistributedOptions(
      mode=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
      timeout_s=_TIMEOUT.value))
  if jax.process_index() != 0:
    # Process 0 speaks for the run; the others only warn.
    logging.getLogger("lsm").setLevel(logging.WARNING)
  loop.train(_CONFIG.value, _WORKDIR.value)


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
  try:
    app.run(main)
  except (AttributeError, KeyError) as e:
    if _started:
      raise
    # ml_collections reports an override of a key the config does not have as
    # an AttributeError during flag parsing, before main; say so plainly.
    message = " ".join(str(e).replace("\\n", "\n").replace("\\'", "'")
                       .replace("'", "").split())
    print(f"FATAL Flags parsing error: a --config override names a key that "
          f"the config does not have: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
