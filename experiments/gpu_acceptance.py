r"""The accelerator matrix, and a one-call acceptance run on a lent GPU.

Run (repo root): ``bash experiments/gpu_acceptance.sh [OUT_DIR]`` on the GPU
machine, ``bash experiments/gpu_acceptance.sh --dry-run [OUT_DIR]`` here (the
same steps on CPU: interpret modes, tiny shapes, GPU-only steps skipped; every
such substitution is labelled "dry run" in the output). OUT_DIR defaults to
$OUT, else /tmp/lsm-gpu-acceptance.

The matrix (``build_matrix``; tests/ops/test_accelerator_matrix.py asserts it):
every mixer of ``lsm.layers.MIXERS`` x every size preset of ``configs.common.
SIZES`` x {float32, bfloat16} x {h100, a100, tpu, cpu}. For each (mixer, size,
dtype) a one-layer model built from ``configs.common.lm_run`` (so the head
shapes are the presets', whatever they are) is traced once, abstractly (B=1,
T=2 chunks, packed documents as the trainer feeds text), with every op call
recorded where the op hands it to an impl. Each recorded call is then resolved
for each target with ``_dispatch.resolve(op, "auto", ...)`` under
``assume_platform``, which is what the op itself does there (the choice is a
pure function of platform and call); the impls skipped on the way are kept with
the limit each hit. Distinct calls (op, impl, target, argument shapes and
dtypes) can be lowered fwd+bwd for their target through the op's public
function (``lower_call``): CUDA on an abstract H100 / A100, ``jax.export`` for
TPU, plain lowering on CPU.

The acceptance run (``main``), each step in its own process with a time limit,
writing under OUT_DIR:

  info      GPU (nvidia-smi), jax, python, torch, triton    info.txt
  tests     the gpu-marked kernel tests (pytest -m gpu)     tests.txt
  matrix    the matrix for this GPU's target                matrix.txt, matrix.json
  presets   every preset call class that resolves to a Pallas kernel on this
            GPU, fwd+bwd on the device, float32 (and bf16) against the float32
            reference, each output and gradient against its row of
            tests/numerics.py (chunked's error beside it)   presets.txt, presets.jsonl
  train     one train step of a small real model (gla + gated_delta_net layers,
            impl="auto", bf16 compute) against impl="chunked"  train.txt, train.json
  bench     experiments/bench_kernels.py at the design.md anchor shape
            (B=8, T=4096, H=16, D=128, bf16): kernels vs chunked  bench.txt
  summary   every step's status and time                    summary.json

At most 7.3 minutes on a GPU (the per-step limits in ``STEPS``, process
start-up included, add up to 440 s; a step at its limit is killed and marked
"timeout", and the next one runs). The presets step works through its call
classes in order (packed documents and bf16 first: the training path) and stops
taking new ones 25 s before its limit, listing those it left out. The GPU
machine needs lsm's Python dependencies beside jax (flax, optax,
ml_collections, absl-py, PyYAML; pytest and hypothesis for the tests step): the
info step lists what imports; experiments/gpu_acceptance.sh installs wheels
carried in .whl/.
"""

import argparse
import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lsm.ops import _dispatch

# target -> (platform, gpu family) as _dispatch.assume_platform takes them.
TARGETS = {"h100": ("gpu", "hopper"), "a100": ("gpu", "ampere"),
           "tpu": ("tpu", "other"), "cpu": ("cpu", "other")}
DTYPES = ("float32", "bfloat16")
LETTERS = {"pallas_mosaic_gpu": "M", "pallas_triton": "T", "pallas_tpu": "P",
           "chunked": "c", "reference": "r"}
# Arguments with a time axis (axis 1), by the ops' public names.
_TIME_ARGS = ("q", "k", "v", "log_g", "beta", "segment_ids", "a", "b", "x", "dt",
              "B", "C")


@functools.cache
def _apis() -> dict:
  """op name -> its api module, for every package lsm/ops/<op>/ whose api.py
  has the public function ``<op>``, ``_IMPLS`` and ``_ACCEPTS`` (gla,
  delta_rule, ssm_scan, selective_scan, ...: a new op joins the matrix by
  itself)."""
  # pylint: disable=g-import-not-at-top
  import pkgutil
  import lsm.ops
  out = {}
  for info in sorted(pkgutil.iter_modules(lsm.ops.__path__), key=lambda i: i.name):
    if not info.ispkg or info.name == "common":
      continue
    try:
      api = importlib.import_module(f"lsm.ops.{info.name}.api")
    except ModuleNotFoundError:
      continue
    if all(hasattr(api, a) for a in (info.name, "_IMPLS", "_ACCEPTS")):
      out[info.name] = api
  return out


def _public(op):
  return getattr(_apis()[op], op)


# ------------------------------------------------------------ op calls ---


def _abstract(x):
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return jax.ShapeDtypeStruct(tuple(x.shape), jnp.dtype(x.dtype))
  return x


def _describe(x) -> str:
  if isinstance(x, jax.ShapeDtypeStruct):
    return f"{x.dtype.name}{list(x.shape)}"
  return repr(x)


