"""Run by test_sequence.py in a fresh process with 8 forced CPU devices: LASP-2
sequence parallelism (lsm.parallel.sequence) against one device.

1. Every op wrapper (GLA, delta rule, DPLR, diagonal SSM scan, selective scan,
   softmax attention) on meshes with seq = 2, 4 and 8 (combined with data and tensor
   axes): outputs, final states and the gradients of every input and of h0 equal the
   single-device op within the float32 "invariant" tolerance, at T / seq not a
   multiple of the chunk, strong decay, beta in [0, 2], signed and zero decays,
   GLA with per-channel and per-head gates (per-head on seq = 8);
   and the linear ops on packed rows (segment_ids) with document starts inside
   slices, several in one slice, at slice edges, and slices without one (on
   seq = 8, whose 5-token slices hold all of these).
2. Compiled HLO of one layer's forward + backward on seq = 8: exactly one
   all-gather and one reduce-scatter per linear op, no other collective, of the
   same byte size at T = 1024 and T = 4096; the selective scan on its own
   (besides those two, only the all-reduces of its A and D gradients).
3. A full train step of a hybrid LM on mesh (data=2, seq=4) equals the same
   step on one device, and its HLO holds one all-gather per mixer layer.

``--slow`` adds a broader sweep (packed rows and per-head gates on every mesh,
per-head and absent gates for the other ops, ungated delta rule, longer T,
chunk 64, no h0). Prints one JSON line of results; raises on a
mismatch.
"""

import json
import os
import re
import sys
import time

# Compile time dominates this script; the backend's optimisation level does not
# change float32 results beyond summation order, which the tolerances cover.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true")

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from lsm.models.lm import LMConfig  # noqa: E402
from lsm.ops.delta_rule import delta_rule  # noqa: E402
from lsm.ops.dplr import dplr  # noqa: E402
from lsm.ops.gla import gla  # noqa: E402
from lsm.ops.selective_scan import selective_scan  # noqa: E402
from lsm.ops.ssm_scan import ssm_scan  # noqa: E402
from lsm.parallel import sequence  # noqa: E402
from lsm.parallel.mesh import MeshConfig, make_mesh  # noqa: E402
from lsm.train import state as state_lib  # noqa: E402
from lsm.train import step as step_lib  # noqa: E402
from tests import numerics  # noqa: E402

RTOL = numerics.TOLERANCES[("invariant", "float32")]
TRAIN_RTOL = numerics.TOLERANCES[("train", "float32")]
MESHES = ({"data": 2, "seq": 2, "tensor": 2}, {"data": 2, "seq": 4}, {"seq": 8})
COLLECTIVE = re.compile(r"\s(all-gather|reduce-scatter|all-reduce|"
                        r"collective-permute|all-to-all)(?:-start)?\(")
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "c64": 8, "c128": 16, "s64": 8,
          "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}


def _segment_ids(B, T):
  """Packed rows of documents (T = 40): starts inside slices, several in one
  slice, exactly at slice edges of every mesh here (10, 20), and slices with
  none."""
  assert (B, T) == (2, 40), (B, T)
  lengths = ((10, 3, 1, 26), (20, 7, 13))
  return jnp.asarray(np.stack([np.repeat(np.arange(1, len(n) + 1), n)
                               for n in lengths]), jnp.int32)


