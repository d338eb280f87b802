r"""PYTHONPATH=. .venv/bin/python experiments/bench_ops.py --markdown

Run from the repo root. Benchmarks the chunked vs reference impls of gla,
delta_rule and ssm_scan and prints one table (Markdown with --markdown, as pasted
into BENCHMARKS.md). Options: --T 512 2048 8192, --ops gla delta_rule ssm_scan
(and, not in the default set: gla_head, per-head gates [B, T, H]; dplr_delta
and dplr_kda, the dplr op on the delta rule's a, b, u),
--repeats N, --markdown, --segments, --selective, --blocks, --ungated.

With --segments it prints a second kind of table instead: the chunked impl's
fwd+bwd with ``segment_ids`` (packed documents, state resets) against the same
call without, on the same inputs; documents are DOC_LEN tokens on average
(lengths drawn from a geometric distribution, seeded), so starts fall anywhere
in a chunk.

For each op, sequence length T and impl ("chunked", "reference") it measures, in
float32 on CPU at B=2, H=4, K=V=64:

- fwd: wall time of the jitted op, returning (output, final state);
- fwd+bwd: wall time of the jitted ``jax.grad`` of sum(output ** 2) with respect
  to every input;
- temp: ``memory_analysis().temp_size_in_bytes`` of the compiled fwd+bwd
  function (XLA's temporary buffers, excluding arguments and outputs).

Each function is lowered and compiled once per (op, impl, T) and the compiled
executable is reused for the warm-up call, the timed calls and the memory
analysis. Times are the median of the timed calls, each ended by
``block_until_ready``. Inputs:

- gla: q, k, v ~ N(0, 1); per-channel gates log_g = log_sigmoid(N(0, 1)) / 16,
  [B, T, H, K] (GLA's own parameterisation; mild decay, about 3 nats per chunk
  of 64). gla's baseline is ``plain_chunked_gla``, the most direct chunked
  form, written in this file as the baseline its chunked impl must match
  (fwd+bwd within 1.1x).
- delta_rule: q, v ~ N(0, 1); k ~ N(0, 1) L2-normalised over K; beta ~ U[0, 1]
  and log_g = log_sigmoid(N(0, 1) + 2), both [B, T, H].
- ssm_scan: a ~ U[-1, 1] and b ~ N(0, 1), both [B, T, H, K].
- dplr_delta: the delta rule's inputs above, through ``dplr`` as Gated
  DeltaNet maps onto it (a = exp(g) k, b = -beta k, u = beta k, g one per head
  [B, T, H]); differentiated with respect to the same five arrays. Its
  "baseline" columns are ``delta_rule(impl="chunked")`` on the same inputs (the
  issue 29 target: within 2x).
- dplr_kda: the same with one gate per key channel (KDA): log_g =
  log_sigmoid(N(0, 1) + 2) of shape [B, T, H, K].

The "baseline" columns: gla against ``plain_chunked_gla`` below, dplr_delta
and dplr_kda against the delta rule's chunked impl (per-head gates for
dplr_kda's baseline: it has no per-channel form), "-" for the other ops.

With --selective it prints the selective scan (Mamba's recurrence and readout)
instead, at the Mamba block's shapes of the 20m preset (B=1, E = 2 * 384 = 768
channels, N=16): ``selective_scan(impl="chunked")`` against the path the Mamba
layer took before it existed (``ssm_path``: decays and inputs materialised as
[B, T, E, N], ``ssm_scan(impl="chunked")``, readout with C), fwd, fwd+bwd (of
sum(y ** 2) w.r.t. x, dt, A, B, C, D) and the fwd+bwd temp memory. Inputs:
x, B, C ~ N(0, 1), dt = softplus(N(0, 1) - 2), A = -exp(N(0, 1)), D = 1.

With --blocks: one mixer layer of the 20m preset (d_model 384, 4 heads, each
mixer's defaults, impl="chunked", chunk 64; B=1, u ~ N(0, 1) [1, T, 384]):
fwd+bwd (of sum(y ** 2) w.r.t. the input and every parameter) time and temp
memory for GLA, Mamba, LSSL and S4D (conv mode), and the temp memory (compiled
only, not run) of the layers' former forms: Mamba through ``ssm_path`` and
LSSL / S4D with the unblocked [T, H, M] Vandermonde kernel.

With --ungated: chunked gla with ``log_g=None`` (its no-decay form) against
the same call on an all-zero gate made inside the jitted function (a
compile-time constant: what ``log_g=None`` ran before the no-decay form), at
Based's head shape (H=2, K = 1 + 16 + 16^2 = 273, V=33: the MQAR cells'
d_model 64 in two heads plus the denominator column), B=2, chunk 16 and 64;
fwd, fwd+bwd (w.r.t. q, k, v) and the fwd+bwd temp memory.
"""