@dataclasses.dataclass(frozen=True)
class OpCall:
  """One op call as a model makes it: the op's public arguments (abstract
  arrays and static values, by name) and the ``_dispatch.Call`` it resolves."""
  op: str
  call: _dispatch.Call
  args: tuple[tuple[str, object], ...]

  @property
  def signature(self) -> str:
    """The arguments' names, shapes, dtypes and static values: what decides
    a lowering."""
    return " ".join(f"{n}={_describe(v)}" for n, v in self.args)

  def kwargs(self) -> dict:
    return dict(self.args)

  def without_documents(self) -> "OpCall":
    return OpCall(self.op, dataclasses.replace(self.call, documents=False),
                  tuple((n, v) for n, v in self.args if n != "segment_ids"))

  def with_length(self, T: int, H: int | None = None) -> "OpCall":
    """The call at sequence length T (and H heads when given, for the ops
    with [B, T, H, ...] inputs and [B, H, ...] states)."""
    def resize(name, v):
      if not isinstance(v, jax.ShapeDtypeStruct):
        return v
      shape = list(v.shape)
      if name in _TIME_ARGS:
        shape[1] = T
        if H is not None and len(shape) >= 3 and self.op in ("gla", "delta_rule"):
          shape[2] = H
      elif name == "h0" and H is not None and self.op in ("gla", "delta_rule"):
        shape[1] = H
      return jax.ShapeDtypeStruct(tuple(shape), v.dtype)
    return OpCall(self.op, self.call,
                  tuple((n, resize(n, v)) for n, v in self.args))

  def arrays(self) -> tuple[list[str], list[jax.ShapeDtypeStruct]]:
    names = [n for n, v in self.args if isinstance(v, jax.ShapeDtypeStruct)]
    return names, [dict(self.args)[n] for n in names]


def _public_args(op: str, call: _dispatch.Call, impl_fn, args, kwargs):
  """An impl's arguments, as recorded, -> the public function's named
  arguments: bound by the impl's signature, kept where the public function has
  a parameter of that name, ``resets`` back to ``segment_ids`` and head gates
  back to [B, T, H] where the op broadcast them over K."""
  bound = inspect.signature(impl_fn).bind(*args, **kwargs).arguments
  public = inspect.signature(_public(op)).parameters
  out = []
  for name, value in bound.items():
    if name == "resets" and value is not None:
      out.append(("segment_ids", jax.ShapeDtypeStruct(value.shape, jnp.int32)))
    elif name in public and name not in ("impl", "interpret"):
      if (op == "gla" and name == "log_g" and call.gate == "head"
          and value is not None and len(value.shape) == 4):
        value = jax.ShapeDtypeStruct(value.shape[:-1], value.dtype)
      out.append((name, value))
  return tuple(out)


@contextlib.contextmanager
def recording(calls: list) -> Iterator[None]:
  """Within the block, every op call (each op of ``_apis``) appends (``OpCall``, impl name) to ``calls`` as the op hands
  it to the impl it resolved: ``_dispatch.resolve`` gives the ``Call``, the
  impl's entry in the op's ``_IMPLS`` the arguments."""
  apis = _apis()
  pending = []
  resolve = _dispatch.resolve

  def resolve_and_note(op, impl, accepts, call):
    name = resolve(op, impl, accepts, call)
    pending.append((op, call))
    return name

  def recorder(op, name, fn):
    @functools.wraps(fn)
    def impl(*args, **kwargs):
      got, call = pending.pop()
      assert got == op, (got, op)
      calls.append((OpCall(op, call, _public_args(
          op, call, fn, jax.tree.map(_abstract, args),
          jax.tree.map(_abstract, kwargs))), name))
      return fn(*args, **kwargs)
    return impl

  saved = {op: dict(api._IMPLS) for op, api in apis.items()}
  try:
    _dispatch.resolve = resolve_and_note
    for op, api in apis.items():
      for name, fn in saved[op].items():
        api._IMPLS[name] = recorder(op, name, fn)
    yield
  finally:
    _dispatch.resolve = resolve
    for op, api in apis.items():
      api._IMPLS.update(saved[op])


# ------------------------------------------------------------- presets ---


def preset_config(mixer: str, size: str, **overrides):
  """``LMConfig`` of ``configs.common.lm_run("mixer=...,size=...")``'s model
  section, with ``overrides`` (e.g. n_layers=1)."""
  # pylint: disable=g-import-not-at-top
  from configs import common
  from lsm.models.lm import LMConfig
  model = dict(common.lm_run(f"mixer={mixer},size={size}").model)
  model.update(overrides)
  return LMConfig(**model)


def _abstract_model(cfg):
  # pylint: disable=g-import-not-at-top
  from flax import nnx
  from lsm.layers import precision
  from lsm.models.lm import LanguageModel

  def build():
    return nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  graphdef, params = nnx.eval_shape(build)
  return graphdef, nnx.to_pure_dict(params), precision.float32_mask(params)


