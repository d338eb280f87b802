"""DPLR transitions (lsm.ops.dplr): chunked against the float32 reference on
outputs, final state and every gradient; the identities with the delta rule,
GLA and DeltaProduct; the recurrence's invariants; input checks."""

import functools

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

from lsm.ops import _dispatch
from lsm.ops.delta_rule import delta_rule
from lsm.ops.dplr import api, dplr, dplr_step
from lsm.ops.dplr import chunked, delta_product
from lsm.ops.gla import gla
from tests import numerics
from tests.ops import harness

GATES = ["channel", "head", None]
INVARIANT = numerics.TOLERANCES[("invariant", "float32")]

# (B, T, H, K, V, chunk): awkward on purpose.
SHAPES = {
    # T not a multiple of the chunk, K != V, several chunks in each of
    # several rematerialised groups (chunked.GROUP_TOKENS = 128 per channel:
    # two groups; HEAD_GROUP_TOKENS cut to 64 below for per-head and no
    # gates: three, the last padded), and chunk 32: the per-channel pairs use
    # their batched levels and one level above them.
    "T150_KneV": (1, 150, 2, 16, 24, 32),
    "TltC": (1, 40, 1, 16, 8, 64),  # T shorter than one chunk (levels to 64)
}
MAIN = "T150_KneV"
# Packed rows: two rows, documents starting mid-chunk and on a boundary.
DOCS = (2, 63, 2, 16, 24, 16)

# The gradients of a, b, u are named with the op: tests/numerics.py's "da" and
# "db" rows are ssm_scan's (its A and B), measured on other arithmetic.
_QUALIFIED = {"da": "dplr:da", "db": "dplr:db", "du": "dplr:du"}