import argparse
import datetime
import os
import platform
import sys

import jax

# CPU benchmark by definition: pin the platform before any backend starts.
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarking import format_table, median_ms  # noqa: E402
from lsm.ops.delta_rule import delta_rule  # noqa: E402
from lsm.ops.dplr import dplr  # noqa: E402
from lsm.ops.gla import gla  # noqa: E402
from lsm.ops.selective_scan import selective_scan  # noqa: E402
from lsm.ops.ssm_scan import ssm_scan  # noqa: E402

B, H, K, V = 2, 4, 64, 64
IMPLS = ("chunked", "reference")
OPS = ("gla", "delta_rule", "ssm_scan")
# On request (--ops gla_head): gla with one gate per head, [B, T, H] (Mamba-2,
# RetNet, Lightning), the chunked impl's scalar-decay form.
# --ops dplr_delta dplr_kda: the dplr op on the delta rule's a, b, u (per-head
# and per-channel gates), against delta_rule's chunked impl.
EXTRA_OPS = ("gla_head", "dplr_delta", "dplr_kda")
BASELINES = ("gla", "dplr_delta", "dplr_kda")  # ops with a "baseline" impl
SEED = 0
DOC_LEN = 512  # mean document length of the --segments rows
# With --repeats 0 (default) the number of timed calls is chosen from the warm-up
# call's time so that each measurement takes about TIME_BUDGET_S, clipped to
# [MIN_REPEATS, MAX_REPEATS]: e.g. 3 calls for a 2 s reference fwd+bwd.
TIME_BUDGET_S = 3.0
MIN_REPEATS = 3
MAX_REPEATS = 20