def model_calls(cfg, dtype: str, *, batch: int = 1, length: int | None = None,
                documents: bool = True) -> list[OpCall]:
  """The op calls of ``cfg``'s forward pass with ``dtype`` compute (the
  trainer's cast: lsm.train.step.cast_params), traced abstractly; with packed
  documents (segment_ids and positions) as the trainer feeds text rows."""
  # pylint: disable=g-import-not-at-top
  from flax import nnx
  from lsm.train import step as step_lib
  graphdef, params, mask = _abstract_model(cfg)
  length = length or 2 * cfg.chunk_size

  def forward(params, tokens, ids):
    model = nnx.merge(graphdef, step_lib.cast_params(params, mask,
                                                     jnp.dtype(dtype)))
    kw = dict(segment_ids=ids, positions=ids) if documents else {}
    return model(tokens, **kw)[0]

  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  calls = []
  with recording(calls):
    jax.eval_shape(forward, params, tokens, tokens)
  return [c for c, _ in calls]


# -------------------------------------------------------------- matrix ---


@dataclasses.dataclass(frozen=True)
class Choice:
  """What "auto" does with one call on one target."""
  impl: str
  skipped: tuple[tuple[str, str], ...]  # (impl, the limit it hit)


def choose(op: str, call: _dispatch.Call, target: str) -> Choice:
  """``impl="auto"``'s choice for ``call`` on ``target`` (raises ValueError as
  the op would when nothing takes it), with the impls it passed over."""
  accepts = _apis()[op]._ACCEPTS
  plat, family = TARGETS[target]
  with _dispatch.assume_platform(plat, family):
    impl = _dispatch.resolve(op, "auto", accepts, call)
  skipped = []
  for name in _dispatch.preference(plat, family):
    if name == impl:
      break
    if name in accepts and accepts[name].on(plat, family):
      skipped.append((name, accepts[name].refusal(call)))
  return Choice(impl, tuple(skipped))


@dataclasses.dataclass(frozen=True)
class Entry:
  """One op call of one (mixer, size, dtype) case on one target."""
  mixer: str
  size: str
  dtype: str
  target: str
  call: OpCall
  choice: Choice


@dataclasses.dataclass
class Matrix:
  entries: list[Entry]
  mixers: tuple[str, ...]
  sizes: tuple[str, ...]
  dtypes: tuple[str, ...]
  targets: tuple[str, ...]
  # (mixer, size, dtype) that make no op call (softmax attention).
  no_calls: list[tuple[str, str, str]]

  @property
  def n_cases(self) -> int:
    return (len(self.mixers) * len(self.sizes) * len(self.dtypes)
            * len(self.targets))

  def distinct(self, *, documents: bool | None = None
               ) -> dict[tuple[str, str, str, str], Entry]:
    """Distinct (op, impl, target, signature) -> the first entry making it.
    ``documents``: only the calls with (True) or without (False) segment_ids;
    None for both."""
    out = {}
    for e in self.entries:
      if documents is not None and e.call.call.documents != documents:
        continue
      out.setdefault((e.call.op, e.choice.impl, e.target, e.call.signature), e)
    return out

  def table(self, targets: Sequence[str] = ("h100", "a100", "tpu")) -> str:
    """One row per (mixer, op), one column per (target, dtype), one letter
    per size in ``sizes`` order (the calls with documents): M
    pallas_mosaic_gpu, T pallas_triton, P pallas_tpu, c chunked."""
    cols = [(t, d) for t in targets if t in self.targets for d in self.dtypes]
    cell = {}
    for e in self.entries:
      if e.call.call.documents:
        key = (e.mixer, e.call.op, e.target, e.dtype, e.size)
        letter = LETTERS[e.choice.impl]
        # a mixer with two calls of one op on different impls shows "?"
        cell[key] = letter if cell.get(key, letter) == letter else "?"
    rows = sorted({(m, o) for (m, o, *_) in cell},
                  key=lambda r: (self.mixers.index(r[0]), r[1]))
    head = f"{'mixer':<16}{'op':<15}" + " ".join(
        f"{t + ' ' + ('f32' if d == 'float32' else 'bf16'):<9}" for t, d in cols)
    lines = [head.rstrip()]
    for m, o in rows:
      cells = ["".join(cell.get((m, o, t, d, s), "-") for s in self.sizes)
               for t, d in cols]
      lines.append((f"{m:<16}{o:<15}" + " ".join(f"{c:<9}" for c in cells)
                    ).rstrip())
    return "\n".join(lines)

  def fallbacks(self) -> list[str]:
    """Every (op, target, dtype, Call) where "auto" passed over a Pallas
    kernel, with the limit it hit and the presets that make the call."""
    groups = {}
    for e in self.entries:
      if e.choice.skipped and e.call.call.documents:
        key = (e.call.op, e.target, e.call.call, e.choice)
        groups.setdefault(key, []).append(f"{e.mixer}/{e.size}")
    lines = []
    for (op, target, call, choice), who in sorted(
        groups.items(), key=lambda kv: (kv[0][1], kv[0][0], str(kv[0][2]))):
      why = "; ".join(f"{n}: {w}" for n, w in choice.skipped)
      lines.append(f"{target} {op} {call.dtype} K={call.K} V={call.V} -> "
                   f"{choice.impl} ({why}) [{', '.join(dict.fromkeys(who))}]")
    return lines

  def summary(self) -> str:
    n_calls = len(self.entries)
    by_impl = {}
    for (_, impl, target, _), _ in self.distinct().items():
      by_impl[(target, impl)] = by_impl.get((target, impl), 0) + 1
    lines = [f"{self.n_cases} (mixer, size, dtype, target) cases, {n_calls} op "
             f"calls, {len(self.distinct())} distinct (op, impl, target, "
             f"shapes) calls ({len(self.distinct(documents=True))} with "
             f"documents)",
             "distinct calls per target and impl: " + ", ".join(
                 f"{t} {i} {n}" for (t, i), n in sorted(by_impl.items())),
             "no op calls: " + (", ".join(sorted({m for m, *_ in self.no_calls}))
                                or "none")]
    return "\n".join(lines)


