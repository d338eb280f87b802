r"""PYTHONPATH=. python experiments/kernel_resources.py --markdown [--check]

Registers, spills and shared memory of every Pallas Triton kernel of lsm's ops,
forward and backward, for an A100 (sm_80) and an H100 (sm_90a), on a machine
without a GPU. Needs PyPI ``triton`` (the version pinned in setup.cfg's test
extra) beside jax.

How (facts in docs/design.md, "Deviceless CUDA lowering" and "Triton
kernels to cubin"):
1. In a subprocess (so jaxlib's MLIR and triton's never share a process), each
   op's forward + VJP is lowered for CUDA under an abstract GPU of the target's
   kind (``lsm.ops.common.cuda_targets``); every ``__gpu$xla.gpu.triton`` custom
   call carries its kernel as Triton-dialect MLIR bytecode in
   ``mhlo.backend_config["ir"]``, with num_warps and num_stages beside it. The
   bytecode is parsed in Pallas' Triton context and written out as text (TTIR).
2. Here, triton's NVIDIA backend runs its stages TTIR -> TTGIR -> LLIR -> PTX for
   ``GPUTarget("cuda", sm, 32)`` with the kernel's warps and stages (the TTIR
   passes included: ``triton.compile`` would skip them for a .ttir input), and
   triton's bundled ptxas compiles the PTX with ``-v`` and triton's own flags.
   Registers and spill bytes come from ptxas' report, dynamic shared memory from
   triton's metadata (ptxas' "smem" counts static shared memory only).

PyPI triton stands in for the Triton inside XLA, so a GPU run may differ by a
few registers; an XLA dump on a GPU (``XLA_FLAGS=--xla_dump_to``) confirms.

Limits (``violations``; tests/experiments/test_kernel_resources.py holds every
kernel to them): dynamic shared memory within the target's per-block limit at
every shape and dtype. In bf16, at every head shape the kernels accept (K up
to 256, V up to 512): at most ``MAX_SPILL`` bytes of spill stores on either
target, no ptxas fallback to 32 registers and no serialized wgmma; at K and
V <= 128 also no spills on sm_90a (as since the kernels were first tuned).
float32 (IEEE matmuls on FMA units) at every head shape: the same 1 KB of
spills and no fallback to 32 registers, without the zero-spill rule on sm_90a
(its float32 state passes keep 100-250 B there at any shape; since
2026-12-06, when the delta rule's output and state grads and GLA's output, dv
and dqkg got float32 tilings of their own, every float32 kernel is within
300 B, documents and head gates included).

Options: --ops gla delta_rule, --dims 64 128 256 (K = V), --shapes 256x512
64x512 (K x V pairs, beside --dims), --dtypes bfloat16 float32, --targets
a100 h100, --chunk 64, --T 256, --out DIR (TTIR, PTX and ptxas logs,
results.json), --documents (also every kernel on packed rows, named
"kernel+docs"), --gates channel head (gla's gate forms: [B, T, H, K] per
channel, the default, and [B, T, H] one per head, whose kernels read a [C, 1]
gate column and are named "kernel+head"; the delta rule's gates are per head
either way), --markdown, --check (exit 1 on a violation).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

from lsm.ops.common import cuda_targets  # no jax at import (see its docstring)

OPS = ("gla", "delta_rule")
DIMS = (64, 128, 256)
# K x V head shapes beside the square ones: flash-linear-attention's GLA, Gated
# DeltaNet and RetNet heads at d_model 2048 are K 256, V 512.
WIDE = ((256, 512),)
DTYPES = ("bfloat16", "float32")
GATES = ("channel", "head")  # gla's log_g: [B, T, H, K] or [B, T, H]
TARGETS = tuple(sorted(cuda_targets.TARGETS))  # "a100", "h100"
SM = {name: t.sm for name, t in cuda_targets.TARGETS.items()}
# Opt-in dynamic shared memory per block, by compute capability.
SMEM_LIMIT = {t.sm: t.smem_per_block for t in cuda_targets.TARGETS.values()}
MAX_SPILL = 1024  # bytes of spill stores allowed in bf16 (sm_90a: see below)
STRICT_MAX_DIM = 128  # K, V <= this in bf16: no spills on sm_90a


# ------------------------------------------------------- 1. jax side ---


def _op_fn(op, chunk, documents=False):
  """The op's forward + VJP; with ``documents``, on packed rows (three
  documents per row, starts inside chunks), so the kernels carry their
  document masks."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from lsm.ops.delta_rule import delta_rule  # pylint: disable=g-import-not-at-top
  from lsm.ops.gla import gla  # pylint: disable=g-import-not-at-top

  def ids(q):
    if not documents:
      return None
    T = q.shape[1]
    return jnp.broadcast_to(jnp.arange(T) * 3 // T, q.shape[:2]).astype(jnp.int32)

  if op == "gla":
    def run(q, k, v, log_g, h0):
      return gla(q, k, v, log_g, h0=h0, impl="pallas_triton", chunk_size=chunk,
                 segment_ids=ids(q))
    n_in = 5
  else:
    def run(q, k, v, beta, log_g, h0):
      return delta_rule(q, k, v, beta, log_g=log_g, h0=h0, impl="pallas_triton",
                        chunk_size=chunk, segment_ids=ids(q))
    n_in = 6

  def fwd_bwd(*args):
    ys, pullback = jax.vjp(run, *args[:n_in])
    return ys, pullback(tuple(args[n_in:]))
  return fwd_bwd


def _structs(op, K, V, dtype, T, B=1, H=2, gate="channel"):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  s = jax.ShapeDtypeStruct
  f32 = jnp.float32
  x = [s((B, T, H, K), dtype)] * 2 + [s((B, T, H, V), dtype)]
  if op == "gla":
    gates = [s((B, T, H, K) if gate == "channel" else (B, T, H), f32)]
  else:
    gates = [s((B, T, H), f32)] * 2
  state = s((B, H, K, V), f32)
  return x + gates + [state, s((B, T, H, V), dtype), state]


def shapes_of(dims=(), shapes=()):
  """(K, V) pairs: (D, D) for each of ``dims``, then ``shapes``, in order and
  without repeats."""
  return list(dict.fromkeys([(d, d) for d in dims] + [tuple(x) for x in shapes]))


def _kv(text):
  """"256x512" -> (256, 512)."""
  k, v = text.lower().split("x")
  return int(k), int(v)


def _triton_calls(lowered):
  """(name, num_warps, num_stages, bytecode) of every Triton custom call."""
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  calls = []

  def walk(operation):
    for region in operation.regions:
      for block in region.blocks:
        for o in block.operations:
          attrs = o.operation.attributes
          if (o.operation.name == "stablehlo.custom_call" and
              ir.StringAttr(attrs["call_target_name"]).value
              == "__gpu$xla.gpu.triton"):
            cfg = ir.DictAttr(attrs["mhlo.backend_config"])
            calls.append((ir.StringAttr(cfg["name"]).value,
                          ir.IntegerAttr(cfg["num_warps"]).value,
                          ir.IntegerAttr(cfg["num_stages"]).value,
                          ir.StringAttr(cfg["ir"]).value_bytes))
          walk(o.operation)

  walk(lowered.compiler_ir("stablehlo").operation)
  return calls


def extract(ops, shapes, dtypes, targets, chunk, T, out, documents=False,
            gates=("channel",)):
  """Writes out/ttir/<hash>.ttir and out/index.json (one entry per kernel
  launch kind and case; the same kernel launched twice is listed once);
  ``shapes``: (K, V) pairs. With ``documents``, each case is also lowered on
  packed rows; those kernels are named with a "+docs" suffix. ``gates``: gla's
  gate forms (``GATES``); gla's kernels with head gates are named with a
  "+head" suffix (the delta rule is lowered once, under the first form)."""
  import warnings  # pylint: disable=g-import-not-at-top

  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.triton import lowering as triton_lowering  # pylint: disable=g-import-not-at-top

  warnings.filterwarnings("ignore", "The Pallas Triton backend is deprecated")
  os.makedirs(os.path.join(out, "ttir"), exist_ok=True)
  index = []
  cases = [(op, K, V, dtype, target, docs, gate)
           for op in ops for gate in (gates if op == "gla" else gates[:1])
           for K, V in shapes for dtype in dtypes
           for target in targets
           for docs in ((False, True) if documents else (False,))]
  for op, K, V, dtype, target, docs, gate in cases:
    lowered = cuda_targets.lower_for_cuda(
        _op_fn(op, chunk, docs),
        *_structs(op, K, V, jnp.dtype(dtype), T, gate=gate), target=target)
    suffix = ("+head" if op == "gla" and gate == "head" else "") + (
        "+docs" if docs else "")
    seen = set()
    for name, warps, stages, code in _triton_calls(lowered):
      with triton_lowering._new_ir_context():  # pylint: disable=protected-access
        text = ir.Module.parse(code).operation.get_asm(
            enable_debug_info=False)
      digest = hashlib.sha1(text.encode()).hexdigest()[:12]
      if digest in seen:
        continue
      seen.add(digest)
      with open(os.path.join(out, "ttir", f"{digest}.ttir"), "w") as f:
        f.write(text)
      index.append(dict(op=op, K=K, V=V, dtype=dtype, target=target,
                        kernel=name + suffix,
                        num_warps=warps, num_stages=stages, ttir=digest))
  with open(os.path.join(out, "index.json"), "w") as f:
    json.dump(index, f, indent=1)


# ---------------------------------------------------- 2. triton side ---


def compile_ttir(path, sm, num_warps, num_stages, log_dir):
  """Registers, spills and shared memory of one TTIR kernel on ``sm``."""
  # pylint: disable=g-import-not-at-top
  from triton._C.libtriton import ir
  from triton.backends.compiler import GPUTarget, Language
  from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
  from triton.compiler.compiler import make_backend
  # pylint: enable=g-import-not-at-top

  target = GPUTarget("cuda", sm, 32)
  backend = make_backend(target)
  ctx = ir.context()
  ir.load_dialects(ctx)
  backend.load_dialects(ctx)
  module = ir.parse_mlir_module(path, ctx)
  module.context = ctx
  options = backend.parse_options({"num_warps": num_warps,
                                   "num_stages": num_stages})
  stages = {}
  backend.add_stages(stages, options, Language.TRITON)
  metadata = {"target": target, **options.__dict__}
  for ext, stage in stages.items():
    if ext == "cubin":
      break  # ptxas runs below, to keep its -v report
    module = stage(module, metadata)
  ptx = module
  arch = sm_arch_from_capability(sm)
  stem = os.path.join(log_dir, f"{os.path.basename(path)[:-5]}_{arch}")
  with open(stem + ".ptx", "w") as f:
    f.write(ptx)
  cmd = [get_ptxas(sm).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
         f"--gpu-name={arch}", stem + ".ptx", "-o", stem + ".cubin"]
  run = subprocess.run(cmd, capture_output=True, text=True, check=False)
  log = run.stdout + run.stderr
  with open(stem + ".ptxas.log", "w") as f:
    f.write(log)
  if run.returncode:
    raise RuntimeError(f"ptxas failed on {path} for {arch}: {log[-2000:]}")
  regs = int(re.search(r"Used (\d+) registers", log).group(1))
  spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
  return dict(sm=arch, regs=regs, spill_stores=int(spill.group(1)),
              spill_loads=int(spill.group(2)), smem=int(metadata["shared"]),
              serialized_wgmma="wgmma" in log and "serializ" in log.lower())


@dataclasses.dataclass(frozen=True)
class Row:
  op: str
  kernel: str
  K: int
  V: int
  dtype: str
  sm: str
  num_warps: int
  num_stages: int
  regs: int
  spill_stores: int
  spill_loads: int
  smem: int
  serialized_wgmma: bool


def compile_all(out):
  """Compiles every kernel of out/index.json; returns a list of ``Row``s."""
  os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(out, "triton-cache"))
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
  with open(os.path.join(out, "index.json")) as f:
    index = json.load(f)
  log_dir = os.path.join(out, "ptx")
  os.makedirs(log_dir, exist_ok=True)
  cache = {}
  rows = []
  for e in index:
    sm = SM[e["target"]]
    key = (e["ttir"], sm, e["num_warps"], e["num_stages"])
    if key not in cache:
      cache[key] = compile_ttir(os.path.join(out, "ttir", e["ttir"] + ".ttir"),
                                sm, e["num_warps"], e["num_stages"], log_dir)
    r = cache[key]
    rows.append(Row(op=e["op"], kernel=e["kernel"], K=e["K"], V=e["V"],
                    dtype=e["dtype"], num_warps=e["num_warps"],
                    num_stages=e["num_stages"], **r))
    print(f"{e['op']:>10} {e['kernel']:<28} K={e['K']:<3} V={e['V']:<3} "
          f"{e['dtype']:<8} "
          f"{r['sm']:<6} regs {r['regs']:>3}  spill {r['spill_stores']:>7} B  "
          f"smem {r['smem']:>7} B", flush=True)
  return rows