def make_inputs(op: str, T: int):
  """Random float32 inputs of ``op`` at length T, as a tuple of arrays.

  Args:
    op: "gla" | "delta_rule" | "ssm_scan".
    T: sequence length.

  Returns:
    The op's positional array arguments, all differentiated by the fwd+bwd
    function: gla (q, k, v, log_g), delta_rule (q, k, v, beta, log_g),
    ssm_scan (a, b).
  """
  keys = jax.random.split(jax.random.key(SEED), 5)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32)
  if op in ("gla", "gla_head"):
    q = normal(keys[0], (B, T, H, K))
    k = normal(keys[1], (B, T, H, K))
    v = normal(keys[2], (B, T, H, V))
    gate_shape = (B, T, H, K) if op == "gla" else (B, T, H)
    log_g = jax.nn.log_sigmoid(normal(keys[3], gate_shape)) / 16
    return q, k, v, log_g
  if op in ("delta_rule", "dplr_delta", "dplr_kda"):
    q = normal(keys[0], (B, T, H, K))
    k = normal(keys[1], (B, T, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = normal(keys[2], (B, T, H, V))
    beta = jax.random.uniform(keys[3], (B, T, H), jnp.float32)
    gate_shape = (B, T, H, K) if op == "dplr_kda" else (B, T, H)
    log_g = jax.nn.log_sigmoid(normal(keys[4], gate_shape) + 2.0)
    return q, k, v, beta, log_g
  if op == "ssm_scan":
    a = jax.random.uniform(keys[0], (B, T, H, K), jnp.float32, -1.0, 1.0)
    b = normal(keys[1], (B, T, H, K))
    return a, b
  raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def plain_chunked_gla(q, k, v, log_g, chunk_size=64):
  """The gla rows' baseline: GLA in the most direct chunked form,
  written here, not in lsm, so lsm's chunked impl is measured against code it
  does not share. Per chunk, b = cumsum of the log gates, q exp(b) and
  k exp(-b) make the intra-chunk matrix one masked matmul, one ``lax.scan``
  carries the [K, V] state across chunks, and gradients come from autodiff. It
  overflows once a chunk decays by more than about 88 nats (no strong-decay
  path) and needs T % chunk_size == 0; the benchmark's gates decay about 3 nats
  per chunk. Returns (o, h_T) like the op.
  """
  Bq, T, Hq, Kq = q.shape
  C, N = chunk_size, T // chunk_size
  to_chunks = lambda x: jnp.moveaxis(x.reshape(Bq, N, C, Hq, x.shape[-1]), 3, 1)
  q, k, v, g = map(to_chunks, (q, k, v, log_g))  # [B, H, N, C, D]
  b = jnp.cumsum(g, axis=3)
  qe, ke, kd = q * jnp.exp(b), k * jnp.exp(-b), k * jnp.exp(b[..., -1:, :] - b)
  causal = jnp.tril(jnp.ones((C, C), bool))
  a = jnp.where(causal, jnp.einsum("bhntk,bhnsk->bhnts", qe, ke), 0.0)
  u = jnp.einsum("bhnck,bhncv->bhnkv", kd, v)

  def step(h, x):
    decay, u_n = x
    return decay[..., None] * h + u_n, h

  h_t, h_in = jax.lax.scan(step, jnp.zeros((Bq, Hq, Kq, v.shape[-1])),
                           (jnp.moveaxis(jnp.exp(b[..., -1, :]), 2, 0),
                            jnp.moveaxis(u, 2, 0)))
  o = (jnp.einsum("bhnts,bhnsv->bhntv", a, v)
       + jnp.einsum("bhnck,bhnkv->bhncv", qe, jnp.moveaxis(h_in, 0, 2)))
  o = Kq ** -0.5 * jnp.moveaxis(o, 1, 3).reshape(Bq, T, Hq, -1)
  return o, h_t


def make_segment_ids(T: int):
  """int32 [B, T] document ids: lengths ~ geometric with mean DOC_LEN."""
  rng = np.random.default_rng(SEED)
  rows = []
  for _ in range(B):
    lengths = rng.geometric(1 / DOC_LEN, size=T)  # more than enough
    rows.append(np.repeat(np.arange(1, T + 1), lengths)[:T])
  return jnp.asarray(np.stack(rows), jnp.int32)


def make_forward(op: str, impl: str, segment_ids=None):
  """The op as a function of its array inputs, returning (output, final state)."""
  seg = {} if segment_ids is None else {"segment_ids": segment_ids}
  if op == "gla" and impl == "baseline":
    return plain_chunked_gla
  if op in ("dplr_delta", "dplr_kda") and impl == "baseline":
    def delta(q, k, v, beta, log_g):
      if log_g.ndim == 4:   # per channel: the delta rule takes one per head
        log_g = jnp.mean(log_g, axis=-1)
      return delta_rule(q, k, v, beta, log_g=log_g, impl="chunked", **seg)
    return delta
  if op in ("gla", "gla_head"):
    return lambda q, k, v, log_g: gla(q, k, v, log_g, impl=impl, **seg)
  if op == "delta_rule":
    return lambda q, k, v, beta, log_g: delta_rule(q, k, v, beta, log_g=log_g,
                                                   impl=impl, **seg)
  if op == "ssm_scan":
    return lambda a, b: ssm_scan(a, b, impl=impl, **seg)
  if op in ("dplr_delta", "dplr_kda"):
    def gated_delta(q, k, v, beta, log_g):
      decay = jnp.exp(log_g if log_g.ndim == 4 else log_g[..., None])
      bk = beta[..., None] * k
      return dplr(q, decay * k, -bk, bk, v, log_g, impl=impl, **seg)
    return gated_delta
  raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


def make_forward_backward(op: str, impl: str, n_args: int, segment_ids=None):
  """Gradients of sum(output ** 2) with respect to all ``n_args`` inputs."""
  forward = make_forward(op, impl, segment_ids)

  def loss(*args):
    out, _ = forward(*args)
    return jnp.sum(jnp.square(out))

  return jax.grad(loss, argnums=tuple(range(n_args)))


def bench_one(op: str, impl: str, T: int, repeats: int, segments=False) -> dict:
  """Times fwd and fwd+bwd of one (op, impl, T), and the fwd+bwd temp memory.

  Returns:
    dict with fwd_ms, fwdbwd_ms and temp_mib (None if XLA reports no analysis).
  """
  args = make_inputs(op, T)
  ids = make_segment_ids(T) if segments else None
  fwd = jax.jit(make_forward(op, impl, ids)).lower(*args).compile()
  fwdbwd = jax.jit(make_forward_backward(op, impl, len(args), ids)).lower(
      *args).compile()
  mem = fwdbwd.memory_analysis()
  temp_mib = None if mem is None else mem.temp_size_in_bytes / 2**20
  timed = lambda compiled: median_ms(compiled, repeats, TIME_BUDGET_S, MIN_REPEATS,
                                     MAX_REPEATS, prepare=lambda: args)
  return dict(fwd_ms=timed(fwd), fwdbwd_ms=timed(fwdbwd),
              temp_mib=temp_mib)


COLUMNS = ("op", "T", "fwd chunked (ms)", "fwd ref (ms)", "fwd speedup",
           "fwd+bwd chunked (ms)", "fwd+bwd ref (ms)", "fwd+bwd speedup",
           "temp chunked (MiB)", "temp ref (MiB)", "fwd+bwd baseline (ms)",
           "chunked / baseline")


def row_cells(op: str, T: int, res: dict) -> list[str]:
  """One table row for (op, T) from the chunked and reference results."""
  c, r = res["chunked"], res["reference"]
  mib = lambda x: "n/a" if x is None else f"{x:.1f}"
  p = res.get("baseline")
  plain = (["-", "-"] if p is None else
           [f"{p['fwdbwd_ms']:.1f}", f"{c['fwdbwd_ms'] / p['fwdbwd_ms']:.2f}x"])
  return [op, str(T), f"{c['fwd_ms']:.1f}", f"{r['fwd_ms']:.1f}",
          f"{r['fwd_ms'] / c['fwd_ms']:.1f}x", f"{c['fwdbwd_ms']:.1f}",
          f"{r['fwdbwd_ms']:.1f}", f"{r['fwdbwd_ms'] / c['fwdbwd_ms']:.1f}x",
          mib(c["temp_mib"]), mib(r["temp_mib"]), *plain]


SEGMENT_COLUMNS = ("op", "T", "fwd+bwd chunked (ms)", "with segment_ids (ms)",
                   "ratio", "temp chunked (MiB)", "temp with segment_ids (MiB)")


def segment_row(op: str, T: int, plain: dict, packed: dict) -> list[str]:
  mib = lambda x: "n/a" if x is None else f"{x:.1f}"
  return [op, str(T), f"{plain['fwdbwd_ms']:.1f}", f"{packed['fwdbwd_ms']:.1f}",
          f"{packed['fwdbwd_ms'] / plain['fwdbwd_ms']:.2f}x",
          mib(plain["temp_mib"]), mib(packed["temp_mib"])]


# -- --selective: the selective scan against the former ssm_scan path ----------

SEL_E, SEL_N = 768, 16  # Mamba block of the 20m preset: E = 2 * 384


def selective_inputs(T: int):
  """(x, dt, A, B, C, D) float32 at B=1, E=SEL_E, N=SEL_N (module docstring)."""
  k = jax.random.split(jax.random.key(SEED), 5)
  n = lambda key, shape: jax.random.normal(key, shape, jnp.float32)  # noqa: E731
  return (n(k[0], (1, T, SEL_E)), jax.nn.softplus(n(k[1], (1, T, SEL_E)) - 2.0),
          -jnp.exp(n(k[2], (SEL_E, SEL_N))), n(k[3], (1, T, SEL_N)),
          n(k[4], (1, T, SEL_N)), jnp.ones((SEL_E,), jnp.float32))


def ssm_path(x, dt, A, B, C, D):
  """The Mamba layer's recurrence before selective_scan: [B, T, E, N] decays and
  inputs, ``ssm_scan`` (chunked), then the readout. Returns (y, h_T)."""
  a = jnp.exp(dt[..., None] * A)
  b = (dt * x)[..., None] * B[:, :, None]
  h, h_t = ssm_scan(a, b, impl="chunked")
  return jnp.einsum("bten,btn->bte", h, C) + D * x, h_t


def selective_path(x, dt, A, B, C, D):
  return selective_scan(x, dt, A, B, C, D=D, impl="chunked")


def bench_fn(forward, args, repeats: int, run: bool = True) -> dict:
  """fwd and fwd+bwd (sum of squared first output, every argument) times and
  the fwd+bwd temp memory; with ``run=False`` only the memory (compiled, not
  executed)."""
  def loss(*a):
    return jnp.sum(jnp.square(forward(*a)[0]))

  fwdbwd = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))).lower(
      *args).compile()
  mem = fwdbwd.memory_analysis()
  out = dict(temp_mib=None if mem is None else mem.temp_size_in_bytes / 2**20)
  if run:
    fwd = jax.jit(forward).lower(*args).compile()
    timed = lambda c: median_ms(c, repeats, TIME_BUDGET_S, MIN_REPEATS,  # noqa: E731
                                MAX_REPEATS, prepare=lambda: args)
    out.update(fwd_ms=timed(fwd), fwdbwd_ms=timed(fwdbwd))
  return out