def build_matrix(mixers: Sequence[str] | None = None,
                 sizes: Sequence[str] | None = None,
                 dtypes: Sequence[str] = DTYPES,
                 targets: Sequence[str] = tuple(TARGETS)) -> Matrix:
  """Every (mixer, size, dtype) traced once (one layer, B=1, T=2 chunks, with
  documents; the calls without documents derived by dropping segment_ids),
  every call resolved for every target. Raises ValueError where "auto" finds
  no impl."""
  # pylint: disable=g-import-not-at-top
  from configs import common
  from lsm import layers
  mixers = tuple(mixers or layers.MIXERS)
  sizes = tuple(sizes or common.SIZES)
  entries, no_calls = [], []
  for mixer in mixers:
    for size in sizes:
      cfg = preset_config(mixer, size, n_layers=1)
      for dtype in dtypes:
        calls = model_calls(cfg, dtype)
        if not calls:
          no_calls.append((mixer, size, dtype))
        for c in calls:
          for variant in (c, c.without_documents()):
            for target in targets:
              entries.append(Entry(mixer, size, dtype, target, variant,
                                   choose(variant.op, variant.call, target)))
  return Matrix(entries, mixers, sizes, tuple(dtypes), tuple(targets), no_calls)


# ------------------------------------------------------------- lowering ---


def _fwd_bwd(op: str, impl: str, call: OpCall, interpret=False):
  """fn(float arrays, other arrays, cotangents) -> (outputs, input grads)
  through the op's public function with ``impl``; and the abstract inputs."""
  names, arrays = call.arrays()
  diff = [n for n, a in zip(names, arrays) if jnp.issubdtype(a.dtype, jnp.floating)]
  rest = [n for n in names if n not in diff]
  static = {n: v for n, v in call.args if n not in names}
  fn = _public(op)
  extra = {"interpret": interpret} if interpret is not False else {}

  def forward(*xs, other):
    return fn(**dict(zip(diff, xs)), **dict(zip(rest, other)), **static,
              impl=impl, **extra)

  def run(xs, other, cts):
    out, pullback = jax.vjp(functools.partial(forward, other=other), *xs)
    return out, pullback(cts)

  by_name = dict(zip(names, arrays))
  xs = [by_name[n] for n in diff]
  other = [by_name[n] for n in rest]
  outs = jax.eval_shape(lambda xs, other: forward(*xs, other=other), xs, other)
  return run, (xs, other, outs), diff


def lower_call(call: OpCall, impl: str, target: str) -> str:
  """The op call with ``impl``, forward and backward (``jax.vjp``), lowered
  for ``target``: CUDA on an abstract GPU, ``jax.export`` for TPU, CPU.
  Returns the module text."""
  # pylint: disable=g-import-not-at-top
  from lsm.ops.common import cuda_targets
  run, args, _ = _fwd_bwd(call.op, impl, call)
  plat, family = TARGETS[target]
  with _dispatch.assume_platform(plat, family):
    if plat == "gpu":
      return cuda_targets.lower_for_cuda(run, *args, target=target).as_text()
    if plat == "tpu":
      return jax.export.export(jax.jit(run), platforms=["tpu"])(*args).mlir_module()
    return jax.jit(run).trace(*args).lower().as_text()


# Custom calls of each Pallas impl in a lowering (text).
KERNEL_MARKS = {"pallas_triton": "__gpu$xla.gpu.triton",
                "pallas_mosaic_gpu": "mosaic_gpu", "pallas_tpu": "tpu_custom_call"}


def model_train_step(target: str, *, mixers=("gla", "gated_delta_net"),
                     size: str = "20m", batch: int = 1, length: int | None = None,
                     impl: str = "auto", compute_dtype: str = "auto"):
  """(step fn, abstract state, abstract batch, compute dtype) of one train step
  (lsm.train.step.make_train_step) of a ``len(mixers)``-layer model of the
  ``size`` preset with those mixers, for ``target``: "auto" compute is what it
  is on that platform (bf16 on GPU and TPU)."""
  # pylint: disable=g-import-not-at-top
  from lsm.parallel.mesh import MeshConfig, make_mesh
  from lsm.train import optim
  from lsm.train import state as state_lib
  from lsm.train import step as step_lib
  cfg = preset_config(mixers[0], size, n_layers=len(mixers), pattern=tuple(mixers),
                      impl=impl)
  dtype = step_lib.resolve_compute_dtype(compute_dtype, TARGETS[target][0])
  tx, schedule = optim.make_optimizer(optim.OptimConfig(), 10,
                                      state_lib.float32_mask(cfg))
  setup = state_lib.build(cfg, tx, make_mesh(MeshConfig(), jax.devices()[:1]),
                          None)
  step = step_lib.make_train_step(setup, schedule, compute_dtype=dtype)
  state = jax.tree.map(_abstract, setup.abstract_state)
  length = length or 2 * cfg.chunk_size
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  batch_ = {"inputs": tokens, "targets": tokens, "segment_ids": tokens,
            "positions": tokens,
            "mask": jax.ShapeDtypeStruct((batch, length), jnp.bool_)}
  return step, state, batch_, dtype, cfg