# ---------------------------------------------------------- limits ---


def _capability(sm: str) -> int:
  """"sm_80" -> 80, "sm_90a" -> 90."""
  return int(sm.removeprefix("sm_").rstrip("a"))


def violations(rows):
  """Messages for every row outside the limits in the module docstring."""
  bad = []
  for r in rows:
    sm = _capability(r.sm)
    where = f"{r.kernel} K={r.K} V={r.V} {r.dtype} {r.sm}"
    if r.smem > SMEM_LIMIT[sm]:
      bad.append(f"{where}: {r.smem} B of shared memory > {SMEM_LIMIT[sm]}")
    if r.dtype not in ("bfloat16", "float32"):
      continue
    strict = (r.dtype == "bfloat16" and max(r.K, r.V) <= STRICT_MAX_DIM
              and sm >= 90)
    allowed = 0 if strict else MAX_SPILL
    if r.spill_stores > allowed:
      bad.append(f"{where}: {r.spill_stores} B of spill stores > {allowed}")
    if r.regs == 32 and r.spill_stores:
      bad.append(f"{where}: ptxas fell back to 32 registers")
    if r.serialized_wgmma:
      bad.append(f"{where}: ptxas serialized wgmma")
  return bad


def markdown(rows):
  lines = ["| op | kernel | K x V | dtype | warps / stages "
           "| sm_80 regs / spill B / smem B | sm_90a regs / spill B / smem B |",
           "|---|---|---|---|---|---|---|"]
  cells = {}
  for r in rows:
    cells.setdefault((r.op, r.kernel, f"{r.K} x {r.V}", r.dtype), {})[r.sm] = r
  for (op, kernel, kv, dtype), by_sm in cells.items():
    any_r = next(iter(by_sm.values()))
    cols = []
    for sm in ("sm_80", "sm_90a"):
      r = by_sm.get(sm)
      limit = SMEM_LIMIT[_capability(sm)]
      cols.append("" if r is None else
                  f"{r.regs} / {r.spill_stores:,} / {r.smem:,}"
                  + (" **over**" if r.smem > limit else ""))
    lines.append(f"| {op} | {kernel} | {kv} | {dtype} | {any_r.num_warps} / "
                 f"{any_r.num_stages} | {cols[0]} | {cols[1]} |")
  return "\n".join(lines)


