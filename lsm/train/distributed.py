"""Multi-process runs on JAX's own distributed runtime.

One process per host (or per GPU under SLURM), all started by the cluster's
scheduler with the same command; ``jax.distributed.initialize`` connects them and
every jitted step then spans all their devices. This module decides whether to
initialise (``initialize``), and gives the loop the few cross-process agreements
it needs: the same config everywhere (``check_same_config``), a stop that every
process takes at the same step (``agree_any``), and barriers around file moves
that one process makes for all (``barrier``).

When to initialise (``mode="auto"``): an explicit coordinator address (flag or
``JAX_COORDINATOR_ADDRESS``), a SLURM step with more than one task, an Open MPI
job with more than one rank, or a TPU slice with more than one worker. Anything
else is a single-process run and ``jax.distributed`` is left alone.
``mode="on"`` always initialises and lets JAX detect the cluster (e.g. TPU VMs,
which JAX finds through their metadata server); ``mode="off"`` never does.
"""

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


class CoordinatorUnreachable(RuntimeError):
  """A worker could not connect to process 0's coordinator in time."""


class ProcessesDisagree(RuntimeError):
  """Processes of one run were started with different configs."""


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
  """How this process joins a multi-process run (flags of ``lsm-train``).

  Attributes:
    mode: "auto" (initialise when the environment says so), "on", "off".
    coordinator_address: "host:port" of process 0; None to take it from the
      environment (JAX_COORDINATOR_ADDRESS, SLURM, TPU, Open MPI).
    num_processes: processes in the run; with ``coordinator_address``.
    process_id: this process, in [0, num_processes); with ``coordinator_address``.
    timeout_s: seconds to wait for the coordinator and for every process to
      register; past it the run stops with an error.
  """
  mode: str = "auto"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = 300

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"distributed mode={self.mode!r}; expected one of {MODES}")
    if not isinstance(self.timeout_s, int) or self.timeout_s < 1:
      raise ValueError(f"distributed timeout_s={self.timeout_s!r}; expected a "
                       "positive int (seconds)")
    if self.coordinator_address is None:
      if self.num_processes is not None or self.process_id is not None:
        raise ValueError("num_processes / process_id were given without "
                         "coordinator_address; expected all three or none")
      return
    if self.mode == "off":
      raise ValueError(f"coordinator_address={self.coordinator_address!r} was "
                       "given with mode='off'; expected mode 'auto' or 'on'")
    host, _, port = self.coordinator_address.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"coordinator_address={self.coordinator_address!r}; "
                       "expected 'host:port'")
    n, i = self.num_processes, self.process_id
    if not isinstance(n, int) or n < 1:
      raise ValueError(f"num_processes={n!r} with coordinator_address; expected "
                       "a positive int")
    if not isinstance(i, int) or not 0 <= i < n:
      raise ValueError(f"process_id={i!r}; expected an int in [0, {n}) "
                       f"(num_processes={n})")


def _int(environ: Mapping[str, str], name: str) -> int:
  try:
    return int(environ.get(name, "1"))
  except ValueError:
    return 1


def detect(environ: Mapping[str, str] = os.environ) -> str | None:
  """The multi-process environment this process runs in, or None."""
  if environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  tasks = _int(environ, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in (
      environ) else _int(environ, "SLURM_NTASKS")
  if "SLURM_PROCID" in environ and tasks > 1:
    return f"SLURM ({tasks} tasks)"
  if _int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    return f"Open MPI ({environ['OMPI_COMM_WORLD_SIZE']} ranks)"
  workers = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(workers) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "TPU slice"
  return None


def _wait_for_coordinator(address: str, timeout_s: int, process_id: int):
  """Polls process 0's port: a clear error instead of JAX's abort on timeout."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise CoordinatorUnreachable(
            f"process {process_id}: could not reach the coordinator at {address} "
            f"within {timeout_s} s ({e}). Check that process 0 is running, that "
            f"it was given the same address, and that the port is open between "
            f"hosts (--distributed_timeout_s sets the wait).") from None
      time.sleep(0.5)


def initialize(options: DistributedOptions,
               environ: Mapping[str, str] = os.environ) -> bool:
  """Joins the multi-process run when there is one; True if it did.

  Must run before anything touches a JAX backend.
  """
  explicit = options.coordinator_address is not None
  reason = "--coordinator_address" if explicit else detect(environ)
  if options.mode == "off" or (options.mode == "auto" and reason is None):
    return False
  # CPU devices of different processes talk through gloo (a no-op elsewhere;
  # skipped on a JAX without the option, whose default is then in charge).
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:
    log.warning("this JAX has no jax_cpu_collectives_implementation option; "
                "CPU collectives across processes use its default")
  address, process_id = options.coordinator_address, options.process_id
  if explicit and process_id != 0:
    _wait_for_coordinator(address, options.timeout_s, process_id)
  log.info("joining a multi-process run (%s; coordinator %s, process %s of %s; "
           "waiting up to %d s for all processes)", reason or "mode=on",
           address or "from the environment",
           "?" if process_id is None else process_id,
           options.num_processes or "?", options.timeout_s)
  jax.distributed.initialize(coordinator_address=options.coordinator_address,
                             num_processes=options.num_processes,
                             process_id=options.process_id,
                             initialization_timeout=options.timeout_s)
  log.info("process %d of %d: %d local devices, %d in all", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def agree_any(flag: bool) -> bool:
  """True on every process if ``flag`` is True on any (a collective: every
  process must call it at the same point)."""
  if not is_multiprocess():
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def barrier(name: str):
  """Waits until every process reaches ``name`` (no-op in one process)."""
  if is_multiprocess():
    multihost_utils.sync_global_devices(name)


def _flatten(tree, prefix="") -> dict[str, object]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def gather_json(value) -> list:
  """``value`` (JSON-able) of every process, in process order (a collective:
  every process must call it at the same point)."""
  if not is_multiprocess():
    return [value]
  text = json.dumps(value, sort_keys=True).encode()
  # Padded to one length, since process_allgather stacks equal shapes.
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(text))))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(text)] = np.frombuffer(text, np.uint8)
  texts = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(texts[p, :lengths[p]])) for p in range(len(lengths))]


def check_same_config(config: Mapping) -> None:
  """Raises ProcessesDisagree on every process if any process's resolved
  config (a JSON-able dict) differs from process 0's, naming the fields."""
  if not is_multiprocess():
    return
  text = json.dumps(config, sort_keys=True).encode()
  digest = np.frombuffer(hashlib.sha256(text).digest()[:16], np.uint32)
  digests = np.asarray(multihost_utils.process_allgather(digest))
  if (digests == digests[0]).all():
    return
  # Gather the configs themselves to name what differs.
  configs = [_flatten(c) for c in gather_json(config)]
  lines = []
  for p, other in enumerate(configs[1:], start=1):
    keys = sorted(k for k in set(configs[0]) | set(other)
                  if configs[0].get(k) != other.get(k))
    if keys:
      fields = ", ".join(f"{k}: {configs[0].get(k)!r} vs {other.get(k)!r}"
                         for k in keys[:8])
      more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
      lines.append(f"process {p} differs from process 0 in {fields}{more}")
  raise ProcessesDisagree(
      "the processes of this run were started with different configs; start "
      "every process with the same --config, overrides and --workdir. "
      + "; ".join(lines))