def _inputs(seed, B, T, H, K, V, *, gate: str, h0: bool, segments=False):
  """Seeded inputs: keys unit-norm, strong per-channel decay, beta in [0, 2],
  signed SSM decays with exact zeros. numpy's generator: compiling jax.random's
  costs more than the checks."""
  rng = np.random.default_rng(seed)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  n = lambda *s: rng.standard_normal(s)  # noqa: E731
  k = n(B, T, H, K)
  a = rng.uniform(-1.0, 1.0, (B, T, H, K))
  x = {"q": f32(n(B, T, H, K)),
       "k": f32(k / np.linalg.norm(k, axis=-1, keepdims=True)),
       "v": f32(n(B, T, H, V)),
       "beta": f32(rng.uniform(0.0, 2.0, (B, T, H))),
       "a": f32(np.where(np.abs(a) < 0.05, 0.0, a)),  # a few exact zeros
       "b": f32(n(B, T, H, K))}
  # log gates from about -0.01 to -20 per token and beyond: strong decay.
  log_g = f32(-np.exp(2 * n(B, T, H, K)))
  x["log_g_head"] = f32(-np.exp(n(B, T, H)))
  x["log_g"] = {"channel": log_g, "head": x["log_g_head"], "none": None}[gate]
  if h0:
    x["h0"] = f32(n(B, H, K, V))
    x["h0_ssm"] = f32(n(B, H, K))
  # Selective scan (drawn after the others, which keep their values): x, dt
  # [B, T, E = H K]; A [E, V]; B, C shared [B, T, V] and grouped [B, T, H, V];
  # D [E]. dt up to 3: signed decays reach -1.
  E = H * K
  x["ss_x"], x["ss_dt"] = f32(n(B, T, E)), f32(rng.uniform(0.0, 3.0, (B, T, E)))
  x["ss_A"], x["ss_D"] = f32(-rng.uniform(0.2, 2.0, (E, V))), f32(n(E))
  x["ss_B"], x["ss_C"] = f32(n(B, T, V)), f32(n(B, T, V))
  x["ss_Bg"], x["ss_Cg"] = f32(n(B, T, H, V)), f32(n(B, T, H, V))
  if h0:
    x["h0_ss"] = f32(n(B, E, V))
  if segments:
    x["segment_ids"] = _segment_ids(B, T)
    # Mild decays, so that a state wrongly carried across a start would show.
    for name in ("log_g", "log_g_head"):
      if x[name] is not None:
        x[name] = 0.05 * x[name]
  return x


def _ops(mod, chunk: int, impl: str = "chunked"):
  """name -> fn(inputs) -> tuple of outputs, through ``mod`` (the sequence
  wrappers or the plain ops)."""
  is_seq = mod is sequence

  def attention(x):
    # Grouped-query: 2 query heads per kv head, a sliding window of 9. Without
    # a mesh sequence.attention is jax.nn.dot_product_attention itself.
    q = jnp.concatenate([x["q"], x["k"]], axis=2)
    return (sequence.attention(q, x["k"], x["b"], window=9),)

  return {
      "gla": lambda x: (mod.gla if is_seq else gla)(
          x["q"], x["k"], x["v"], x.get("log_g"), h0=x.get("h0"), chunk_size=chunk,
          impl=impl, segment_ids=x.get("segment_ids")),
      "gated_delta_rule": lambda x: (mod.delta_rule if is_seq else delta_rule)(
          x["q"], x["k"], x["v"], x["beta"], log_g=x["log_g_head"],
          h0=x.get("h0"), chunk_size=chunk, impl=impl,
          segment_ids=x.get("segment_ids")),
      "delta_rule": lambda x: (mod.delta_rule if is_seq else delta_rule)(
          x["q"], x["k"], x["v"], x["beta"], chunk_size=chunk, impl=impl,
          segment_ids=x.get("segment_ids")),
      # RWKV-7's form: a = k, b = -(|a| o k) (removal rates in [0, 1], some
      # exactly 0), u = k; per-channel gates.
      "dplr": lambda x: (mod.dplr if is_seq else dplr)(
          x["q"], x["k"], -jnp.abs(x["a"]) * x["k"], x["k"], x["v"],
          x.get("log_g"), h0=x.get("h0"), chunk_size=chunk, impl=impl,
          segment_ids=x.get("segment_ids")),
      "ssm_scan": lambda x: (mod.ssm_scan if is_seq else ssm_scan)(
          x["a"], x["b"], h0=x.get("h0_ssm"), impl=impl,
          segment_ids=x.get("segment_ids")),
      "selective_scan": lambda x: (mod.selective_scan if is_seq else selective_scan)(
          x["ss_x"], x["ss_dt"], x["ss_A"], x["ss_B"], x["ss_C"], D=x["ss_D"],
          h0=x.get("h0_ss"), chunk_size=4, impl=impl, eigenvalue_range="signed",
          segment_ids=x.get("segment_ids")),
      "selective_scan_grouped": lambda x: (
          mod.selective_scan if is_seq else selective_scan)(
              x["ss_x"], x["ss_dt"], x["ss_A"], x["ss_Bg"], x["ss_Cg"],
              h0=x.get("h0_ss"), chunk_size=4, impl=impl,
              segment_ids=x.get("segment_ids")),
      "attention": attention,
  }