@pytest.fixture(autouse=True, scope="module")
def _head_gate_groups():
  """Per-head and no gates run in groups of 64 tokens here (256 by default),
  so MAIN's 150 tokens cross group boundaries with every gate form."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(chunked, "HEAD_GROUP_TOKENS", 64)
    yield


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(seed, B, T, H, K, V, *, gate="channel", dtype=jnp.float32,
                log_g_value=None, mixed=False):
  """RWKV-7-like inputs: a = kk (unit), b = -(alpha o kk) with alpha in [0, 2]
  per channel (eigenvalues down to -1 along kk), u and q free, gates
  log_sigmoid(N(2, 1)); ``log_g_value`` a constant gate instead, ``mixed``
  gates drawn from {-50, -5, mild} per token and channel."""
  ks = jax.random.split(jax.random.key(seed), 8)
  kk = _unit(jax.random.normal(ks[0], (B, T, H, K)))
  alpha = 2.0 * jax.random.uniform(ks[1], (B, T, H, K))
  out = dict(q=jax.random.normal(ks[2], (B, T, H, K)), a=kk, b=-alpha * kk,
             u=0.5 * jax.random.normal(ks[3], (B, T, H, K)),
             v=jax.random.normal(ks[4], (B, T, H, V)))
  if gate is not None:
    shape = (B, T, H, K) if gate == "channel" else (B, T, H)
    log_g = jax.nn.log_sigmoid(jax.random.normal(ks[5], shape) + 2.0)
    if log_g_value is not None:
      log_g = jnp.full(shape, log_g_value)
    if mixed:
      pick = jax.random.randint(ks[6], shape, 0, 4)
      log_g = jnp.where(pick == 0, -50.0, jnp.where(pick == 1, -5.0, log_g))
    out["log_g"] = log_g
  out = {n: x.astype(dtype) for n, x in out.items()}
  out["h0"] = jax.random.normal(ks[7], (B, H, K, V))
  return out


def check(primals, chunk, key, op=dplr):
  """chunked against reference: o, h_T and the gradient of every input, each
  against its own row of tests/numerics.py."""
  names, got, want = harness.run_against_reference(op, "chunked", chunk,
                                                   primals, key)
  names = tuple(_QUALIFIED.get(n, n) for n in names)
  numerics.assert_outputs_close(got, want, impl="chunked",
                                dtype=primals["q"].dtype, names=names)


@pytest.mark.parametrize("gate", GATES)
def test_matches_reference_fp32(gate):
  *dims, chunk = SHAPES[MAIN]
  check(make_inputs(0, *dims, gate=gate), chunk, jax.random.key(1))


def test_shorter_than_a_chunk():
  *dims, chunk = SHAPES["TltC"]
  check(make_inputs(1, *dims), chunk, jax.random.key(2))


@pytest.mark.parametrize("gate", ["channel", "head"])
@pytest.mark.parametrize("log_g_value", [-5.0, -50.0])
def test_strong_decay(gate, log_g_value):
  """-5 per token: exp(-G_s) alone would overflow after 18 tokens; -50: every
  weight off the diagonal is below 2e-22, and d log_g must stay ~0 (no O(1)
  cancellations; the relative error is taken against ABS_FLOOR)."""
  *dims, chunk = SHAPES[MAIN]  # the fp32 test's shapes: one compile
  check(make_inputs(2, *dims, gate=gate, log_g_value=log_g_value), chunk,
        jax.random.key(3))


@pytest.mark.parametrize("gate", ["channel", "head"])
def test_mixed_strong_and_mild_gates(gate):
  """Gates that jump between -50, -5 and mild inside chunks: weights of O(1)
  after a strong gate, where a difference of cumsums would lose digits."""
  *dims, chunk = SHAPES[MAIN]
  check(make_inputs(4, *dims, gate=gate, mixed=True), chunk, jax.random.key(5))


def test_matches_reference_bf16():
  *dims, chunk = SHAPES[MAIN]
  check(make_inputs(6, *dims, dtype=jnp.bfloat16), chunk, jax.random.key(7))


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["head", None])
def test_matches_reference_bf16_other_gates(gate):
  *dims, chunk = SHAPES[MAIN]
  check(make_inputs(6, *dims, gate=gate, dtype=jnp.bfloat16), chunk,
        jax.random.key(7))


SEGMENTS = jnp.asarray([[0] * 13 + [1] * 30 + [2] * 20,
                        [5] * 40 + [6] * 23])  # [2, 63]


def test_documents_match_reference():
  """Packed rows, gradients included: chunked against the reference given the
  same segment_ids (documents start mid-chunk and on a chunk boundary)."""
  *dims, chunk = DOCS
  check(make_inputs(8, *dims), chunk, jax.random.key(9),
        op=functools.partial(dplr, segment_ids=SEGMENTS))


def test_documents_equal_each_alone():
  """A packed row equals its documents run alone from zero (h0 for the first)."""
  *dims, chunk = DOCS
  x = make_inputs(10, *dims)
  h0 = x.pop("h0")
  o, h = _chunked(chunk)(**x, h0=h0, segment_ids=SEGMENTS)
  ref = jax.jit(functools.partial(dplr, impl="reference"))
  for row in range(2):
    ids = SEGMENTS[row]
    starts = [0] + [t for t in range(1, ids.shape[0]) if ids[t] != ids[t - 1]]
    ends = starts[1:] + [ids.shape[0]]
    for i, (s, e) in enumerate(zip(starts, ends)):
      doc = {n: v[row:row + 1, s:e] for n, v in x.items()}
      start = h0[row:row + 1] if i == 0 else jnp.zeros_like(h0[row:row + 1])
      o_d, h_d = ref(**doc, h0=start)
      numerics.assert_close(o[row:row + 1, s:e], o_d, rtol=INVARIANT,
                            what=f"o, row {row}, document {i}")
    numerics.assert_close(h[row:row + 1], h_d, rtol=INVARIANT,
                          what=f"h_T, row {row}")


@functools.cache
def _chunked(chunk_size):
  return jax.jit(functools.partial(dplr, impl="chunked", chunk_size=chunk_size))


# Identities: the models that map onto the op. They share one shape
# (IDENTITY: B, T, H, K, V, chunk) and call the op by keyword, so the tests
# below reuse each other's compiles.
IDENTITY = (1, 40, 2, 16, 8, 16)


def _run(**kw):
  """dplr, chunked, at chunk IDENTITY[-1] (one jit per argument set)."""
  return _chunked(IDENTITY[-1])(**kw)


def _deltanet_inputs(seed, B, T, H, K, V, beta_max=2.0):
  ks = jax.random.split(jax.random.key(seed), 6)
  return dict(q=jax.random.normal(ks[0], (B, T, H, K)),
              k=_unit(jax.random.normal(ks[1], (B, T, H, K))),
              v=jax.random.normal(ks[2], (B, T, H, V)),
              beta=beta_max * jax.random.uniform(ks[3], (B, T, H)),
              log_g=jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H)) + 2.0),
              h0=jax.random.normal(ks[5], (B, H, K, V)))


def _assert_same(got, want, what):
  numerics.assert_outputs_close(got, want, impl="chunked", dtype=jnp.float32,
                                names=("o", "h_t"), what=what)


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_equals_delta_rule(gated):
  """DeltaNet: a = k, b = -beta k, u = beta k, g = 0 (beta up to 2:
  eigenvalues down to -1). Gated DeltaNet exp(g) (I - beta k k^T) S: the
  per-head decay g also folds into a = exp(g) k."""
  x = _deltanet_inputs(11, *IDENTITY[:-1])
  q, k, v, beta, log_g, h0 = (x[n] for n in ("q", "k", "v", "beta", "log_g", "h0"))
  bk = beta[..., None] * k
  if gated:
    want = delta_rule(q, k, v, beta, log_g=log_g, h0=h0, impl="reference")
    got = _run(q=q, a=jnp.exp(log_g)[..., None] * k, b=-bk, u=bk, v=v,
               log_g=log_g, h0=h0)
  else:
    want = delta_rule(q, k, v, beta, h0=h0, impl="reference")
    got = _run(q=q, a=k, b=-bk, u=bk, v=v, h0=h0)
  _assert_same(got, want, "dplr vs delta_rule")


@pytest.mark.parametrize("gate", ["channel", "head"])
def test_equals_gla_without_low_rank(gate):
  """a = b = 0, u = k: S_t = diag(exp g_t) S_{t-1} + k_t v_t^T, GLA."""
  x = make_inputs(12, *IDENTITY[:-1], gate=gate)
  want = gla(x["q"], x["u"], x["v"], x["log_g"], h0=x["h0"], impl="reference")
  got = _run(**(x | dict(a=jnp.zeros_like(x["a"]), b=jnp.zeros_like(x["b"]))))
  _assert_same(got, want, "dplr vs gla")


def _delta_product(q, k, v, beta, log_g, h0):
  """DeltaProduct through dplr as lsm's time expansion
  (lsm.ops.dplr.delta_product): k [B, T, n_h, H, K], v [B, T, n_h, H, V],
  beta [B, T, n_h, H], log_g [B, T, H]. T * n_h micro-steps; the output of
  token t is that of its last micro-step."""
  args = delta_product.expand(q, k, v, beta, log_g)
  del args["segment_ids"]
  o, h = _run(**args, h0=h0)
  return delta_product.token_outputs(o, k.shape[2]), h


@jax.jit
def _delta_product_loop(q, k, v, beta, log_g, h0):
  """The same, token by token: S <- exp(g_t) S, then n_h Householder steps
  S <- (I - beta_j k_j k_j^T) S + beta_j k_j v_j^T; o_t = K^-1/2 S^T q_t."""
  n_h, K = k.shape[2], k.shape[-1]

  def token(s, x):
    q_t, k_t, v_t, beta_t, g_t = x
    s = jnp.exp(g_t)[..., None, None] * s
    for j in range(n_h):
      kj, bj = k_t[:, j], beta_t[:, j][..., None]
      r = jnp.einsum("bhk,bhkv->bhv", kj, s, precision="highest")
      s = s + (bj * kj)[..., :, None] * (v_t[:, j] - r)[..., None, :]
    return s, K ** -0.5 * jnp.einsum("bhk,bhkv->bhv", q_t, s,
                                     precision="highest")

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, log_g))
  s, o = jax.lax.scan(token, h0, xs)
  return jnp.moveaxis(o, 0, 1), s


@pytest.mark.parametrize("n_h", [1, 2])
def test_delta_product(n_h):
  """n_h = 1 is (gated) DeltaNet; n_h = 2 against a hand-written loop of two
  Householder steps per token (beta up to 2)."""
  B, T, H, K, V, _ = IDENTITY
  T //= n_h  # T * n_h micro-steps: IDENTITY's shape
  ks = jax.random.split(jax.random.key(13), 6)
  q = jax.random.normal(ks[0], (B, T, H, K))
  k = _unit(jax.random.normal(ks[1], (B, T, n_h, H, K)))
  v = jax.random.normal(ks[2], (B, T, n_h, H, V))
  beta = 2.0 * jax.random.uniform(ks[3], (B, T, n_h, H))
  log_g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H)) + 2.0)
  h0 = jax.random.normal(ks[5], (B, H, K, V))
  got = _delta_product(q, k, v, beta, log_g, h0)
  if n_h == 1:
    want = delta_rule(q, k[:, :, 0], v[:, :, 0], beta[:, :, 0], log_g=log_g,
                      h0=h0, impl="reference")
  else:
    want = _delta_product_loop(q, k, v, beta, log_g, h0)
  _assert_same(got, want, f"DeltaProduct n_h={n_h}")


# Invariants of the recurrence (chunked against itself).


def test_split_sequence_equals_whole():
  B, T, H, K, V, chunk = IDENTITY
  x = make_inputs(14, B, 2 * T, H, K, V)
  h0 = x.pop("h0")
  o, h = _run(**x, h0=h0)
  # At T = 40, not a chunk boundary; each half is IDENTITY's shape.
  o1, h1 = _run(**{n: a[:, :T] for n, a in x.items()}, h0=h0)
  o2, h2 = _run(**{n: a[:, T:] for n, a in x.items()}, h0=h1)
  numerics.assert_close(jnp.concatenate([o1, o2], axis=1), o, rtol=INVARIANT,
                        what="o")
  numerics.assert_close(h2, h, rtol=INVARIANT, what="h_T")


def test_chunk_size_does_not_matter():
  """16, 32, 64, and 48 (not a power of two: the per-channel pairs pad the
  chunk to 64 inside)."""
  x = make_inputs(14, *IDENTITY[:-1])
  o, h = _chunked(16)(**x)
  for c in (32, 48, 64):
    o_c, h_c = _chunked(c)(**x)
    numerics.assert_close(o_c, o, rtol=INVARIANT, what=f"o, chunk {c}")
    numerics.assert_close(h_c, h, rtol=INVARIANT, what=f"h_T, chunk {c}")


@pytest.mark.parametrize("gate", ["channel", "head"])
def test_step_loop_equals_parallel(gate):
  x = make_inputs(15, *IDENTITY[:-1], gate=gate)
  o, h = _run(**x)
  step = jax.jit(dplr_step)
  h_t, outs = x["h0"], []
  for t in range(x["q"].shape[1]):
    o_t, h_t = step(*(x[n][:, t] for n in ("q", "a", "b", "u", "v", "log_g")),
                    h_t)
    outs.append(o_t)
  numerics.assert_close(jnp.stack(outs, axis=1), o, rtol=INVARIANT, what="o")
  numerics.assert_close(h_t, h, rtol=INVARIANT, what="h_T")


def test_scale_multiplies_outputs_only():
  """o_t = scale * S_t^T q_t: the state never sees the scale (default
  K ** -0.5)."""
  x = make_inputs(16, 1, 8, 2, 16, 8)
  o, h = dplr(**x, impl="reference")
  o2, h2 = dplr(**x, impl="reference", scale=0.5)
  numerics.assert_close(o2, o * 0.5 / 16 ** -0.5, rtol=INVARIANT, what="o")
  numerics.assert_close(h2, h, rtol=0.0, what="h_T")


@pytest.mark.parametrize("plat, family", [("cpu", "other"), ("gpu", "hopper"),
                                          ("gpu", "ampere"), ("tpu", "other")])
def test_auto_is_chunked_everywhere(plat, family):
  call = _dispatch.Call.of(jnp.bfloat16, 64, 64, 64, "channel", True)
  with _dispatch.assume_platform(plat, family):
    assert _dispatch.resolve("dplr", "auto", api._ACCEPTS, call) == "chunked"


@pytest.mark.slow
@settings(max_examples=4, deadline=None)  # each example compiles anew
@given(T=st.integers(1, 80), K=st.sampled_from([4, 12]), V=st.sampled_from([4, 8]),
       gate=st.sampled_from(GATES), chunk=st.sampled_from([8, 16, 32]),
       seed=st.integers(0, 2**16))
def test_property_chunked_matches_reference(T, K, V, gate, chunk, seed):
  x = make_inputs(seed, 1, T, 2, K, V, gate=gate)
  o_e, h_e = dplr(**x, impl="reference")
  o, h = _chunked(chunk)(**x)
  numerics.assert_outputs_close((o, h), (o_e, h_e), impl="chunked",
                                dtype=jnp.float32, names=("o", "h_t"))


# Input checks.


def _zeros(*shape, dtype=jnp.float32):
  return jnp.zeros(shape, dtype)


@pytest.mark.parametrize("kwargs, match", [
    (dict(q=_zeros(2, 8, 2, 4, 1)),
     r"dplr: q has shape \(2, 8, 2, 4, 1\); expected \[B, T, H, K\]"),
    (dict(a=_zeros(2, 8, 2, 3)),
     r"dplr: a has shape \(2, 8, 2, 3\); expected \[B, T, H, K\] = \(2, 8, 2, 4\)"),
    (dict(b=_zeros(2, 8, 2, 4, dtype=jnp.bfloat16)),
     r"dplr: b has dtype bfloat16; expected float32, the dtype of q"),
    (dict(u=_zeros(2, 7, 2, 4)),
     r"dplr: u has shape \(2, 7, 2, 4\); expected \[B, T, H, K\] = \(2, 8, 2, 4\)"),
    (dict(v=_zeros(2, 8, 3, 5)),
     r"dplr: v has shape \(2, 8, 3, 5\); expected \[B, T, H, V\] = \(2, 8, 2, \?\)"),
    (dict(q=_zeros(2, 8, 2, 4, dtype=jnp.int32)), r"dplr: q has dtype int32"),
    (dict(log_g=_zeros(2, 8, 2, 3)),
     r"dplr: log_g has shape \(2, 8, 2, 3\); expected \[B, T, H, K\] = \(2, 8, 2, 4\)"),
    (dict(log_g=_zeros(2, 8, dtype=jnp.int32)), r"dplr: log_g has dtype int32"),
    (dict(h0=_zeros(2, 2, 4)),
     r"dplr: h0 has shape \(2, 2, 4\); expected \[B, H, K, V\] = \(2, 2, 4, 5\)"),
    (dict(h0=_zeros(2, 2, 4, 5, dtype=jnp.bfloat16)),
     r"dplr: h0 has dtype bfloat16; expected float32"),
    (dict(chunk_size=33), r"dplr: chunk_size=33; expected a positive int"),
    (dict(scale="big"), r"dplr: scale='big'; expected None or a Python float"),
    (dict(impl="pallas_triton"), r"dplr: impl='pallas_triton' is not one of"),
    (dict(segment_ids=_zeros(2, 7, dtype=jnp.int32)),
     r"dplr: segment_ids has shape \(2, 7\); expected \[B, T\] = \(2, 8\)"),
])
def test_bad_input_names_the_argument(kwargs, match):
  args = dict(q=_zeros(2, 8, 2, 4), a=_zeros(2, 8, 2, 4), b=_zeros(2, 8, 2, 4),
              u=_zeros(2, 8, 2, 4), v=_zeros(2, 8, 2, 5))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    dplr(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(a_t=_zeros(2, 2, 3)),
     r"dplr_step: a_t has shape \(2, 2, 3\); expected \[B, H, K\] = \(2, 2, 4\)"),
    (dict(log_g_t=_zeros(2, 3)),
     r"dplr_step: log_g_t has shape \(2, 3\); expected \[B, H\] = \(2, 2\)"),
    (dict(h=_zeros(2, 2, 4, 6)),
     r"dplr_step: h has shape \(2, 2, 4, 6\); expected \[B, H, K, V\] = \(2, 2, 4, 5\)"),
])
def test_step_bad_input_names_the_argument(kwargs, match):
  args = dict(q_t=_zeros(2, 2, 4), a_t=_zeros(2, 2, 4), b_t=_zeros(2, 2, 4),
              u_t=_zeros(2, 2, 4), v_t=_zeros(2, 2, 5), log_g_t=None,
              h=_zeros(2, 2, 4, 5))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    dplr_step(**args)