SELECTIVE_COLUMNS = ("T", "fwd selective (ms)", "fwd ssm path (ms)",
                     "fwd+bwd selective (ms)", "fwd+bwd ssm path (ms)",
                     "fwd+bwd speedup", "temp selective (MiB)",
                     "temp ssm path (MiB)")


def selective_row(T: int, new: dict, old: dict) -> list[str]:
  return [str(T), f"{new['fwd_ms']:.1f}", f"{old['fwd_ms']:.1f}",
          f"{new['fwdbwd_ms']:.1f}", f"{old['fwdbwd_ms']:.1f}",
          f"{old['fwdbwd_ms'] / new['fwdbwd_ms']:.1f}x",
          f"{new['temp_mib']:.1f}", f"{old['temp_mib']:.1f}"]


# -- --ungated: gla without a gate ---------------------------------------------

UNGATED_H, UNGATED_K, UNGATED_V = 2, 273, 33  # Based's heads in the MQAR cells
UNGATED_COLUMNS = ("T", "chunk", "fwd none (ms)", "fwd zeros (ms)",
                   "fwd+bwd none (ms)", "fwd+bwd zeros (ms)", "fwd+bwd speedup",
                   "temp none (MiB)", "temp zeros (MiB)")


def ungated_inputs(T: int):
  """q, k [2, T, H, K] and v [2, T, H, V] ~ N(0, 1) at UNGATED_* (q, k / 4:
  feature-map-sized values)."""
  k = jax.random.split(jax.random.key(SEED), 3)
  n = lambda key, shape: jax.random.normal(key, shape, jnp.float32)  # noqa: E731
  qk = (2, T, UNGATED_H, UNGATED_K)
  return n(k[0], qk) / 4, n(k[1], qk) / 4, n(k[2], (2, T, UNGATED_H, UNGATED_V))


