"""Delta rule (DeltaNet, Gated DeltaNet): every impl against the float32
reference, the recurrence's invariants, property tests and input checks."""

import functools

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

from lsm.ops.delta_rule import delta_rule, delta_rule_step
from tests import numerics
from tests.ops import harness

FAST_IMPLS = ["chunked"]

# (B, T, H, K, V, chunk): awkward on purpose.
SHAPES = {
    "T63_KneV": (2, 63, 2, 16, 24, 16),  # T not a multiple of the chunk, K != V
    "T1_H1": (1, 1, 1, 8, 8, 64),  # one token, one head
    "TltC_H1": (2, 40, 1, 32, 16, 64),  # T shorter than one chunk
    "chunks64": (1, 150, 2, 16, 16, 64),  # several full-size chunks
}


def make_inputs(seed, B, T, H, K, V, *, beta_max=1.0, gated=True,
                dtype=jnp.float32, log_g_value=None):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (B, T, H, K))
  k = jax.random.normal(ks[1], (B, T, H, K))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # as DeltaNet layers do
  v = jax.random.normal(ks[2], (B, T, H, V))
  beta = beta_max * jax.random.uniform(ks[3], (B, T, H))
  out = dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype),
             beta=beta.astype(dtype))
  if gated:
    log_g = (jnp.full((B, T, H), log_g_value) if log_g_value is not None else
             jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H)) + 2.0))
    out["log_g"] = log_g.astype(dtype)
  out["h0"] = jax.random.normal(ks[5], (B, H, K, V))
  return out


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("beta_max", [1.0, 2.0], ids=["beta01", "beta02"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_reference_fp32(impl, gated, beta_max, shape):
  *dims, chunk = SHAPES[shape]
  primals = make_inputs(0, *dims, beta_max=beta_max, gated=gated)
  harness.check_against_reference(delta_rule, impl, chunk, primals,
                                  jax.random.key(1))


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("shape", ["T63_KneV", "chunks64"])
def test_matches_reference_bf16(impl, gated, shape):
  *dims, chunk = SHAPES[shape]
  primals = make_inputs(0, *dims, beta_max=2.0, gated=gated, dtype=jnp.bfloat16)
  harness.check_against_reference(delta_rule, impl, chunk, primals,
                                  jax.random.key(1))


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_strong_decay(impl):
  primals = make_inputs(2, 1, 1024, 1, 16, 16, beta_max=2.0, log_g_value=-5.0)
  harness.check_against_reference(delta_rule, impl, 64, primals,
                                  jax.random.key(3))


def test_negative_eigenvalue_flips_state():
  """beta = 2 with a unit key reflects the state along k: k^T S -> -k^T S."""
  K, V = 8, 4
  k = jnp.zeros((1, 1, 1, K)).at[..., 0].set(1.0)
  h0 = jax.random.normal(jax.random.key(0), (1, 1, K, V))
  _, h = delta_rule(jnp.zeros((1, 1, 1, K)), k, jnp.zeros((1, 1, 1, V)),
                    jnp.full((1, 1, 1), 2.0), h0=h0, impl="chunked")
  rtol = numerics.TOLERANCES[("invariant", "float32")]
  numerics.assert_close(h[0, 0, 0], -h0[0, 0, 0], rtol=rtol, what="flipped row")
  numerics.assert_close(h[0, 0, 1:], h0[0, 0, 1:], rtol=rtol, what="other rows")


@functools.cache
def _chunked(chunk_size):
  return jax.jit(functools.partial(delta_rule, impl="chunked",
                                   chunk_size=chunk_size))


def test_split_sequence_equals_whole():
  x = make_inputs(4, 2, 90, 2, 16, 8, beta_max=2.0)
  h0 = x.pop("h0")
  o, h = _chunked(32)(**x, h0=h0)
  t = 37  # not a chunk boundary
  o1, h1 = _chunked(32)(**{n: a[:, :t] for n, a in x.items()}, h0=h0)
  o2, h2 = _chunked(32)(**{n: a[:, t:] for n, a in x.items()}, h0=h1)
  rtol = numerics.TOLERANCES[("invariant", "float32")]
  numerics.assert_close(jnp.concatenate([o1, o2], axis=1), o, rtol=rtol, what="o")
  numerics.assert_close(h2, h, rtol=rtol, what="h_T")


def test_chunk_size_does_not_matter():
  x = make_inputs(5, 1, 70, 2, 16, 8, beta_max=2.0)
  o, h = _chunked(64)(**x)
  rtol = numerics.TOLERANCES[("invariant", "float32")]
  for c in (8, 16, 32):
    o_c, h_c = _chunked(c)(**x)
    numerics.assert_close(o_c, o, rtol=rtol, what=f"o, chunk {c}")
    numerics.assert_close(h_c, h, rtol=rtol, what=f"h_T, chunk {c}")


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_step_loop_equals_parallel(gated):
  x = make_inputs(6, 2, 20, 2, 8, 12, beta_max=2.0, gated=gated)
  o, h = _chunked(16)(**x)
  step = jax.jit(delta_rule_step)
  h_t = x["h0"]
  outs = []
  for t in range(20):
    log_g_t = x["log_g"][:, t] if gated else None
    o_t, h_t = step(x["q"][:, t], x["k"][:, t], x["v"][:, t], x["beta"][:, t], h_t,
                    log_g_t=log_g_t)
    outs.append(o_t)
  rtol = numerics.TOLERANCES[("invariant", "float32")]
  numerics.assert_close(jnp.stack(outs, axis=1), o, rtol=rtol, what="o")
  numerics.assert_close(h_t, h, rtol=rtol, what="h_T")


@settings(max_examples=3, deadline=None)  # each example compiles anew
@given(T=st.integers(1, 80), K=st.sampled_from([4, 12]), V=st.sampled_from([4, 8]),
       beta_max=st.sampled_from([1.0, 2.0]), gated=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_chunked_matches_reference(T, K, V, beta_max, gated, seed):
  x = make_inputs(seed, 1, T, 2, K, V, beta_max=beta_max, gated=gated)
  o_e, h_e = delta_rule(**x, impl="reference")
  o, h = _chunked(32)(**x)
  numerics.assert_outputs_close((o, h), (o_e, h_e), impl="chunked",
                                dtype=jnp.float32, names=("o", "h_t"))


def _zeros(*shape, dtype=jnp.float32):
  return jnp.zeros(shape, dtype)


@pytest.mark.parametrize("kwargs, match", [
    (dict(q=_zeros(2, 8, 2, 4, 1)), r"q has shape \(2, 8, 2, 4, 1\); expected \[B, T, H, K\]"),
    (dict(k=_zeros(2, 8, 2, 3)), r"k has shape \(2, 8, 2, 3\); expected .* = \(2, 8, 2, 4\)"),
    (dict(beta=_zeros(2, 8, 2, 1)), r"beta has shape \(2, 8, 2, 1\); expected \[B, T, H\] = \(2, 8, 2\)"),
    (dict(beta=None), r"beta is None"),
    (dict(beta=_zeros(2, 8, 2, dtype=jnp.int32)), r"beta has dtype int32"),
    (dict(log_g=_zeros(2, 8, 2, 4)), r"log_g has shape \(2, 8, 2, 4\); expected \[B, T, H\]"),
    (dict(h0=_zeros(2, 2, 4)), r"h0 has shape \(2, 2, 4\); expected \[B, H, K, V\] = \(2, 2, 4, 5\)"),
    (dict(chunk_size=33), r"chunk_size=33"),
    (dict(impl="fast"), r"impl='fast' is not one of"),
])
def test_bad_input_names_the_argument(kwargs, match):
  args = dict(q=_zeros(2, 8, 2, 4), k=_zeros(2, 8, 2, 4), v=_zeros(2, 8, 2, 5),
              beta=_zeros(2, 8, 2))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    delta_rule(**args)
