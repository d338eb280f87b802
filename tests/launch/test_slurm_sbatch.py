"""launch/slurm.sbatch under bash with a fake SLURM on PATH: a TERM that reaches
the batch shell (`--signal=B:TERM@...`, `scancel --batch`) gets to the tasks once,
and the shell waits for their checkpoint and returns their exit status.

The fakes follow SLURM's rules: `scancel --signal=TERM JOBID` signals the job's
steps (the tasks), not the batch step; srun answers a TERM sent to srun itself by
SIGKILLing its tasks (srun/srun_job.c: "forcing job termination"), so a script
that passes TERM to srun loses the checkpoint as surely as one that dies."""

import os
import pathlib
import signal
import subprocess
import textwrap
import time

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "launch" / "slurm.sbatch"

# One task: on TERM it "saves a checkpoint" (takes a moment) and exits 143, as
# lsm-train does after a signal.
FAKE_SRUN = """\
#!/usr/bin/env bash
echo "srun $*" >> "$FAKE/log"
bash -c 'trap "echo task:TERM >> \\"$FAKE/log\\"; sleep 1; echo task:checkpoint >> \\"$FAKE/log\\"; exit 143" TERM
         echo $$ > "$FAKE/task.pid"; while :; do sleep 0.05; done' &
task=$!
trap 'echo srun:TERM >> "$FAKE/log"; kill -KILL $task' TERM
while kill -0 $task 2>/dev/null; do wait $task; status=$?; done
exit $status
"""

FAKE_SCANCEL = """\
#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE/log"
[[ "$*" == "--signal=TERM $SLURM_JOB_ID" ]] && kill -TERM "$(cat "$FAKE/task.pid")"
exit 0
"""


def _start(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE=str(tmp_path),
             SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="1")
  with open(tmp_path / "stderr", "w") as err:  # a file: no pipe left open by the fakes
    shell = subprocess.Popen(
        ["bash", str(SCRIPT), "--config=configs/gla.py:smoke=True", "--workdir=w"],
        env=env, stdout=subprocess.DEVNULL, stderr=err,
        start_new_session=True)  # its own process group, for _stop_leftovers
  pid_file = tmp_path / "task.pid"
  deadline = time.monotonic() + 20
  while not (pid_file.exists() and pid_file.read_text().strip()):
    assert shell.poll() is None, (tmp_path / "stderr").read_text()
    assert time.monotonic() < deadline, "the fake task never started"
    time.sleep(0.05)
  return shell, int(pid_file.read_text())


def _stop_leftovers(shell):
  """Ends the fake srun and task if the shell left them running."""
  try:
    os.killpg(shell.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  shell.wait()


def test_term_to_the_batch_shell_reaches_the_tasks_and_waits_for_them(tmp_path):
  shell, _ = _start(tmp_path)
  try:
    shell.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    shell.send_signal(signal.SIGTERM)  # passed on once: a second stops lsm-train at once
    shell.wait(timeout=20)
    err = (tmp_path / "stderr").read_text()
    log = (tmp_path / "log").read_text().splitlines()
    assert log[0].startswith("srun --kill-on-bad-exit=1 ")
    assert log[0].endswith("-m lsm.train --distributed=auto "
                           "--config=configs/gla.py:smoke=True --workdir=w")
    # The tasks got the TERM (through scancel, not srun) and the shell ended only
    # after their checkpoint, with their exit status.
    assert log[1:] == ["scancel --signal=TERM 4242", "task:TERM",
                       "task:checkpoint"], (log, err)
    assert shell.returncode == 143, err
  finally:
    _stop_leftovers(shell)


def test_term_to_the_steps_alone_ends_the_shell_with_the_tasks_status(tmp_path):
  shell, task = _start(tmp_path)
  try:
    os.kill(task, signal.SIGTERM)  # as SLURM's --signal=TERM@120 to the steps
    shell.wait(timeout=20)
    err = (tmp_path / "stderr").read_text()
    log = (tmp_path / "log").read_text().splitlines()
    assert log[1:] == ["task:TERM", "task:checkpoint"], (log, err)
    assert shell.returncode == 143, err
  finally:
    _stop_leftovers(shell)
