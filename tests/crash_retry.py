"""One retry for a test whose xdist worker died under it (pytest plugin,
loaded by tests/conftest.py).

A worker that dies (a fatal signal inside native code: XLA's CPU compiler or
runtime, LLVM) takes the test it was running with it, and xdist starts a new
worker. CI once lost a 23-minute run to one such crash in a test that passes
alone and in every other full run (2026-12-06: a SIGSEGV/SIGABRT-style
faulthandler dump with no Python frame of lsm). Here the crashed test runs
once more, on the new worker: a test that crashes again fails as before, and
the retry is never silent (reported "R" / RERUN, and listed at the end of the
run with the worker's crash). Failed assertions and errors are not retried:
only a worker's death.
"""

import pytest

RETRIES = 1
_crashes: dict[str, int] = {}


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
  """xdist's hook (controller side), called once per crashed test."""
  if _crashes.get(crashitem, 0) >= RETRIES:
    return None   # report it as failed, as xdist does
  _crashes[crashitem] = _crashes.get(crashitem, 0) + 1
  sched.mark_test_pending(crashitem)
  report.outcome = "rerun"
  return True


def pytest_report_teststatus(report, config):
  del config
  if report.outcome == "rerun":
    return "rerun", "R", ("RERUN", {"yellow": True})
  return None


def pytest_terminal_summary(terminalreporter):
  if _crashes:
    terminalreporter.section("worker crashes retried", sep="=", yellow=True)
    for nodeid, n in sorted(_crashes.items()):
      terminalreporter.line(f"{nodeid}: its worker crashed; retried {n}x "
                            "(the retry's result is in the totals)")
