r"""PYTHONPATH=. python experiments/bench_kernels.py --markdown

Run from the repo root (on the GPU machine jax comes preinstalled; flax and the
rest are not needed: this imports ``lsm.ops`` only). One process, one table:
forward and forward+backward times of GLA and the delta rule at the standard
shapes, bf16, for

  pallas_mosaic_gpu  lsm's Mosaic GPU kernels (``impl="pallas_mosaic_gpu"``,
               Hopper and newer; a row says so where an op has none yet)
  pallas_triton   lsm's Triton kernels (``impl="pallas_triton"``)
  chunked      lsm's pure-XLA chunked form (``impl="chunked"``)
  attention    causal softmax attention, ``jax.nn.dot_product_attention`` with
               ``implementation="cudnn"`` (the cost a linear layer replaces)
  fla          flash-linear-attention's ``chunk_gla`` / ``chunk_delta_rule`` on
               the same inputs, when ``torch`` and ``fla`` import and CUDA is up

Times are medians of ``--repeats`` calls after warm-up calls, each synchronised
(``block_until_ready``; ``torch.cuda.synchronize`` for fla). The first fla call
autotunes for a minute or more; it happens in the warm-up. Beside each lsm time
is the relative RMS error against the float32 reference (``impl="reference"``),
of the output, the final state and every gradient (the worst of them), measured
at a cut-down shape with the same head dims (B=1, H=2, T=min(T, 1024)) because
the token-by-token reference's backward stores one state per token.

On a CPU (no GPU), ``--small`` runs the whole script at toy shapes, with the
Pallas impls in interpret mode and XLA attention: a test of the script, not a
measurement.

Options: --ops gla delta_rule, --impls pallas_mosaic_gpu pallas_triton chunked
attention fla,
--shapes B,T,H,D ..., --repeats N, --warmup N, --small, --markdown.
"""

import argparse
import datetime
import functools
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lsm.ops.delta_rule import delta_rule
from lsm.ops.gla import gla

STANDARD_SHAPES = ((8, 4096, 16, 128), (2, 16384, 16, 128))
SMALL_SHAPES = ((1, 128, 2, 32),)
IMPLS = ("pallas_mosaic_gpu", "pallas_triton", "chunked", "attention", "fla")
OPS = ("gla", "delta_rule")
CHUNK = 64
CHECK_T = 1024


# ------------------------------------------------------------------ inputs ---


def make_inputs(op, B, T, H, D, dtype, seed=0):
  """Dict of the op's inputs: q, k, v ~ N(0, 1) (k L2-normalised for the delta
  rule), GLA gates log_sigmoid(N(0, 1) + 2) / 16 per channel (GLA's own
  normalisation), delta-rule beta = sigmoid(N(0, 1)) in [0, 1]."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(key, (B, T, H, D)) for key in ks[:3])
  if op == "gla":
    log_g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, D)) + 2.0) / 16
    return dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype),
                log_g=log_g.astype(jnp.float32))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
  return dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype),
              beta=beta.astype(jnp.float32))


def _impls(op):
  """The impl names ``op`` dispatches to."""
  from lsm.ops.delta_rule import api as delta_api  # pylint: disable=g-import-not-at-top
  from lsm.ops.gla import api as gla_api  # pylint: disable=g-import-not-at-top
  return (gla_api if op == "gla" else delta_api)._IMPLS


def _lsm_call(op, impl, interpret):
  fn = gla if op == "gla" else delta_rule
  extra = {"interpret": True} if interpret and impl.startswith("pallas") else {}
  chunk = {} if impl == "reference" else {"chunk_size": CHUNK}
  return functools.partial(fn, impl=impl, **chunk, **extra)


# ------------------------------------------------------------------ timing ---


def _median_ms(run, sync, repeats, warmup):
  for _ in range(warmup):
    sync(run())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(run())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def time_jax(fn, inputs, repeats, warmup):
  """(fwd ms, fwd+bwd ms) of a JAX op taking the inputs by keyword."""
  names = tuple(inputs)
  fwd = jax.jit(lambda *xs: fn(**dict(zip(names, xs))))

  def loss(*xs):
    o = fn(**dict(zip(names, xs)))
    o = o[0] if isinstance(o, tuple) else o
    return jnp.sum(o.astype(jnp.float32))

  bwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))
  xs = tuple(inputs.values())
  sync = jax.block_until_ready
  return (_median_ms(lambda: fwd(*xs), sync, repeats, warmup),
          _median_ms(lambda: bwd(*xs), sync, repeats, warmup))


def attention_fn(small):
  impl = None if small else "cudnn"

  def fn(q, k, v, **_):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                        implementation=impl)
  return fn


def time_fla(op, inputs, repeats, warmup):
  """(fwd ms, fwd+bwd ms) of flash-linear-attention on the same values, or a
  reason string when it cannot run here."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    if not torch.cuda.is_available():
      return "no CUDA for torch"
    if op == "gla":
      from fla.ops.gla import chunk_gla as fla_op  # pylint: disable=g-import-not-at-top
    else:
      from fla.ops.delta_rule import chunk_delta_rule as fla_op  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return f"not importable ({e.name})"

  def to_torch(x):
    t = torch.from_numpy(np.asarray(jnp.asarray(x, jnp.float32))).cuda()
    return t.to(torch.bfloat16) if x.dtype == jnp.bfloat16 else t

  ts = {n: to_torch(x).requires_grad_(True) for n, x in inputs.items()}
  if op == "gla":
    call = lambda: fla_op(ts["q"], ts["k"], ts["v"], ts["log_g"],
                          output_final_state=True)[0]
  else:
    call = lambda: fla_op(ts["q"], ts["k"], ts["v"], ts["beta"].to(ts["q"].dtype),
                          output_final_state=True)[0]

  def fwd():
    with torch.no_grad():
      return call()

  def fwd_bwd():
    for t in ts.values():
      t.grad = None
    call().float().sum().backward()

  sync = lambda _: torch.cuda.synchronize()
  return (_median_ms(fwd, sync, repeats, warmup),
          _median_ms(fwd_bwd, sync, repeats, warmup))