def ungated_forwards(chunk: int):
  """(log_g=None, constant all-zero log_g) forwards of chunked gla."""
  def none(q, k, v):
    return gla(q, k, v, None, chunk_size=chunk, impl="chunked")

  def zeros(q, k, v):
    return gla(q, k, v, jnp.zeros(q.shape, jnp.float32), chunk_size=chunk,
               impl="chunked")
  return none, zeros


def ungated_row(T: int, chunk: int, new: dict, old: dict) -> list[str]:
  return [str(T), str(chunk), f"{new['fwd_ms']:.1f}", f"{old['fwd_ms']:.1f}",
          f"{new['fwdbwd_ms']:.1f}", f"{old['fwdbwd_ms']:.1f}",
          f"{old['fwdbwd_ms'] / new['fwdbwd_ms']:.1f}x",
          f"{new['temp_mib']:.1f}", f"{old['temp_mib']:.1f}"]


# -- --blocks: one mixer layer ---------------------------------------------------

BLOCK_D, BLOCK_HEADS = 384, 4  # the 20m preset


def _old_kernel(self, length):
  """LSSL / S4D kernel with the whole [L, H, M] Vandermonde matrix (the form
  before lsm.layers.ssm blocked it)."""
  from lsm.layers import ssm  # pylint: disable=g-import-not-at-top
  log_r, theta, cdb, _, _ = self._discretize()
  return ssm._kernel_block(log_r, theta, cdb, jnp.arange(length, dtype=jnp.int32))


