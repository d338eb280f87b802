"""Choice of an op implementation from its ``impl=`` argument.

``"auto"`` resolves by platform (TPU -> pallas_tpu, GPU -> pallas_gpu, otherwise
chunked) among the impls an op supports, logs the choice once per (op, platform),
and never picks the reference. An explicit impl is returned unchanged or rejected;
it is never swapped for another.
"""

import functools
import logging
from collections.abc import Collection

import jax

_log = logging.getLogger("lsm.ops")

AUTO = "auto"
_PREFERENCE = {"tpu": ("pallas_tpu", "chunked"), "gpu": ("pallas_gpu", "chunked")}
_DEFAULT_PREFERENCE = ("chunked",)


def platform() -> str:
  """The default backend's platform name: "cpu", "gpu" or "tpu"."""
  name = jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


@functools.cache
def _log_choice(op: str, plat: str, name: str) -> None:
  _log.info("lsm.ops.%s: impl='auto' resolved to %r on %s", op, name, plat)


def resolve_impl(impl: str, *, supported: Collection[str], op: str) -> str:
  """Returns the impl name to run.

  Args:
    impl: the user's choice: "auto" or one of ``supported``.
    supported: impl names the op provides.
    op: the op's name, for messages.

  Raises:
    ValueError: ``impl`` is neither "auto" nor supported.
  """
  if impl == AUTO:
    plat = platform()
    for name in _PREFERENCE.get(plat, _DEFAULT_PREFERENCE):
      if name in supported:
        _log_choice(op, plat, name)
        return name
    raise ValueError(f"{op}: impl='auto' found no implementation for platform "
                     f"{plat!r} among {sorted(supported)}")
  if impl not in supported:
    raise ValueError(f"{op}: impl={impl!r} is not one of "
                     f"{sorted([AUTO, *supported])}")
  return impl


def pallas_kwargs(op: str, name: str, interpret) -> dict:
  """Extra keyword arguments for impl ``name``: ``interpret`` for the Pallas
  impls (always passed, so the kernels see one signature), nothing otherwise.

  Raises:
    ValueError: ``interpret`` was set for an impl that has no kernels.
  """
  if name.startswith("pallas"):
    return {"interpret": interpret}
  if interpret is not False:
    raise ValueError(f"{op}: interpret={interpret!r} applies to the Pallas impls "
                     f"only; impl resolved to {name!r}")
  return {}
