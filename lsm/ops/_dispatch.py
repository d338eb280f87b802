"""Choice of an op implementation from its ``impl=`` argument, by capability.

Each impl states once, beside its kernels, what it accepts (an ``Accepts``:
platforms, input dtypes, head dims, chunk sizes, gate kinds, documents); an op
describes each call as a ``Call``. ``"auto"`` walks the platform's preference
order and takes the first impl that accepts the call, logging once per (op,
platform, shape class) which impls it skipped and why; it ends at "chunked" and
never picks the reference:

  TPU                          pallas_tpu, chunked
  NVIDIA sm_90 and newer       pallas_mosaic_gpu, pallas_triton, chunked
  NVIDIA sm_80 - sm_89         pallas_triton, chunked (the Mosaic GPU lowering
                               needs Hopper's TMA and wgmma)
  anything else (CPU, ROCm)    chunked

An explicit impl is checked against the same declaration and raises naming the
limit it hit; it is never swapped for another. ``"pallas_gpu"``, the Triton
impl's name before 2026-12, is accepted as an alias of ``"pallas_triton"`` (a
DeprecationWarning says so).

``assume_platform("gpu", "hopper")`` makes the choice as that platform would,
for tests and deviceless lowering (``jax.default_backend()`` stays "cpu" under
an abstract device).
"""

import contextlib
import contextvars
import dataclasses
import functools
import logging
import warnings
from collections.abc import Collection, Iterator, Mapping

import jax
import jax.numpy as jnp

_log = logging.getLogger("lsm.ops")

AUTO = "auto"
ALIASES = {"pallas_gpu": "pallas_triton"}
_PREFERENCE = {
    "tpu": ("pallas_tpu", "chunked"),
    "hopper": ("pallas_mosaic_gpu", "pallas_triton", "chunked"),
    "ampere": ("pallas_triton", "chunked"),
}
_DEFAULT_PREFERENCE = ("chunked",)
GATES = ("channel", "head", None)
_ASSUMED = contextvars.ContextVar("lsm_assumed_platform", default=None)


@contextlib.contextmanager
def assume_platform(plat: str, family: str = "other") -> Iterator[None]:
  """Within the block, ``platform()`` is ``plat`` and ``gpu_family()`` is
  ``family``: "auto" resolves as it would there (e.g. while lowering for
  ``("cuda",)`` on an abstract H100 from a CPU machine).

  Args:
    plat: "cpu", "gpu" or "tpu".
    family: for "gpu": "hopper", "ampere" or "other".
  """
  if plat not in ("cpu", "gpu", "tpu"):
    raise ValueError(f"assume_platform: plat={plat!r}; expected 'cpu', 'gpu' "
                     "or 'tpu'")
  if family not in ("hopper", "ampere", "other"):
    raise ValueError(f"assume_platform: family={family!r}; expected 'hopper', "
                     "'ampere' or 'other'")
  token = _ASSUMED.set((plat, family))
  try:
    yield
  finally:
    _ASSUMED.reset(token)


def platform() -> str:
  """The default backend's platform name: "cpu", "gpu" (CUDA or ROCm) or "tpu"
  (or the one ``assume_platform`` set)."""
  if _ASSUMED.get() is not None:
    return _ASSUMED.get()[0]
  name = jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


def gpu_family() -> str:
  """For the default backend: "hopper" (NVIDIA compute capability >= 9.0),
  "ampere" (8.x, pre-Hopper) or "other" (older NVIDIA, ROCm, not a GPU); or the
  one ``assume_platform`` set."""
  if _ASSUMED.get() is not None:
    return _ASSUMED.get()[1]
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


@dataclasses.dataclass(frozen=True)
class Call:
  """What one op call asks of an impl (hashable: a shape class for logging).

  Attributes:
    dtype: the inputs' dtype name ("float32", "bfloat16", "float16").
    K: key / query head dim.
    V: value head dim.
    chunk_size: the call's chunk length.
    gate: "channel" ([B, T, H, K] gates), "head" ([B, T, H]) or None.
    documents: whether the call carries segment_ids.
  """
  dtype: str
  K: int
  V: int
  chunk_size: int
  gate: str | None = None
  documents: bool = False

  @classmethod
  def of(cls, dtype, K: int, V: int, chunk_size: int, gate: str | None = None,
         documents: bool = False) -> "Call":
    return cls(jnp.dtype(dtype).name, int(K), int(V), int(chunk_size), gate,
               bool(documents))


