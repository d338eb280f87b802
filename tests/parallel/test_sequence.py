"""LASP-2 sequence parallelism (lsm.parallel.sequence).

In this process (one CPU device): each op's per-slice code, run under a vmap
that stands in for the ``seq`` mesh axis (all_gather and axis_index work the
same there), composes the slices into the op over the whole sequence; without a
mesh the wrappers are the ops; bad lengths and meshes fail before compiling.
On 8 forced CPU devices (seq_check.py in a subprocess; the device count is fixed
at JAX start): outputs and gradients against one device, the collectives in the
compiled HLO, and a hybrid LM train step on (data=2, seq=4).
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsm.ops.common import segments
from lsm.ops.delta_rule import delta_rule
from lsm.ops.dplr import dplr
from lsm.ops.gla import gla
from lsm.ops.selective_scan import selective_scan
from lsm.ops.ssm_scan import ssm_scan
from lsm.parallel import sequence
from lsm.parallel.mesh import resolve_shape
from tests import numerics

ROOT = pathlib.Path(__file__).resolve().parents[2]
RTOL = numerics.TOLERANCES[("invariant", "float32")]
B, T, H, K, V, N = 2, 40, 2, 8, 12, 4  # N slices of 10 tokens; chunk 16
# The slice code is the same for every impl; the token-by-token reference
# compiles fastest under vmap (seq_check.py runs the chunked impl on 8 devices).
IMPL = "reference"


@functools.cache
def _inputs(seed=0):
  """Seeded inputs (numpy's generator: compiling jax.random's here costs more
  than all the tests in this file)."""
  rng = np.random.default_rng(seed)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  k = rng.standard_normal((B, T, H, K))
  a = rng.uniform(-1.0, 1.0, (B, T, H, K))
  x = {
      "q": f32(rng.standard_normal((B, T, H, K))),
      "k": f32(k / np.linalg.norm(k, axis=-1, keepdims=True)),
      "v": f32(rng.standard_normal((B, T, H, V))),
      "log_g": f32(-np.exp(2 * rng.standard_normal((B, T, H, K)))),  # to -20+
      "log_g_head": f32(-np.exp(rng.standard_normal((B, T, H)))),
      "beta": f32(rng.uniform(0.0, 2.0, (B, T, H))),
      "a": f32(np.where(np.abs(a) < 0.05, 0.0, a)),  # signed, exact zeros
      "h0": f32(rng.standard_normal((B, H, K, V))),
  }
  # DPLR (RWKV-7's form): a = k, b = -(alpha o k), alpha in [0, 1] per channel.
  x["dplr_b"] = -f32(rng.uniform(0.0, 1.0, (B, T, H, K))) * x["k"]
  return x


def _emulate(slice_fn, seq_args, h0):
  """Runs ``slice_fn(*slices, h0)`` for N slices of T under a vmap named like
  the mesh axis; returns (outputs over T, final states of every slice)."""
  split = [x.reshape(x.shape[0], N, T // N, *x.shape[2:]) for x in seq_args]
  out = jax.vmap(lambda *xs: slice_fn(*xs, h0), in_axes=1, out_axes=1,
                 axis_name=sequence.SEQ_AXIS)(*split)
  y, h_t = out
  return y.reshape(y.shape[0], T, *y.shape[3:]), h_t


CASES = {
    "gla": (
        lambda x: functools.partial(
            sequence.gla_slice, call=functools.partial(
                gla, scale=K ** -0.5, chunk_size=16, impl=IMPL),
            scale=K ** -0.5, axis=sequence.SEQ_AXIS),
        ("q", "k", "v", "log_g"),
        lambda x: gla(x["q"], x["k"], x["v"], x["log_g"], h0=x["h0"],
                      chunk_size=16, impl=IMPL)),
    # One gate per head, [B, T, H]: the slices' decays stay per head.
    "gla_head": (
        lambda x: functools.partial(
            sequence.gla_slice, call=functools.partial(
                gla, scale=K ** -0.5, chunk_size=16, impl=IMPL),
            scale=K ** -0.5, axis=sequence.SEQ_AXIS),
        ("q", "k", "v", "log_g_head"),
        lambda x: gla(x["q"], x["k"], x["v"], x["log_g_head"], h0=x["h0"],
                      chunk_size=16, impl=IMPL)),
    "gated_delta_rule": (
        lambda x: lambda q, k, v, beta, g, h0: sequence.delta_rule_slice(
            q, k, v, beta, g, h0, axis=sequence.SEQ_AXIS,
            call=functools.partial(delta_rule, chunk_size=16, impl=IMPL)),
        ("q", "k", "v", "beta", "log_g_head"),
        lambda x: delta_rule(x["q"], x["k"], x["v"], x["beta"],
                             log_g=x["log_g_head"], h0=x["h0"], chunk_size=16,
                             impl=IMPL)),
    "dplr": (
        lambda x: lambda q, a, b, u, v, g, h0: sequence.dplr_slice(
            q, a, b, u, v, g, h0, axis=sequence.SEQ_AXIS,
            call=functools.partial(dplr, chunk_size=16, impl=IMPL)),
        ("q", "k", "dplr_b", "k", "v", "log_g"),
        lambda x: dplr(x["q"], x["k"], x["dplr_b"], x["k"], x["v"], x["log_g"],
                       h0=x["h0"], chunk_size=16, impl=IMPL)),
    "ssm_scan": (
        lambda x: functools.partial(
            sequence.ssm_scan_slice, call=functools.partial(ssm_scan,
                                                            impl=IMPL),
            axis=sequence.SEQ_AXIS),
        ("a", "q"),
        lambda x: ssm_scan(x["a"], x["q"], h0=x["h0"][..., 0], impl=IMPL)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_slices_compose_into_the_whole_sequence(name):
  make, seq_names, whole = CASES[name]
  x = _inputs()
  h0 = x["h0"][..., 0] if name == "ssm_scan" else x["h0"]
  y, h_t = jax.jit(lambda x: _emulate(make(x), [x[n] for n in seq_names], h0))(x)
  y_e, h_e = jax.jit(whole)(x)
  numerics.assert_close(y, y_e, rtol=RTOL, what=f"{name} output")
  for i in range(N):  # every slice computes the same final state
    numerics.assert_close(h_t[:, i], h_e, rtol=RTOL, what=f"{name} h_T slice {i}")


# Packed rows (T = 40, N = 4 slices of 10): document starts inside slices,
# several in one slice, exactly at slice edges (10, 20, 30), slices with none.
_LENGTHS = ((10, 3, 1, 26), (20, 7, 3, 10))
_SEGMENT_IDS = jnp.asarray(np.stack(
    [np.repeat(np.arange(1, len(n) + 1), n) for n in _LENGTHS]), jnp.int32)

DOC_CASES = {
    "gla": (lambda ids, resets, x, h0: sequence.gla_slice(
        x["q"], x["k"], x["v"], x["log_g"], h0, ids, resets,
        call=functools.partial(gla, scale=K ** -0.5, chunk_size=16, impl=IMPL),
        scale=K ** -0.5, axis=sequence.SEQ_AXIS),
            lambda x: gla(x["q"], x["k"], x["v"], x["log_g"], h0=x["h0"],
                          chunk_size=16, impl=IMPL, segment_ids=_SEGMENT_IDS)),
    "gla_head": (lambda ids, resets, x, h0: sequence.gla_slice(
        x["q"], x["k"], x["v"], x["log_g_head"], h0, ids, resets,
        call=functools.partial(gla, scale=K ** -0.5, chunk_size=16, impl=IMPL),
        scale=K ** -0.5, axis=sequence.SEQ_AXIS),
                 lambda x: gla(x["q"], x["k"], x["v"], x["log_g_head"],
                               h0=x["h0"], chunk_size=16, impl=IMPL,
                               segment_ids=_SEGMENT_IDS)),
    "gated_delta_rule": (lambda ids, resets, x, h0: sequence.delta_rule_slice(
        x["q"], x["k"], x["v"], x["beta"], x["log_g_head"], h0, ids, resets,
        call=functools.partial(delta_rule, chunk_size=16, impl=IMPL),
        axis=sequence.SEQ_AXIS),
                         lambda x: delta_rule(
                             x["q"], x["k"], x["v"], x["beta"],
                             log_g=x["log_g_head"], h0=x["h0"], chunk_size=16,
                             impl=IMPL, segment_ids=_SEGMENT_IDS)),
    "dplr": (lambda ids, resets, x, h0: sequence.dplr_slice(
        x["q"], x["k"], x["dplr_b"], x["k"], x["v"], x["log_g"], h0, ids, resets,
        call=functools.partial(dplr, chunk_size=16, impl=IMPL),
        axis=sequence.SEQ_AXIS),
             lambda x: dplr(x["q"], x["k"], x["dplr_b"], x["k"], x["v"],
                            x["log_g"], h0=x["h0"], chunk_size=16, impl=IMPL,
                            segment_ids=_SEGMENT_IDS)),
    "ssm_scan": (lambda ids, resets, x, h0: sequence.ssm_scan_slice(
        x["a"], x["q"], h0[..., 0], resets,
        call=functools.partial(ssm_scan, impl=IMPL), axis=sequence.SEQ_AXIS),
                 lambda x: ssm_scan(x["a"], x["q"], h0=x["h0"][..., 0],
                                    impl=IMPL, segment_ids=_SEGMENT_IDS)),
}


@pytest.mark.parametrize("name", list(DOC_CASES))
def test_slices_compose_with_documents(name):
  """Each slice sees its part of the row's document ids and the reset flags of
  the whole row (a slice's first token may start a document); composed, they
  give the op on the whole packed row."""
  slice_fn, whole = DOC_CASES[name]
  # Mild decays, so that a state wrongly carried across a start would show.
  x = {n: v * 0.05 if n.startswith("log_g") else v for n, v in _inputs().items()}
  resets = segments.resets(_SEGMENT_IDS)

  def emulate(x):
    per_slice = lambda a: a.reshape(a.shape[0], N, T // N, *a.shape[2:])
    xs = {k: per_slice(v) for k, v in x.items() if k != "h0"}
    return jax.vmap(lambda ids, r, xs: slice_fn(ids, r, xs, x["h0"]),
                    in_axes=1, out_axes=1, axis_name=sequence.SEQ_AXIS)(
                        per_slice(_SEGMENT_IDS), per_slice(resets), xs)

  y, h_t = jax.jit(emulate)(x)
  y = y.reshape(y.shape[0], T, *y.shape[3:])
  y_e, h_e = jax.jit(whole)(x)
  numerics.assert_close(y, y_e, rtol=RTOL, what=f"{name} output")
  for i in range(N):
    numerics.assert_close(h_t[:, i], h_e, rtol=RTOL, what=f"{name} h_T slice {i}")


@functools.cache
def _selective_inputs(seed=0):
  """x, dt [B, T, E]; A [E, S]; B, C [B, T, G, S] (G = 2 groups); D [E]; h0
  [B, E, S]. dt reaches 3, so signed decays 2 exp(dt A) - 1 reach -1."""
  rng = np.random.default_rng(seed)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  E, S, G = 6, 3, 2
  return {"x": f32(rng.standard_normal((B, T, E))),
          "dt": f32(rng.uniform(0.0, 3.0, (B, T, E))),
          "A": f32(-rng.uniform(0.2, 2.0, (E, S))),
          "B": f32(rng.standard_normal((B, T, G, S))),
          "C": f32(rng.standard_normal((B, T, G, S))),
          "D": f32(rng.standard_normal((E,))),
          "h0": f32(rng.standard_normal((B, E, S)))}


@pytest.mark.parametrize("documents", [False, True], ids=["rows", "documents"])
def test_selective_scan_slices_compose(documents):
  """As test_slices_compose_into_the_whole_sequence (and with documents):
  signed decays, grouped B and C, a skip D and h0."""
  x = _selective_inputs()
  ids = _SEGMENT_IDS if documents else None
  call = functools.partial(selective_scan, impl=IMPL, chunk_size=4,
                           eigenvalue_range="signed")
  seq = ("x", "dt", "B", "C")

  def emulate(x):
    per_slice = lambda a: a.reshape(a.shape[0], N, T // N, *a.shape[2:])  # noqa: E731
    extra = () if ids is None else (per_slice(ids),
                                     per_slice(segments.resets(ids)))

    def one(*args):
      xs, docs = args[:len(seq)], args[len(seq):]
      return sequence.selective_scan_slice(
          *xs[:2], x["A"], *xs[2:], x["D"], x["h0"], *docs, call=call,
          axis=sequence.SEQ_AXIS)

    return jax.vmap(one, in_axes=1, out_axes=1, axis_name=sequence.SEQ_AXIS)(
        *(per_slice(x[n]) for n in seq), *extra)

  y, h_t = jax.jit(emulate)(x)
  y = y.reshape(y.shape[0], T, *y.shape[3:])
  y_e, h_e = jax.jit(lambda x: call(x["x"], x["dt"], x["A"], x["B"], x["C"],
                                    D=x["D"], h0=x["h0"], segment_ids=ids))(x)
  numerics.assert_close(y, y_e, rtol=RTOL, what="selective_scan output")
  for i in range(N):
    numerics.assert_close(h_t[:, i], h_e, rtol=RTOL,
                          what=f"selective_scan h_T slice {i}")


def test_attention_slices_see_global_causal_positions():
  x = _inputs()
  q = jnp.concatenate([x["q"], x["k"]], axis=2)  # 4 query heads, 2 kv heads
  body = functools.partial(sequence.attention_slice, window=9,
                           axis=sequence.SEQ_AXIS)

  @jax.jit
  def run(q, k, v):
    split = [y.reshape(B, N, T // N, *y.shape[2:]) for y in (q, k, v)]
    o = jax.vmap(body, in_axes=1, out_axes=1, axis_name=sequence.SEQ_AXIS)(*split)
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                            local_window_size=(8, 0))
    return o, expected

  o, expected = run(q, x["k"], x["q"])
  numerics.assert_close(o.reshape(expected.shape), expected, rtol=RTOL,
                        what="attention")


def test_without_a_mesh_the_wrappers_are_the_ops():
  x = _inputs()
  assert sequence.seq_size() == 1
  args = (x["q"], x["k"], x["v"], x["log_g"])
  wrapped = jax.make_jaxpr(lambda *a: sequence.gla(*a, chunk_size=16))(*args)
  plain = jax.make_jaxpr(lambda *a: gla(*a, chunk_size=16))(*args)
  assert str(wrapped) == str(plain)


def _abstract_mesh(seq: int):
  return jax.sharding.AbstractMesh((seq,), (sequence.SEQ_AXIS,),
                                   axis_types=(jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("op", ["gla", "delta_rule", "dplr", "ssm_scan",
                                "selective_scan", "attention"])
def test_length_not_divisible_by_seq_raises_before_compiling(op):
  x = _inputs()
  s = _selective_inputs()
  calls = {
      "selective_scan": lambda: sequence.selective_scan(
          s["x"], s["dt"], s["A"], s["B"], s["C"]),
      "gla": lambda: sequence.gla(x["q"], x["k"], x["v"]),
      "delta_rule": lambda: sequence.delta_rule(x["q"], x["k"], x["v"],
                                                x["beta"]),
      "dplr": lambda: sequence.dplr(x["q"], x["k"], x["dplr_b"], x["k"],
                                    x["v"]),
      "ssm_scan": lambda: sequence.ssm_scan(x["a"], x["q"]),
      "attention": lambda: sequence.attention(x["q"], x["q"], x["q"]),
  }
  with jax.sharding.use_abstract_mesh(_abstract_mesh(3)):  # T = 40
    assert sequence.seq_size() == 3
    with pytest.raises(ValueError, match=r"T=40 is not divisible by the mesh's "
                       r"'seq' axis of size 3"):
      jax.eval_shape(calls[op])


def _shard_map_avals(jaxpr):
  """Avals of every operand and result of every shard_map in ``jaxpr``, nested
  jaxprs (the pullback's, remat's, ...) included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "shard_map":
      out += [v.aval for v in (*eqn.invars, *eqn.outvars)]
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          out += _shard_map_avals(sub)
  return out


@pytest.mark.parametrize("op", ["gla", "delta_rule", "dplr", "ssm_scan",
                                "selective_scan", "attention"])
def test_no_zero_size_array_crosses_a_shard_map(op):
  # jax/jaxlib 0.11.2 (2026-12-01): XLA CPU's compile segfaults in Shardy
  # (ManualComputationUnusedInputsPattern) on a shard_map that uses a zero-size
  # operand; autodiff residuals of associative_scan are such arrays (the
  # sequence.ssm_scan workaround). Checked here on the traced vjp (T / seq =
  # 10 gives them), without compiling or a second device.
  x = {**_inputs(), **{"ss_" + k: v for k, v in _selective_inputs().items()}}
  calls = {
      "selective_scan": lambda x: sequence.selective_scan(
          x["ss_x"], x["ss_dt"], x["ss_A"], x["ss_B"], x["ss_C"], D=x["ss_D"],
          h0=x["ss_h0"], chunk_size=4, impl="chunked"),
      "gla": lambda x: sequence.gla(x["q"], x["k"], x["v"], x["log_g"],
                                    h0=x["h0"], chunk_size=16, impl="chunked"),
      "delta_rule": lambda x: sequence.delta_rule(
          x["q"], x["k"], x["v"], x["beta"], log_g=x["log_g_head"], h0=x["h0"],
          chunk_size=16, impl="chunked"),
      "dplr": lambda x: sequence.dplr(
          x["q"], x["k"], x["dplr_b"], x["k"], x["v"], x["log_g"], h0=x["h0"],
          chunk_size=16, impl="chunked", segment_ids=_SEGMENT_IDS),
      "ssm_scan": lambda x: sequence.ssm_scan(x["a"], x["q"], h0=x["h0"][..., 0],
                                              impl="chunked"),
      "attention": lambda x: (sequence.attention(x["q"], x["k"], x["q"]),),
  }

  def run(x):
    ys, pull = jax.vjp(calls[op], x)
    return pull(tuple(jnp.ones_like(y) for y in ys))

  with jax.sharding.use_abstract_mesh(_abstract_mesh(N)):
    avals = _shard_map_avals(jax.make_jaxpr(run)(x).jaxpr)
  assert len(avals) > 4, "no shard_map traced"
  assert not [a for a in avals if 0 in a.shape], avals


@pytest.mark.parametrize("documents", [False, True], ids=["rows", "documents"])
def test_head_gates_stay_per_head_in_the_slices(documents):
  """sequence.gla with [B, T, H] gates on a seq = 4 mesh (traced, forward and
  backward): the op in each slice gets [B, t, H] gates, and nothing widens a
  [B, t, H] array to float32 [B, t, H, K] (the slice's decays scale the rows
  of its [B, t, H, V] readout instead)."""
  from tests.ops.test_gla import gate_broadcasts
  x = _inputs()
  ids = _SEGMENT_IDS if documents else None
  seen = []

  def op(q, k, v, log_g, **kw):
    seen.append(log_g.shape)
    return gla(q, k, v, log_g, **kw)

  def run(x):
    f = lambda x: sequence.gla(x["q"], x["k"], x["v"], x["log_g_head"],  # noqa: E731
                               h0=x["h0"], chunk_size=16, impl="chunked",
                               segment_ids=ids)
    ys, pull = jax.vjp(f, x)
    return pull(tuple(jnp.ones_like(y) for y in ys))

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sequence, "_gla_op", op)
    with jax.sharding.use_abstract_mesh(_abstract_mesh(N)):
      jaxpr = jax.make_jaxpr(run)(x).jaxpr
  assert (B, T // N, H) in seen, seen
  assert not [s for s in seen if len(s) != 3], seen
  leads = [(B, T // N, H), (B, 16, H), (B, T, H)]  # slice, padded slice, row
  assert not gate_broadcasts(jaxpr, leads, K)


@pytest.mark.parametrize("shape, match", [
    ({"data": -1, "seq": 3}, r"'seq': 3.*does not divide the 8 devices"),
    ({"seq": 3}, r"'seq': 3.*needs 3 devices; 8 are available"),
])
def test_seq_not_dividing_the_devices_raises(shape, match):
  with pytest.raises(ValueError, match=match):
    resolve_shape(shape, 8)


def _run_check(tmp_path, *args, timeout):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
      [sys.executable, str(ROOT / "tests/parallel/seq_check.py"), *args],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_eight_devices_match_one_device_with_state_sized_collectives(tmp_path):
  result = _run_check(tmp_path, timeout=280)
  # The summaries' bytes do not grow with T (asserted in the script too).
  hlo = result["hlo"]
  linear = sorted(s for k, s in hlo["1024"] if k == "all-gather")[:3]
  assert linear == sorted(s for k, s in hlo["4096"] if k == "all-gather")[:3]


@pytest.mark.slow
def test_eight_devices_broader_sweep(tmp_path):
  _run_check(tmp_path, "--slow", timeout=600)