def lower_train_step(target: str, **kwargs
                     ) -> tuple[str, list[tuple[OpCall, str]], str]:
  """One train step lowered for ``target`` (module text), the op calls it
  made with the impl each resolved to there, and its compute dtype."""
  # pylint: disable=g-import-not-at-top
  from lsm.ops.common import cuda_targets
  step, state, batch, dtype, _ = model_train_step(target, **kwargs)
  plat, family = TARGETS[target]
  calls = []
  with _dispatch.assume_platform(plat, family), recording(calls):
    if plat == "gpu":
      text = cuda_targets.lower_for_cuda(step, state, batch,
                                         target=target).as_text()
    elif plat == "tpu":
      text = jax.export.export(jax.jit(step), platforms=["tpu"])(
          state, batch).mlir_module()
    else:
      text = jax.jit(step).trace(state, batch).lower().as_text()
  return text, calls, dtype


# ------------------------------------------------- device checks: presets ---


def this_target(dry_run: bool) -> str:
  """The matrix target of this machine's GPU ("h100" for Hopper and newer,
  "a100" for sm_80 - sm_89); "h100" in a dry run."""
  if dry_run:
    return "h100"
  family = _dispatch.gpu_family()
  if family not in ("hopper", "ampere"):
    raise SystemExit(f"no Hopper or Ampere GPU here ({jax.devices()[0]}); "
                     "use --dry-run on CPU")
  return "h100" if family == "hopper" else "a100"


def kernel_classes(matrix: Matrix, target: str) -> list[tuple[tuple, list[Entry]]]:
  """The preset calls that resolve to a Pallas kernel on ``target``, grouped
  by (op, impl, dtype, K, V, gate, documents): what the kernels see besides
  B, T and H. In checking order: with documents first (the training path),
  bf16 before float32, Mosaic GPU before Triton, small head dims first."""
  groups = {}
  for e in matrix.entries:
    if e.target == target and e.choice.impl in KERNEL_MARKS:
      c = e.call.call
      key = (e.call.op, e.choice.impl, c.dtype, c.K, c.V, c.gate, c.documents)
      groups.setdefault(key, []).append(e)
  order = lambda kv: (not kv[0][6], kv[0][2] != "bfloat16",  # noqa: E731
                      kv[0][1] != "pallas_mosaic_gpu", kv[0][3] * kv[0][4],
                      kv[0][0])
  return sorted(groups.items(), key=order)


def make_inputs(call: OpCall, seed: int = 0) -> dict:
  """Concrete inputs of ``call``'s shapes and dtypes, by name, in the ranges
  the layers produce: q, k, v ~ N(0, 1) (k L2-normalised for the delta rule),
  log gates log_sigmoid(N(0, 1) + 2) / 16, beta sigmoid(N(0, 1)), h0 ~
  N(0, 0.1), segment_ids with a few documents per row."""
  names, arrays = call.arrays()
  keys = dict(zip(names, jax.random.split(jax.random.key(seed), len(names))))
  out = {}
  for name, a in zip(names, arrays):
    key = keys[name]
    if name == "segment_ids":
      B, T = a.shape
      starts = jax.random.uniform(key, (B, T)) < 4.0 / T
      starts = starts.at[:, T // 3].set(True)
      out[name] = jnp.cumsum(starts, axis=1).astype(a.dtype)
      continue
    x = jax.random.normal(key, a.shape, jnp.float32)
    if name == "log_g":
      x = jax.nn.log_sigmoid(x + 2.0) / 16
    elif name == "beta":
      x = jax.nn.sigmoid(x)
    elif name == "h0":
      x = 0.1 * x
    elif name == "k" and call.op == "delta_rule":
      x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    out[name] = x.astype(a.dtype)
  return out


def check_call(call: OpCall, impl: str, *, interpret=False, chunked: bool = True,
               seed: int = 0) -> dict:
  """``call`` with ``impl`` forward and backward (random cotangents) against
  the float32 reference on the same values upcast, each output against its
  row of tests/numerics.py; with "chunked"'s errors beside (and held to its
  rows) when ``chunked``. Returns a json-able record (``ok`` says whether all
  were within their rows)."""
  from tests import numerics  # pylint: disable=g-import-not-at-top
  inputs = make_inputs(call, seed)
  dtype = inputs["q"].dtype.name if "q" in inputs else call.call.dtype

  def outputs(name, values, interp=False):
    run, (xs, other, outs), diff = _fwd_bwd(call.op, name, _with_dtypes(
        call, values), interpret=interp)
    ks = jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(outs)))
    cts = jax.tree.unflatten(jax.tree.structure(outs), [
        jax.random.normal(k, o.shape, jnp.float32).astype(o.dtype)
        for k, o in zip(ks, jax.tree.leaves(outs))])
    if name == "reference":
      cts = jax.tree.map(lambda c: c.astype(jnp.float32), cts)
    xs = [values[n] for n in diff]
    other_ = [values[n] for n in call.arrays()[0] if n not in diff]
    out, grads = jax.jit(run)(xs, other_, cts)
    return (("o", "h_t", *(f"d{n}" for n in diff)),
            (*jax.tree.leaves(out), *grads))

  start = time.perf_counter()
  names, got = outputs(impl, inputs, interpret)
  f32 = {n: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
         else x for n, x in inputs.items()}
  _, want = outputs("reference", f32)
  record = {"impl": impl, "dtype": dtype, "ok": True, "errors": {},
            "signature": call.signature}
  impls = [(impl, got)]
  if chunked:
    impls.append(("chunked", outputs("chunked", inputs)[1]))
  for name, values in impls:
    errs = {}
    for out_name, a, e in zip(names, values, want):
      rms, mx = numerics.errors(a, e)
      tol = numerics.tolerance(name, dtype, out_name)
      ok = rms <= tol and mx <= numerics.GUARD * tol
      errs[out_name] = {"rms": rms, "max": mx, "tol": tol, "ok": ok}
      record["ok"] &= ok
    record["errors"][name] = errs
  jax.block_until_ready(got)
  record["seconds"] = round(time.perf_counter() - start, 2)
  return record