def padded_pow2(n: int) -> int:
  """The head dim the Pallas kernels pad ``n`` to: a power of two >= 16."""
  return max(16, 1 << (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Accepts:
  """What an impl takes; None in a field means anything.

  Attributes:
    platforms: where "auto" may pick it: "cpu", "tpu", "gpu:hopper",
      "gpu:ampere", "gpu:other"; None for anywhere. An explicit impl is not held
      to it (interpret mode and deviceless lowering run anywhere).
    dtypes: input dtype names.
    dtype_note: why other dtypes are refused (part of the message).
    max_k: K (key / query head dim) up to this, after padding to
      ``padded_pow2``.
    max_v: V (value head dim) up to this, after the same padding.
    chunk_sizes: chunk lengths.
    chunk_note: why (part of the message).
    gates: gate kinds (see ``Call.gate``).
    documents: whether it takes segment_ids.
  """
  platforms: tuple[str, ...] | None = None
  dtypes: tuple[str, ...] | None = None
  dtype_note: str = ""
  max_k: int | None = None
  max_v: int | None = None
  chunk_sizes: tuple[int, ...] | None = None
  chunk_note: str = ""
  gates: tuple[str | None, ...] = GATES
  documents: bool = True

  def on(self, plat: str, family: str) -> bool:
    """Whether "auto" may pick the impl on (platform, gpu family)."""
    where = f"gpu:{family}" if plat == "gpu" else plat
    return self.platforms is None or where in self.platforms

  def refusal(self, call: Call) -> str | None:
    """None if the impl takes ``call``, else the limit it hits, as a phrase
    ("supports K up to 128; got K (key/query head dim) = 273")."""
    if self.dtypes is not None and call.dtype not in self.dtypes:
      return (f"takes {' or '.join(self.dtypes)} inputs; got {call.dtype}"
              + (f" ({self.dtype_note})" if self.dtype_note else ""))
    if self.chunk_sizes is not None and call.chunk_size not in self.chunk_sizes:
      want = (f"chunk_size={self.chunk_sizes[0]}" if len(self.chunk_sizes) == 1
              else f"chunk_size in {self.chunk_sizes}")
      note = f" ({self.chunk_note})" if self.chunk_note else ""
      return f"needs {want}{note}; got chunk_size={call.chunk_size}"
    for name, d, limit in (("K (key/query head dim)", call.K, self.max_k),
                           ("V (value head dim)", call.V, self.max_v)):
      if limit is not None and padded_pow2(d) > limit:
        return f"supports {name.split()[0]} up to {limit}; got {name} = {d}"
    if call.gate not in self.gates:
      return f"takes gates {self.gates}; got {call.gate!r}"
    if call.documents and not self.documents:
      return "does not take segment_ids yet"
    return None

  def check(self, op: str, impl: str, call: Call) -> None:
    """Raises ValueError naming the limit ``call`` hits, if any."""
    why = self.refusal(call)
    if why is not None:
      raise ValueError(f"{op}: impl={impl!r} {why}")


# The pure-JAX impls take every call.
ANYTHING = Accepts()


@functools.cache
def _log_choice(op: str, where: str, call: Call, name: str,
                skipped: tuple[tuple[str, str], ...]) -> None:
  if skipped:
    _log.info("lsm.ops.%s: impl='auto' on %s for %s skipped %s; took %r", op,
              where, call, "; ".join(f"{n} ({why})" for n, why in skipped),
              name)
  else:
    _log.info("lsm.ops.%s: impl='auto' resolved to %r on %s", op, name, where)


@functools.cache
def _warn_alias(impl: str) -> None:
  warnings.warn(f"impl={impl!r} is now called {ALIASES[impl]!r}; the old name "
                f"is an alias and will go", DeprecationWarning, stacklevel=4)


def resolve(op: str, impl: str, accepts: Mapping[str, Accepts],
            call: Call) -> str:
  """The impl to run for ``call``.

  Args:
    op: the op's name, for messages.
    impl: the user's choice: "auto", a name in ``accepts``, or an alias.
    accepts: every impl of the op and what it accepts.
    call: the call.

  Raises:
    ValueError: ``impl`` is unknown, or explicit and refuses ``call`` (the
      message names the limit).
  """
  if impl == AUTO:
    plat = platform()
    family = gpu_family() if plat == "gpu" else "other"
    where = plat if plat != "gpu" else f"gpu ({family})"
    skipped = []
    for name in preference(plat, family):
      if name not in accepts or not accepts[name].on(plat, family):
        continue
      why = accepts[name].refusal(call)
      if why is None:
        _log_choice(op, where, call, name, tuple(skipped))
        return name
      skipped.append((name, why))
    raise ValueError(f"{op}: impl='auto' found no implementation on {where} "
                     f"for {call}: " + "; ".join(f"{n}: {w}" for n, w in skipped))
  if impl in ALIASES and ALIASES[impl] in accepts:
    _warn_alias(impl)
    impl = ALIASES[impl]
  if impl not in accepts:
    raise ValueError(f"{op}: impl={impl!r} is not one of "
                     f"{sorted([AUTO, *accepts])}")
  accepts[impl].check(op, impl, call)
  return impl


def resolve_impl(impl: str, *, supported: Collection[str], op: str) -> str:
  """The impl name for ``impl`` among ``supported``, by platform only (no
  call to check; ``resolve`` is the capability-aware form the ops use)."""
  return resolve(op, impl, {n: ANYTHING for n in supported},
                 Call("float32", 16, 16, 64))


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
