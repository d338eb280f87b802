"""When lsm-train joins a multi-process run, and its option errors (in process;
the real multi-process runs are in test_multiprocess.py)."""

import os
import pathlib
import subprocess

import pytest

from lsm.train import distributed
from lsm.train.distributed import DistributedOptions, detect


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "3"},
     "SLURM (16 tasks)"),
    # An allocation of 16 tasks running a one-task step (srun -n 1) is one process.
    ({"SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, None),
    # sbatch's batch script itself (no srun: no SLURM_PROCID) is one process.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI (4 ranks)"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "TPU slice"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_detect(environ, expected):
  assert detect(environ) == expected


def test_single_process_environments_do_not_initialize(monkeypatch):
  called = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda **kw: called.append(kw))
  assert not distributed.initialize(DistributedOptions(), environ={})
  assert not distributed.initialize(
      DistributedOptions(mode="off"),
      environ={"SLURM_NTASKS": "8", "SLURM_PROCID": "0"})
  assert called == []
  # In one process the agreements are the local values, and barriers pass.
  assert distributed.agree_any(True) and not distributed.agree_any(False)
  distributed.barrier("single")
  distributed.check_same_config({"a": 1})


@pytest.mark.parametrize("kw, match", [
    (dict(mode="sometimes"), "mode='sometimes'"),
    (dict(timeout_s=0), "timeout_s=0"),
    (dict(num_processes=2), "without coordinator_address"),
    (dict(coordinator_address="10.0.0.1"), "expected 'host:port'"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0),
     "num_processes=0"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2),
     r"process_id=2; expected an int in \[0, 2\)"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=0, mode="off"),
     "mode='off'"),
])
def test_option_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    DistributedOptions(**kw)


LAUNCH = pathlib.Path(__file__).resolve().parents[2] / "launch"


@pytest.mark.parametrize("script", ["local_multiprocess.sh", "slurm.sbatch",
                                    "tpu_vm.sh"])
def test_launchers_parse_and_start_with_their_usage(script):
  path = LAUNCH / script
  assert os.access(path, os.X_OK), f"{script} is not executable"
  subprocess.run(["bash", "-n", str(path)], check=True)
  header = path.read_text().split("\nset ")[0]
  assert "Usage" in header and "lsm-train" in header


@pytest.mark.parametrize("script, args", [("local_multiprocess.sh", ["two", "4"]),
                                          ("tpu_vm.sh", ["only-a-name"])])
def test_launchers_refuse_bad_arguments_with_their_usage(script, args):
  out = subprocess.run([str(LAUNCH / script), *args], capture_output=True,
                       text=True, timeout=30)
  assert out.returncode == 2
  assert "Usage" in out.stderr and "error: expected" in out.stderr