def _grads_fn(ops, names):
  """jit(inputs) -> {op: (outputs, gradients of every input)}, with fixed
  cotangents on every output (so final states count too)."""
  def run(x):
    out = {}
    seg = x.get("segment_ids")  # not differentiated
    for name in names:
      arrays = {k: v for k, v in x.items()
                if v is not None and k != "segment_ids"}
      ys, pull = jax.vjp(lambda a: ops[name]({**a, "segment_ids": seg}), arrays)
      cts = tuple(jnp.cos(0.37 * jnp.arange(y.size, dtype=jnp.float32) + i
                          ).reshape(y.shape) for i, y in enumerate(ys))
      out[name] = (ys, pull(cts)[0])
    return out
  return jax.jit(run)


def _compare(actual, expected, what):
  for name, ((ys, g), (ys_e, g_e)) in ((n, (actual[n], expected[n]))
                                       for n in expected):
    for i, (y, y_e) in enumerate(zip(ys, ys_e, strict=True)):
      numerics.assert_close(y, y_e, rtol=RTOL, what=f"{what} {name} output {i}")
    for arg in g_e:
      # Inputs the op does not read have zero gradients on both sides.
      numerics.assert_close(g[arg], g_e[arg], rtol=RTOL,
                            what=f"{what} {name} d{arg}")


def _mesh(shape):
  return make_mesh(MeshConfig(shape=shape))


def check_ops(results, *, names, shape_args, gate, h0, chunk, tag,
              segments=False, meshes=MESHES):
  x = _inputs(0, *shape_args, gate=gate, h0=h0, segments=segments)
  t0 = time.perf_counter()
  expected = _grads_fn(_ops(None, chunk), names)(x)
  for shape in meshes:
    with jax.set_mesh(_mesh(shape)):
      actual = _grads_fn(_ops(sequence, chunk), names)(x)
    _compare(actual, expected, f"{tag} mesh {shape}")
  results[f"ops_{tag}_s"] = round(time.perf_counter() - t0, 1)


def collectives(compiled_text):
  """[(kind, bytes of the result)] of every collective in compiled HLO text."""
  out = []
  for line in compiled_text.splitlines():
    m = COLLECTIVE.search(line)
    if not m or " = " not in line[:m.start() + 1]:
      continue
    result = line[line.index(" = ") + 3:m.start()]  # a shape or a tuple of them
    shapes = re.findall(r"(\w+)\[([\d,]*)\]", result)
    size = sum(_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d]))
               for t, dims in shapes)
    out.append((m.group(1), size))
  return out


def check_hlo(results):
  """One forward + backward through one layer of each op on seq = 8, compiled
  together: per linear op one all-gather and one reduce-scatter of the same
  byte size at T = 1024 and 4096, attention's two growing with T, and no other
  collective."""
  B, H, K, V = 2, 2, 16, 24
  layers = {  # name -> fn(q, v, log_g, beta); the order of the collectives
      "gla": lambda q, v, g, beta: sequence.gla(q, q, v, g, chunk_size=64,
                                                impl="chunked"),
      "delta_rule": lambda q, v, g, beta: sequence.delta_rule(
          q, q, v, beta, log_g=beta, chunk_size=64, impl="chunked"),
      "ssm_scan": lambda q, v, g, beta: sequence.ssm_scan(g, q, impl="chunked"),
      "attention": lambda q, v, g, beta: (sequence.attention(q, q, q),),
  }

  def loss(*a):  # final states included
    return sum(jnp.sum(y * y) for f in layers.values() for y in f(*a))

  mesh = _mesh({"seq": 8})
  found = {}
  for T in (1024, 4096):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in
            ((B, T, H, K), (B, T, H, V), (B, T, H, K), (B, T, H))]
    with jax.set_mesh(mesh):
      text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(
          *args).compile().as_text()
    found[T] = collectives(text)
  results["hlo"] = {str(t): f for t, f in found.items()}
  for T, f in found.items():
    kinds = sorted(k for k, _ in f)
    assert kinds == ["all-gather"] * 4 + ["reduce-scatter"] * 4, (T, f)

  def sizes(f, kind):
    return sorted(s for k, s in f if k == kind)

  # Per-layer summary sizes [n, B, H, K, V + 1] etc. (f32 bytes, gathered).
  n = 8
  linear = sorted([n * B * H * K * (V + 1) * 4, n * B * H * K * (K + V) * 4,
                   n * 2 * B * H * K * 4])
  for kind, per_device in (("all-gather", 1), ("reduce-scatter", n)):
    small, large = sizes(found[1024], kind), sizes(found[4096], kind)
    assert small[:3] == large[:3] == [x // per_device for x in linear], (
        kind, small, large, linear)
    assert large[3] == 4 * small[3], (kind, small, large)  # attention: O(T)