def _with_dtypes(call: OpCall, values: dict) -> OpCall:
  """``call`` with its array arguments' dtypes taken from ``values``."""
  return OpCall(call.op, call.call, tuple(
      (n, jax.ShapeDtypeStruct(v.shape, values[n].dtype)
       if isinstance(v, jax.ShapeDtypeStruct) else v) for n, v in call.args))


def _write_matrix(matrix: Matrix, out: str, target: str) -> None:
  with open(os.path.join(out, "matrix.txt"), "w") as f:
    f.write(f"{matrix.summary()}\n\n{matrix.table(targets=(target,))}\n\n"
            "passed over a kernel:\n" + "\n".join(matrix.fallbacks()) + "\n")
  with open(os.path.join(out, "matrix.json"), "w") as f:
    json.dump([{"mixer": e.mixer, "size": e.size, "dtype": e.dtype,
                "target": e.target, "op": e.call.op, "impl": e.choice.impl,
                "call": dataclasses.asdict(e.call.call),
                "signature": e.call.signature,
                "skipped": [list(s) for s in e.choice.skipped]}
               for e in matrix.entries], f, indent=1)


def run_presets(out: str, dry_run: bool, budget_s: float) -> int:
  """The presets step (module docstring). Returns the number of failures."""
  start = time.perf_counter()
  target = this_target(dry_run)
  label = "DRY RUN (CPU): " if dry_run else ""
  matrix = build_matrix(targets=(target,))
  _write_matrix(matrix, out, target)
  print(f"{label}matrix for {target}:\n{matrix.summary()}\n"
        f"{matrix.table(targets=(target,))}", flush=True)
  classes = kernel_classes(matrix, target)
  if dry_run:
    # One class per impl, the smallest, at H=1 in interpret mode: a test of
    # the step, not of the kernels.
    seen, picked = set(), []
    for key, entries in sorted(classes, key=lambda kv: kv[0][3] * kv[0][4]):
      if key[1] not in seen and key[6]:
        seen.add(key[1])
        picked.append((key, entries))
    classes = picked
  failures, done = 0, 0
  with open(os.path.join(out, "presets.jsonl"), "w") as f:
    for i, (key, entries) in enumerate(classes):
      if time.perf_counter() - start > budget_s:
        left = [f"{k[0]} {k[1]} {k[2]} K={k[3]} V={k[4]} docs={k[6]}"
                for k, _ in classes[i:]]
        print(f"left out (budget {budget_s:.0f} s): {len(left)} classes: "
              + "; ".join(left), flush=True)
        f.write(json.dumps({"left_out": left}) + "\n")
        break
      op, impl, dtype, K, V, gate, documents = key
      # The smallest preset of the class, at B=1, T = 2.5 chunks (a ragged
      # tail), at most 2 heads (1 in a dry run).
      rep = min(entries, key=lambda e: sum(
          int(np.prod(a.shape)) for a in e.call.arrays()[1]))
      chunk = rep.call.call.chunk_size
      call = rep.call.with_length(2 * chunk + chunk // 2, H=1 if dry_run else 2)
      try:
        rec = check_call(call, impl, interpret=dry_run, chunked=not dry_run)
      except Exception as e:  # pylint: disable=broad-except
        rec = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
      rec.update(op=op, impl=impl, dtype=dtype, K=K, V=V, gate=gate,
                 documents=documents,
                 presets=sorted({f"{e.mixer}/{e.size}/{e.dtype}" for e in entries}))
      f.write(json.dumps(rec) + "\n")
      f.flush()
      done += 1
      failures += not rec["ok"]
      worst = {n: max(v["rms"] / v["tol"] for v in errs.values())
               for n, errs in rec.get("errors", {}).items()}
      print(f"{label}{'ok  ' if rec['ok'] else 'FAIL'} {op} {impl} {dtype} K={K} "
            f"V={V} gate={gate} docs={documents} "
            + " ".join(f"{n}: worst rms/tol {w:.2f}" for n, w in worst.items())
            + (f" {rec['error']}" if "error" in rec else "")
            + f" ({rec.get('seconds', 0)} s; {', '.join(rec['presets'][:4])}"
            + (" ..." if len(rec["presets"]) > 4 else "") + ")", flush=True)
  print(f"{label}{done} of {len(classes)} kernel call classes checked, "
        f"{failures} failed", flush=True)
  return failures


# --------------------------------------------------- device checks: train ---


TRAIN_MIXERS = ("gla", "gated_delta_net")


def run_train(out: str, dry_run: bool) -> int:
  """The train step (module docstring). Returns the number of failures."""
  # pylint: disable=g-import-not-at-top
  from configs import common
  from lsm.models.lm import LMConfig
  from lsm.parallel.mesh import MeshConfig, make_mesh
  from lsm.train import optim
  from lsm.train import state as state_lib
  from lsm.train import step as step_lib
  from tests import numerics
  label = "DRY RUN (CPU, smoke shapes; impl='auto' is chunked here): " if dry_run else ""
  model = dict(common.lm_run(f"mixer={TRAIN_MIXERS[0]},size=20m,"
                             f"smoke={dry_run}").model)
  model.update(n_layers=len(TRAIN_MIXERS), pattern=TRAIN_MIXERS)
  B, T = (2, 64) if dry_run else (4, 512)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, model["vocab_size"], (B, T + 1)).astype(np.int32)
  ids = np.cumsum(rng.random((B, T)) < 2.0 / T, axis=1).astype(np.int32)
  positions = np.concatenate([np.arange(T)[None]] * B).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": np.ones((B, T), bool), "segment_ids": ids,
           "positions": positions}
  results = {}
  # A dry run has nothing to compare: "auto" is "chunked" on CPU.
  for impl in ("auto",) if dry_run else ("auto", "chunked"):
    cfg = LMConfig(**{**model, "impl": impl})
    tx, schedule = optim.make_optimizer(optim.OptimConfig(), 10,
                                        state_lib.float32_mask(cfg))
    setup = state_lib.build(cfg, tx, make_mesh(MeshConfig(), jax.devices()[:1]),
                            None)
    step = jax.jit(step_lib.make_train_step(setup, schedule,
                                            compute_dtype="bfloat16"))
    state = state_lib.create(setup, 0)
    calls = []
    t0 = time.perf_counter()
    with recording(calls):
      lowered = step.trace(state, batch).lower()
    compiled = lowered.compile()
    t1 = time.perf_counter()
    new_state, metrics = jax.block_until_ready(compiled(state, batch))
    t2 = time.perf_counter()
    jax.block_until_ready(compiled(new_state, batch))
    t3 = time.perf_counter()
    results[impl] = {
        "calls": [f"{c.op} {c.call.dtype} K={c.call.K} V={c.call.V} -> {name}"
                  for c, name in calls],
        "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
        "nonfinite": int(metrics["nonfinite"]),
        "compile_s": round(t1 - t0, 2), "first_step_s": round(t2 - t1, 3),
        "step_s": round(t3 - t2, 4)}
    print(f"{label}impl={impl}: {json.dumps(results[impl])}", flush=True)
  rtol = numerics.tolerance("train", jnp.bfloat16)
  failures = []
  for key in ("loss", "grad_norm") if "chunked" in results else ():
    a, e = results["auto"][key], results["chunked"][key]
    if not abs(a - e) <= rtol * abs(e):
      failures.append(f"{key}: auto {a:.6g} vs chunked {e:.6g} (rtol {rtol})")
  if results["auto"]["nonfinite"]:
    failures.append("auto: non-finite loss or gradient")
  summary = {"dry_run": dry_run, "model": {k: v for k, v in model.items()
                                           if k != "mixer_kwargs"},
             "batch": [B, T], "compute_dtype": "bfloat16", "results": results,
             "failures": failures}
  with open(os.path.join(out, "train.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  print(f"{label}{'FAIL ' + '; '.join(failures) if failures else 'ok'}: one "
        f"bf16 train step, impl='auto'"
        + (" against impl='chunked'" if "chunked" in results else
           " (no comparison in a dry run)"), flush=True)
  return len(failures)


# ------------------------------------------------------------ info step ---


def run_info(dry_run: bool) -> int:
  # pylint: disable=g-import-not-at-top
  import platform
  if dry_run:
    print("DRY RUN: no GPU; nvidia-smi skipped")
  else:
    try:
      print(subprocess.run(
          ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
           "--format=csv"], capture_output=True, text=True, timeout=30,
          check=False).stdout.strip())
    except (OSError, subprocess.TimeoutExpired) as e:
      print(f"nvidia-smi: {e}")
  print(f"python {platform.python_version()}  jax {jax.__version__}  "
        f"jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else '?'}")
  print(f"backend {jax.default_backend()}  devices {jax.devices()}")
  if jax.default_backend() == "gpu":
    d = jax.devices()[0]
    print(f"device_kind {d.device_kind}  compute_capability "
          f"{getattr(d, 'compute_capability', '?')}  family "
          f"{_dispatch.gpu_family()}")
  for mod in ("flax", "optax", "orbax.checkpoint", "ml_collections", "absl",
              "yaml", "pytest", "hypothesis", "torch", "triton", "fla"):
    try:
      m = importlib.import_module(mod)
      print(f"{mod} {getattr(m, '__version__', '')}".rstrip())
    except Exception as e:  # pylint: disable=broad-except
      print(f"{mod}: not importable ({type(e).__name__})")
  return 0


