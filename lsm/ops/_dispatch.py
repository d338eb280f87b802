"""Choice of an op implementation from its ``impl=`` argument.

``"auto"`` resolves by platform among the impls an op supports, logs the choice
once per (op, platform), and never picks the reference:

  TPU                          pallas_tpu
  NVIDIA sm_90 and newer       pallas_mosaic_gpu, else pallas_triton
  NVIDIA sm_80 - sm_89         pallas_triton (the Mosaic GPU lowering needs
                               Hopper's TMA and wgmma)
  anything else (CPU, ROCm)    chunked

An explicit impl is returned unchanged or rejected; it is never swapped for
another. ``"pallas_gpu"``, the Triton impl's name before 2026-12, is accepted as
an alias of ``"pallas_triton"`` (a DeprecationWarning says so).
"""

import functools
import logging
import warnings
from collections.abc import Collection

import jax

_log = logging.getLogger("lsm.ops")

AUTO = "auto"
ALIASES = {"pallas_gpu": "pallas_triton"}
_PREFERENCE = {
    "tpu": ("pallas_tpu", "chunked"),
    "hopper": ("pallas_mosaic_gpu", "pallas_triton", "chunked"),
    "ampere": ("pallas_triton", "chunked"),
}
_DEFAULT_PREFERENCE = ("chunked",)


def platform() -> str:
  """The default backend's platform name: "cpu", "gpu" (CUDA or ROCm) or "tpu"."""
  name = jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


def gpu_family() -> str:
  """For the default backend: "hopper" (NVIDIA compute capability >= 9.0),
  "ampere" (8.x, pre-Hopper) or "other" (older NVIDIA, ROCm, not a GPU)."""
  if jax.default_backend() != "cuda":
    return "other"
  cc = getattr(jax.devices()[0], "compute_capability", "0.0")
  major = int(str(cc).split(".")[0])
  return "hopper" if major >= 9 else "ampere" if major == 8 else "other"


def preference(plat: str, family: str) -> tuple[str, ...]:
  """Impl names in the order ``"auto"`` tries them on (platform, gpu family)."""
  if plat == "gpu":
    return _PREFERENCE.get(family, _DEFAULT_PREFERENCE)
  return _PREFERENCE.get(plat, _DEFAULT_PREFERENCE)


@functools.cache
def _log_choice(op: str, plat: str, name: str) -> None:
  _log.info("lsm.ops.%s: impl='auto' resolved to %r on %s", op, name, plat)


@functools.cache
def _warn_alias(impl: str) -> None:
  warnings.warn(f"impl={impl!r} is now called {ALIASES[impl]!r}; the old name "
                f"is an alias and will go", DeprecationWarning, stacklevel=4)


def resolve_impl(impl: str, *, supported: Collection[str], op: str) -> str:
  """Returns the impl name to run.

  Args:
    impl: the user's choice: "auto", one of ``supported``, or an alias of one.
    supported: impl names the op provides.
    op: the op's name, for messages.

  Raises:
    ValueError: ``impl`` is neither "auto" nor supported.
  """
  if impl == AUTO:
    plat = platform()
    family = gpu_family() if plat == "gpu" else "other"
    for name in preference(plat, family):
      if name in supported:
        _log_choice(op, plat if plat != "gpu" else f"gpu ({family})", name)
        return name
    raise ValueError(f"{op}: impl='auto' found no implementation for platform "
                     f"{plat!r} among {sorted(supported)}")
  if impl in ALIASES and ALIASES[impl] in supported:
    _warn_alias(impl)
    return ALIASES[impl]
  if impl not in supported:
    raise ValueError(f"{op}: impl={impl!r} is not one of "
                     f"{sorted([AUTO, *supported])}")
  return impl


def interpret_mode(name: str, interpret):
  """``interpret=True`` as impl ``name``'s own interpret mode, so one test
  harness drives every Pallas impl: the Mosaic GPU interpreter
  (``plgpu.InterpretGPUParams()``: simulated SMEM, barriers, TMA) for
  "pallas_mosaic_gpu", TPU semantics (``pltpu.InterpretParams()``: VMEM and
  outputs NaN-filled until written) for "pallas_tpu", Pallas' generic
  interpreter for "pallas_triton" (Triton has none of its own). Any other value
  (False, or a backend's params object) is passed through."""
  if interpret is not True:
    return interpret
  # pylint: disable=g-import-not-at-top
  if name == "pallas_mosaic_gpu":
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu.InterpretGPUParams()
  if name == "pallas_tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams()
  return True


def pallas_kwargs(op: str, name: str, interpret) -> dict:
  """Extra keyword arguments for impl ``name``: ``interpret`` for the Pallas
  impls (always passed, so the kernels see one signature; True becomes the
  backend's own interpret mode, see ``interpret_mode``), nothing otherwise.

  Raises:
    ValueError: ``interpret`` was set for an impl that has no kernels.
  """
  if name.startswith("pallas"):
    return {"interpret": interpret_mode(name, interpret)}
  if interpret is not False:
    raise ValueError(f"{op}: interpret={interpret!r} applies to the Pallas impls "
                     f"only; impl resolved to {name!r}")
  return {}