def check_hlo_selective_scan(results):
  """The selective scan's forward + backward on seq = 8: one all-gather of the
  [2, B, E, N] summaries and its reduce-scatter, the same bytes at T = 1024 and
  4096. Its other collectives are all-reduces: over seq, of the A and D
  gradients only (parameters replicated over the slices; independent of T);
  and over ``tensor`` alone, of the B and C gradients, which every channel
  shares while the channels are split over ``tensor`` (a real reduction when
  tensor > 1; here tensor = 1 and it moves nothing)."""
  B, E, N = 2, 32, 16
  f = lambda x, dt, a, b, c, d: sequence.selective_scan(  # noqa: E731
      x, dt, a, b, c, D=d, chunk_size=64, impl="chunked")

  def loss(*a):
    return sum(jnp.sum(y * y) for y in f(*a))

  mesh = _mesh({"seq": 8})
  found, over_seq = {}, {}
  for T in (1024, 4096):
    shapes = ((B, T, E), (B, T, E), (E, N), (B, T, N), (B, T, N), (E,))
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    with jax.set_mesh(mesh):
      text = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).lower(
          *args).compile().as_text()
    found[T] = sorted(collectives(text))
    # (bytes, reduced mesh axes) of every all-reduce
    reduces = [re.search(r"replica_groups=mesh\[[^\]]*\] \{([^}]*)\}", line)
               for line in text.splitlines() if COLLECTIVE.search(line)
               and COLLECTIVE.search(line).group(1) == "all-reduce"]
    assert all(reduces), text
    over_seq[T] = ["'seq'" in r.group(1) for r in reduces]
    assert sum(over_seq[T]) <= 1, (T, reduces)
    assert all("'seq'" in r.group(1) or r.group(1) == "'tensor'"
               for r in reduces), (T, [r.group(1) for r in reduces])
  results["hlo_selective_scan"] = {str(t): f for t, f in found.items()}
  summary = 8 * 2 * B * E * N * 4
  for T, f in found.items():
    kinds = sorted(k for k, _ in f)
    assert set(kinds) == {"all-gather", "reduce-scatter", "all-reduce"}, (T, f)
    assert [s for k, s in f if k == "all-gather"] == [summary], (T, f, summary)
    assert [s for k, s in f if k == "reduce-scatter"] == [summary // 8], (T, f)
  # The all-reduce over seq: dA [E, N] and dD [E], combined, at every T.
  reduced = {T: [s for k, s in f if k == "all-reduce"] for T, f in found.items()}
  assert min(reduced[1024]) == min(reduced[4096]) == (E * N + E) * 4, found


def check_train_step(results, pattern):
  """A hybrid LM's train step on (data=2, seq=4) equals one device's, and its
  HLO holds one all-gather and one reduce-scatter per mixer layer."""
  cfg = LMConfig(vocab_size=64, d_model=32, n_layers=len(pattern), n_heads=2,
                 pattern=pattern, impl="chunked", chunk_size=16,
                 mixer_kwargs={"gated_delta_net": {"beta_scale": 2.0},
                               "mamba": {"eigenvalue_range": "signed",
                                         "state_size": 4},
                               "s4d": {"state_size": 4}})
  B, T = 4, 40  # T / seq = 10: not a multiple of the chunk
  optimizer = optax.adamw(1e-2, eps=1e-3)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size,
                                                          (B, T + 1)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": jnp.ones((B, T), jnp.int32)}

  state = None

  def run(mesh):
    nonlocal state
    setup = state_lib.build(cfg, optimizer, mesh, None)
    step = jax.jit(step_lib.make_train_step(setup, optax.constant_schedule(1e-2)),
                   in_shardings=(setup.shardings, setup.batch_sharding),
                   out_shardings=(setup.shardings, None))
    with jax.set_mesh(mesh):
      # One initialisation (its compile is slow), laid out on each mesh.
      state = (state_lib.create(setup, 0) if state is None else
               jax.device_put(state, setup.shardings))
      b = jax.device_put(batch, setup.batch_sharding)
      text = step.lower(state, b).compile().as_text()
      new, metrics = step(state, b)
    return jax.device_get((new["params"], metrics)), collectives(text)

  (params_1, m_1), _ = run(make_mesh(MeshConfig(shape={"data": 1}),
                                     jax.devices()[:1]))
  (params_8, m_8), found = run(_mesh({"data": 2, "seq": 4}))
  for k in ("loss", "grad_norm"):
    numerics.assert_close(m_8[k], m_1[k], rtol=TRAIN_RTOL, what=f"train step {k}")
  numerics.assert_pytrees_close(params_8, params_1, rtol=TRAIN_RTOL,
                                what="params after one step ")
  gathers = [s for k, s in found if k == "all-gather"]
  scatters = [s for k, s in found if k == "reduce-scatter"]
  results["train_step_" + "_".join(pattern)] = {
      "loss": float(m_8["loss"]), "collectives": found}
  # One all-gather per mixer layer (state summaries; attention's K and V) and
  # its transpose, one reduce-scatter.
  assert len(gathers) == len(scatters) == cfg.n_layers, found
  # Activations are never resharded wholesale: the short convolutions move only
  # their (W - 1)-token halos (collective-permutes), no all-to-all.
  assert not [k for k, _ in found if k == "all-to-all"], found


def main(slow: bool):
  assert len(jax.devices()) == 8, jax.devices()
  results = {}
  t0 = time.perf_counter()
  # Packed rows and per-head gates on seq = 8 alone (its 5-token slices hold
  # every document layout of ``_segment_ids``), every mesh with --slow: the
  # suite's time budget.
  more_meshes = MESHES if slow else ({"seq": 8},)
  with jax.default_matmul_precision("highest"):
    check_ops(results, names=("gla", "gated_delta_rule", "dplr", "ssm_scan",
                              "attention", "selective_scan"),
              shape_args=(2, 40, 2, 8, 12), gate="channel", h0=True, chunk=16,
              tag="default")
    check_ops(results, names=("gla", "gated_delta_rule", "dplr", "ssm_scan",
                              "selective_scan"),
              shape_args=(2, 40, 2, 8, 12), gate="channel", h0=True, chunk=16,
              tag="documents", segments=True, meshes=more_meshes)
    # One gate per head ([B, T, H]: Mamba-2, RetNet, Lightning): the chunked
    # scalar-decay form in every slice, per-head slice decays, with and without
    # documents.
    for segments in (False, True):
      check_ops(results, names=("gla",), shape_args=(2, 40, 2, 8, 12),
                gate="head", h0=True, chunk=16,
                tag="gla_head" + ("_documents" if segments else ""),
                segments=segments, meshes=more_meshes)
    t1 = time.perf_counter()
    check_hlo(results)
    check_hlo_selective_scan(results)
    t2 = time.perf_counter()
    check_train_step(results, ("gated_delta_net", "attention"))
    results["hlo_s"] = round(t2 - t1, 1)
    results["train_step_s"] = round(time.perf_counter() - t2, 1)
    if slow:
      check_train_step(results, ("gla", "mamba", "s4d", "delta_net", "attention"))
      check_ops(results, names=("gla", "delta_rule", "ssm_scan",
                                "selective_scan_grouped"),
                shape_args=(2, 72, 2, 16, 8), gate="head", h0=False, chunk=16,
                tag="head_gate")
      check_ops(results, names=("gla", "gated_delta_rule", "ssm_scan",
                                "attention"),
                shape_args=(1, 200, 2, 8, 12), gate="none", h0=True, chunk=64,
                tag="no_gate_chunk64")
  results["total_s"] = round(time.perf_counter() - t0, 1)
  print(json.dumps(results))


if __name__ == "__main__":
  main(slow="--slow" in sys.argv[1:])