# ------------------------------------------------------------ the driver ---


GPU_TEST_FILES = ("tests/ops/test_gla_pallas.py", "tests/ops/test_delta_rule_pallas.py",
                  "tests/ops/test_gla_mosaic_gpu.py",
                  "tests/ops/test_delta_rule_mosaic_gpu.py")
# step -> (time limit on the GPU in s, in a dry run). The presets step stops
# taking new classes 25 s before its limit.
STEPS = {"info": (30, 60), "tests": (140, 120), "presets": (110, 240),
         "train": (60, 180), "bench": (100, 180)}
BENCH_ARGS = ("--shapes", "8,4096,16,128", "--impls", "pallas_mosaic_gpu",
              "pallas_triton", "chunked", "--repeats", "10", "--warmup", "2",
              "--markdown")
# A dry run times one op at a toy shape, Triton in Pallas' interpreter (the
# Mosaic GPU interpreter takes minutes there).
BENCH_DRY_ARGS = ("--small", "--ops", "gla", "--impls", "pallas_triton",
                  "chunked", "--repeats", "1", "--warmup", "0", "--markdown")


def step_command(step: str, out: str, dry_run: bool) -> list[str]:
  """The command line of one step (run from the repo root)."""
  py = sys.executable
  if step == "tests":
    files = [f for f in GPU_TEST_FILES if os.path.exists(f)]
    # -m gpu: only the device tests (on CPU they all skip); -o addopts="": not
    # setup.cfg's -m "not slow"; no cache: the tree may be read-only.
    return [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
            "-o", "addopts=", "-rs" if dry_run else "-ra", *files]
  if step == "bench":
    return [py, "experiments/bench_kernels.py",
            *(BENCH_DRY_ARGS if dry_run else BENCH_ARGS)]
  return [py, "-m", "experiments.gpu_acceptance", "--step", step, "--out", out,
          *(["--dry-run"] if dry_run else [])]