def measure(ops=OPS, dims=DIMS, dtypes=DTYPES, targets=TARGETS, chunk=64, T=256,
            out=None, documents=False, shapes=(), gates=("channel",)):
  """Extracts (in a subprocess) and compiles; returns the ``Row``s. Head
  shapes: K = V = each of ``dims``, then the (K, V) pairs of ``shapes``;
  ``gates``: gla's gate forms (``GATES``)."""
  out = out or tempfile.mkdtemp(prefix="kernel-resources-")
  kv = [f"{k}x{v}" for k, v in shapes_of(dims, shapes)]
  cmd = [sys.executable, os.path.abspath(__file__), "--extract-only",
         "--out", out, "--chunk", str(chunk), "--T", str(T), "--ops", *ops,
         "--dims", "--shapes", *kv, "--dtypes", *dtypes, "--targets", *targets,
         "--gates", *gates, *(["--documents"] if documents else [])]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get(
                 "PYTHONPATH")])))
  subprocess.run(cmd, check=True, env=env)
  return compile_all(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
  p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
  p.add_argument("--dims", nargs="*", type=int, default=list(DIMS),
                 help="head dims with K = V")
  p.add_argument("--shapes", nargs="*", type=_kv, default=list(WIDE),
                 help="K x V pairs (e.g. 256x512), beside --dims")
  p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
  p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
  p.add_argument("--chunk", type=int, default=64)
  p.add_argument("--T", type=int, default=256)
  p.add_argument("--out", default=None)
  p.add_argument("--markdown", action="store_true")
  p.add_argument("--check", action="store_true")
  p.add_argument("--documents", action="store_true",
                 help="also compile every kernel on packed rows (segment_ids)")
  p.add_argument("--gates", nargs="+", default=["channel"], choices=GATES,
                 help="gla's gate forms; head-gate kernels are named +head")
  p.add_argument("--extract-only", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.extract_only:
    extract(a.ops, shapes_of(a.dims, a.shapes), a.dtypes, a.targets, a.chunk,
            a.T, a.out, a.documents, tuple(a.gates))
    return 0
  out = a.out or tempfile.mkdtemp(prefix="kernel-resources-")
  rows = measure(a.ops, a.dims, a.dtypes, a.targets, a.chunk, a.T, out,
                 a.documents, a.shapes, tuple(a.gates))
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
  if a.markdown:
    print(markdown(rows))
  bad = violations(rows)
  for msg in bad:
    print("LIMIT:", msg)
  print(f"{len(rows)} kernel compilations, {len(bad)} over the limits; "
        f"logs in {out}")
  return 1 if (a.check and bad) else 0


if __name__ == "__main__":
  sys.exit(main())