# --------------------------------------------------------------- accuracy ---


def worst_error(op, impl, B, T, H, D, dtype, interpret):
  """Worst relative RMS error of o, h_T and every gradient of ``impl`` against
  the float32 reference, at (B, T, H, D), with random cotangents."""
  inputs = make_inputs(op, B, T, H, D, dtype, seed=1)
  names = tuple(inputs)

  def vjp(fn, xs):
    (o, h), pull = jax.vjp(lambda *a: fn(**dict(zip(names, a))), *xs)
    ks = jax.random.split(jax.random.key(2))
    do = jax.random.normal(ks[0], o.shape).astype(o.dtype)
    dh = jax.random.normal(ks[1], h.shape)
    return (o, h, *pull((do, dh)))

  got = jax.jit(functools.partial(vjp, _lsm_call(op, impl, interpret)))(
      tuple(inputs.values()))
  ref = jax.jit(functools.partial(vjp, _lsm_call(op, "reference", False)))(
      tuple(x.astype(jnp.float32) for x in inputs.values()))
  worst = 0.0
  for a, e in zip(got, ref):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    worst = max(worst, float(np.sqrt(np.mean((a - e) ** 2))
                             / max(np.sqrt(np.mean(e ** 2)), 1e-6)))
  return worst


# ------------------------------------------------------------------- main ---


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
  p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
  p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
  p.add_argument("--shapes", nargs="+", default=None,
                 help="B,T,H,D each (default: the two standard shapes, or one "
                      "toy shape with --small)")
  p.add_argument("--repeats", type=int, default=50)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--small", action="store_true",
                 help="toy shapes, Pallas in interpret mode: tests the script")
  p.add_argument("--markdown", action="store_true")
  args = p.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  if not on_gpu and not args.small:
    p.error("no GPU: pass --small to test the script at toy shapes on CPU")
  shapes = ([tuple(int(x) for x in s.split(",")) for s in args.shapes]
            if args.shapes else (SMALL_SHAPES if args.small else STANDARD_SHAPES))
  dtype = jnp.bfloat16
  interpret = not on_gpu

  rows = []
  for op in args.ops:
    for B, T, H, D in shapes:
      inputs = make_inputs(op, B, T, H, D, dtype)
      for impl in args.impls:
        err = ""
        if impl == "fla":
          res = time_fla(op, inputs, args.repeats, args.warmup)
        elif impl == "attention":
          res = time_jax(attention_fn(args.small), inputs, args.repeats,
                         args.warmup)
        elif impl not in _impls(op):
          res = f"{op} has no {impl} impl yet"
        else:
          res = time_jax(_lsm_call(op, impl, interpret), inputs, args.repeats,
                         args.warmup)
          err = (f"{worst_error(op, impl, 1, min(T, CHECK_T), min(H, 2), D, dtype, interpret):.1e}")
        if isinstance(res, str):
          rows.append([op, f"{B},{T},{H},{D}", impl, "-", "-", err, res])
        else:
          rows.append([op, f"{B},{T},{H},{D}", impl, f"{res[0]:.2f}",
                       f"{res[1]:.2f}", err, ""])
        print(" ".join(rows[-1]), file=sys.stderr, flush=True)

  cols = ["op", "B,T,H,D", "impl", "fwd ms", "fwd+bwd ms", "rel. err", "note"]
  from experiments.benchmarking import format_table  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0].device_kind
  print(f"{datetime.date.today()} {device} jax {jax.__version__} "
        f"python {platform.python_version()} bf16 chunk {CHUNK} "
        f"repeats {args.repeats} warmup {args.warmup}")
  print(format_table(cols, rows, args.markdown, left=3))


if __name__ == "__main__":
  main()