def _run_step(step: str, cmd: list[str], log: str, limit: float) -> dict:
  """Runs ``cmd`` with its output streamed to the console and ``log``; kills
  its process group at ``limit`` seconds."""
  import threading  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  with open(log, "w") as f:
    f.write("$ " + " ".join(cmd) + "\n")
    f.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)

    def pump():
      for line in proc.stdout:
        f.write(line)
        f.flush()
        if "DeprecationWarning" not in line and "return rule(" not in line:
          print(f"[{step}] {line}", end="", flush=True)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
      rc = proc.wait(timeout=limit)
      status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, 9)
      rc = proc.wait()
      status = "timeout"
    reader.join(timeout=10)
  return {"status": status, "rc": rc, "seconds": round(time.perf_counter() - start, 1),
          "limit_s": limit, "log": os.path.basename(log)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("out_dir", nargs="?", default=None,
                 help="where the results go (default: --out, $OUT, "
                      "/tmp/lsm-gpu-acceptance)")
  p.add_argument("--out", default=None)
  p.add_argument("--dry-run", action="store_true",
                 help="on CPU: interpret modes, tiny shapes, no GPU-only steps")
  p.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
  p.add_argument("--step", choices=("info", "presets", "train"),
                 help="run one step in this process (the driver's children)")
  p.add_argument("--budget", type=float, default=None,
                 help="presets: seconds before it stops taking new classes")
  args = p.parse_args(argv)
  out = args.out_dir or args.out or os.environ.get("OUT") or "/tmp/lsm-gpu-acceptance"
  os.makedirs(out, exist_ok=True)
  if args.step:
    if args.step == "info":
      return run_info(args.dry_run)
    if args.step == "presets":
      limit = STEPS["presets"][args.dry_run]
      return int(run_presets(out, args.dry_run, args.budget or limit - 25) > 0)
    return int(run_train(out, args.dry_run) > 0)
  if not args.dry_run and jax.default_backend() != "gpu":
    p.error(f"no GPU (backend {jax.default_backend()}); pass --dry-run on CPU")
  summary = {"dry_run": args.dry_run, "out": out, "steps": {},
             "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  start = time.perf_counter()
  label = "DRY RUN (CPU): " if args.dry_run else ""
  for step in args.steps:
    limit = STEPS[step][args.dry_run]
    print(f"{label}== {step} (limit {limit} s)", flush=True)
    summary["steps"][step] = _run_step(
        step, step_command(step, out, args.dry_run),
        os.path.join(out, f"{step}.txt"), limit)
  summary["seconds"] = round(time.perf_counter() - start, 1)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"{label}== summary ({summary['seconds']} s, results in {out})")
  for step, r in summary["steps"].items():
    print(f"  {step:<8} {r['status']:<8} {r['seconds']:>6} s  {r['log']}")
  return 0 if all(r["status"] == "ok" for r in summary["steps"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