def _old_mamba_call(self, u, cache=None, *, segment_ids=None, positions=None):
  """Mamba.__call__ through ``ssm_path`` (no cache, no documents)."""
  del cache, segment_ids, positions
  x, z, _ = self._gate_and_input(u, None)
  x32, dt, a, b, c = self._ssm_inputs(x)
  y, _ = ssm_path(x32, dt, a, b, c, self.d[...])
  return self._output(y, x, z), None


def make_block(name: str):
  """(layer, label) for a --blocks row; "old_*" are the former forms."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from lsm import layers  # pylint: disable=g-import-not-at-top
  base = name.removeprefix("old_")
  cls = layers.MIXERS[base]
  if name.startswith("old_"):
    patch = {"__call__": _old_mamba_call} if base == "mamba" else {
        "kernel": _old_kernel}
    cls = type(f"Old{cls.__name__}", (cls,), patch)
  return cls(BLOCK_D, n_heads=BLOCK_HEADS, impl="chunked", rngs=nnx.Rngs(SEED))


BLOCKS = ("gla", "mamba", "old_mamba", "lssl", "old_lssl", "s4d", "old_s4d")
BLOCK_COLUMNS = ("layer", "T", "fwd+bwd (ms)", "temp (MiB)")


def bench_block(name: str, T: int, repeats: int) -> dict:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  layer = make_block(name)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  u = jax.random.normal(jax.random.key(SEED), (1, T, BLOCK_D), jnp.float32)

  def loss(params, u):
    return jnp.sum(jnp.square(nnx.merge(graphdef, params, rest)(u)[0]))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, u).compile()
  mem = compiled.memory_analysis()
  out = dict(temp_mib=None if mem is None else mem.temp_size_in_bytes / 2**20)
  if not name.startswith("old_"):
    out["fwdbwd_ms"] = median_ms(compiled, repeats, TIME_BUDGET_S, MIN_REPEATS,
                                 MAX_REPEATS, prepare=lambda: (params, u))
  return out


def block_row(name: str, T: int, res: dict) -> list[str]:
  ms = res.get("fwdbwd_ms")
  return [name, str(T), "not run" if ms is None else f"{ms:.0f}",
          "n/a" if res["temp_mib"] is None else f"{res['temp_mib']:.0f}"]


def main():
  parser = argparse.ArgumentParser(
      description="Chunked vs reference timings and memory of the lsm ops on CPU.")
  parser.add_argument("--T", type=int, nargs="+", default=[512, 2048, 8192],
                      help="sequence lengths")
  parser.add_argument("--ops", nargs="+", choices=OPS + EXTRA_OPS,
                      default=list(OPS),
                      help="ops to benchmark")
  parser.add_argument("--repeats", type=int, default=0,
                      help="timed calls per measurement after one warm-up; 0 "
                      f"(default) picks {MIN_REPEATS}-{MAX_REPEATS} from the "
                      f"warm-up time (about {TIME_BUDGET_S:g} s each)")
  parser.add_argument("--markdown", action="store_true",
                      help="print a Markdown table (for BENCHMARKS.md)")
  parser.add_argument("--segments", action="store_true",
                      help="chunked with vs without segment_ids (packed "
                      f"documents of mean length {DOC_LEN}) instead")
  parser.add_argument("--selective", action="store_true",
                      help="selective_scan against the former ssm_scan path "
                      "instead (see the module docstring)")
  parser.add_argument("--blocks", nargs="*", choices=BLOCKS, default=None,
                      help="one mixer layer's fwd+bwd instead (all of "
                      f"{BLOCKS} when given without names)")
  parser.add_argument("--ungated", action="store_true",
                      help="gla with log_g=None against a constant all-zero "
                      "gate instead (see the module docstring)")
  args = parser.parse_args()

  device = jax.devices()[0]
  now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
  header = [
      f"jax {jax.__version__}, device {device.platform}:{device.device_kind} "
      f"({os.cpu_count()} CPU cores visible, {platform.machine()}), {now}",
      f"float32, B={B}, H={H}, K={K}, V={V}, chunk_size=64 (default); "
      f"repeats={args.repeats or 'auto'}; speedup = reference / chunked",
  ]
  rows = []
  if args.selective or args.blocks is not None or args.ungated:
    if args.ungated:
      header[1] = (f"float32, B=2, H={UNGATED_H}, K={UNGATED_K}, "
                   f"V={UNGATED_V}, impl=chunked; repeats="
                   f"{args.repeats or 'auto'}; speedup = zeros / none")
      for T in args.T:
        inputs = ungated_inputs(T)
        for chunk in (16, 64):
          new, old = (bench_fn(f, inputs, args.repeats)
                      for f in ungated_forwards(chunk))
          print(f"done ungated T={T} chunk={chunk}", file=sys.stderr, flush=True)
          rows.append(ungated_row(T, chunk, new, old))
      columns = UNGATED_COLUMNS
    elif args.selective:
      header[1] = (f"float32, B=1, E={SEL_E}, N={SEL_N}, chunk_size=64; repeats="
                   f"{args.repeats or 'auto'}; speedup = ssm path / selective")
      for T in args.T:
        inputs = selective_inputs(T)
        new, old = (bench_fn(f, inputs, args.repeats)
                    for f in (selective_path, ssm_path))
        print(f"done selective T={T}", file=sys.stderr, flush=True)
        rows.append(selective_row(T, new, old))
      columns = SELECTIVE_COLUMNS
    else:
      header[1] = (f"float32, one layer, B=1, d_model={BLOCK_D}, "
                   f"{BLOCK_HEADS} heads, impl=chunked; repeats="
                   f"{args.repeats or 'auto'}; old_* compiled only")
      for name in args.blocks or BLOCKS:
        for T in args.T:
          rows.append(block_row(name, T, bench_block(name, T, args.repeats)))
          print(f"done {name} T={T}", file=sys.stderr, flush=True)
      columns = BLOCK_COLUMNS
    print("\n".join(header))
    print()
    print(format_table(columns, rows, args.markdown, left=1))
    return
  if args.segments:
    header[1] += f"; documents of mean length {DOC_LEN}"
    for op in args.ops:
      for T in args.T:
        plain, packed = (bench_one(op, "chunked", T, args.repeats, segments=s)
                         for s in (False, True))
        print(f"done {op} T={T}", file=sys.stderr, flush=True)
        rows.append(segment_row(op, T, plain, packed))
    print("\n".join(header))
    print()
    print(format_table(SEGMENT_COLUMNS, rows, args.markdown, left=2))
    return
  for op in args.ops:
    for T in args.T:
      impls = IMPLS + (("baseline",) if op in BASELINES else ())
      res = {impl: bench_one(op, impl, T, args.repeats) for impl in impls}
      # Progress on stderr, so that stdout is only the header and the table.
      print(f"done {op} T={T}", file=sys.stderr, flush=True)
      rows.append(row_cells(op, T, res))
  print("\n".join(header))
  print()
  print(format_table(COLUMNS, rows, args.markdown, left=2))


if __name__ == "__main__":
  main()
