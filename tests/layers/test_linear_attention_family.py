"""Properties of the linear-attention family beyond the shared protocol tests
(test_linear_mixers.py, test_protocol.py): Based's Taylor map and normalised
form, Hedgehog's feature map and distillation loss, MoM's routing exactness and
load-balancing loss, the fixed decay schedules of RetNet and Lightning, and
LASP-2 on 8 CPU devices (seq_mixers_check.py in a subprocess)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers.based import (Based, normalized_linear_attention,
                              taylor_feature_map)
from lsm.layers.hedgehog import (Hedgehog, attention_distillation_loss,
                                 hedgehog_feature_map)
from lsm.layers.mom import MoM, load_balancing_loss, route
from lsm.layers.retnet import RetNet, retention_log_decays
from lsm.models.lm import LanguageModel, LMConfig, logits_and_aux_loss
from tests import numerics

ROOT = pathlib.Path(__file__).resolve().parents[2]
RTOL = numerics.TOLERANCES[("invariant", "float32")]
D, H, B = 32, 4, 2


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


# -- Based ----------------------------------------------------------------------


def test_taylor_map_inner_product_is_the_second_order_expansion():
  a, b = _normal(0, (64, 16)), _normal(1, (64, 16))
  phi_a, phi_b = taylor_feature_map(a), taylor_feature_map(b)
  assert phi_a.shape == (64, 1 + 16 + 256) == (64, 273)
  s = np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64), -1)
  expected = 1.0 + s + s * s / 2.0  # in float64, independent of the map
  got = jnp.sum(phi_a * phi_b, -1)
  numerics.assert_close(got, expected, rtol=RTOL, what="phi(a).phi(b)")


def test_taylor_map_is_exact_on_dyadic_inputs():
  # Entries in {-1, -1/2, 0, 1/2, 1}: every product and sum is exact in float32
  # except the 1/sqrt(2) factors, whose squares give 1/2 up to one rounding.
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.integers(-2, 3, (8, 4)) / 2.0, jnp.float32)
  b = jnp.asarray(rng.integers(-2, 3, (8, 4)) / 2.0, jnp.float32)
  s = np.sum(np.asarray(a) * np.asarray(b), -1)
  got = np.asarray(jnp.sum(taylor_feature_map(a) * taylor_feature_map(b), -1))
  np.testing.assert_allclose(got, 1 + s + s * s / 2, rtol=2e-7, atol=0)


def test_normalized_linear_attention_equals_explicit_weights():
  """y_t = sum_s w_ts v_s with w_ts = phi_t.phi_s / sum_{s'<=t} phi_t.phi_s'."""
  T, F, V = 11, 5, 3
  q = jax.nn.softplus(_normal(3, (B, T, H, F)))
  k = jax.nn.softplus(_normal(4, (B, T, H, F)))
  v = _normal(5, (B, T, H, V))
  y, h_t = normalized_linear_attention(q, k, v, chunk_size=16, impl="chunked",
                                       eps=0.0)
  qn, kn, vn = (np.asarray(t, np.float64) for t in (q, k, v))
  scores = np.einsum("bthf,bshf->bhts", qn, kn) * np.tril(np.ones((T, T)))
  w = scores / scores.sum(-1, keepdims=True)
  expected = np.einsum("bhts,bshv->bthv", w, vn)
  numerics.assert_close(y, expected, rtol=numerics.tolerance("chunked",
                                                             jnp.float32),
                        what="normalised output")
  assert h_t.shape == (B, H, F, V + 1)
  numerics.assert_close(h_t[..., -1], kn.sum(1), rtol=RTOL, what="z = sum phi(k)")


def test_based_window_branch_sees_only_the_window():
  """Perturbing a token changes the outputs of later tokens only through the
  linear branch once they are past the window: with the linear branch's v
  projection zeroed, outputs W or more tokens later do not move at all."""
  layer = Based(D, n_heads=H, window=3, impl="chunked", chunk_size=16,
                rngs=nnx.Rngs(0))
  layer.v_proj.kernel.set_value(jnp.zeros_like(layer.v_proj.kernel[...]))
  x = _normal(6, (B, 12, D))
  x2 = x.at[:, 4].add(1.0)
  run = nnx.jit(lambda m, x: m(x)[0])
  y, y2 = run(layer, x), run(layer, x2)
  moved = np.asarray(jnp.max(jnp.abs(y - y2), axis=(0, 2)))
  assert np.all(moved[:4] == 0) and np.all(moved[4:7] > 1e-3), moved
  assert np.all(moved[7:] == 0), moved  # positions >= 4 + window


# -- Hedgehog -------------------------------------------------------------------


def test_hedgehog_map_halves_are_softmaxes_and_start_at_the_identity():
  layer = Hedgehog(D, n_heads=H, rngs=nnx.Rngs(0))
  q = _normal(7, (B, 5, H, D // H))
  phi, _ = layer.features(q, q)
  K = D // H
  assert phi.shape == (B, 5, H, 2 * K)
  numerics.assert_close(phi[..., :K], jax.nn.softmax(q, -1), rtol=RTOL,
                        what="identity init, first half")
  numerics.assert_close(phi[..., K:], jax.nn.softmax(-q, -1), rtol=RTOL,
                        what="identity init, second half")
  w, b = _normal(8, (H, K, 3)), _normal(9, (H, 3))
  z = jnp.einsum("bthk,hkf->bthf", q, w) + b
  numerics.assert_close(hedgehog_feature_map(q, w, b)[..., 3:],
                        jax.nn.softmax(-z, -1), rtol=RTOL, what="general map")


def test_distillation_loss_matches_a_hand_computation():
  T, K, F = 3, 2, 2
  q, k = _normal(10, (1, T, 1, K)), _normal(11, (1, T, 1, K))
  pq = jax.nn.softplus(_normal(12, (1, T, 1, F)))
  pk = jax.nn.softplus(_normal(13, (1, T, 1, F)))
  qn, kn, pqn, pkn = (np.asarray(t, np.float64)[0, :, 0] for t in (q, k, pq, pk))
  total = 0.0
  for i in range(T):
    logits = np.array([qn[i] @ kn[j] / np.sqrt(K) for j in range(i + 1)])
    teacher = np.exp(logits - logits.max())
    teacher /= teacher.sum()
    kern = np.array([pqn[i] @ pkn[j] for j in range(i + 1)])
    student = kern / kern.sum()
    total += -np.sum(teacher * np.log(student))
  got = attention_distillation_loss(q, k, pq, pk, eps=0.0)
  np.testing.assert_allclose(float(got), total / T, rtol=1e-5)


def test_distillation_trains_the_feature_maps_towards_softmax():
  layer = Hedgehog(16, n_heads=2, rngs=nnx.Rngs(0))
  x = _normal(14, (2, 24, 16))
  feature_maps = nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(n) for n in (
      "fq_w", "fq_b", "fk_w", "fk_b"))))

  @nnx.jit
  def sgd(layer):
    loss, grads = nnx.value_and_grad(lambda m: m.distillation_loss(x),
                                     argnums=nnx.DiffState(0, feature_maps))(layer)
    params = nnx.state(layer, feature_maps)
    nnx.update(layer, jax.tree.map(lambda p, g: p - 10.0 * g, params, grads))
    return loss

  # The cross entropy is bounded below by the teacher's entropy (reached when
  # the linear weights equal the softmax weights).
  q, k = (np.asarray(t, np.float64) for t in layer.qk(x))
  T = x.shape[1]
  logits = np.einsum("bihk,bjhk->bhij", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(np.tril(np.ones((T, T))) > 0, logits, -np.inf)
  teacher = np.exp(logits - logits.max(-1, keepdims=True))
  teacher /= teacher.sum(-1, keepdims=True)
  entropy = -np.mean(np.sum(np.where(teacher > 0, teacher * np.log(
      np.where(teacher > 0, teacher, 1.0)), 0.0), -1))
  q_kernel = np.asarray(layer.q_proj.kernel[...])
  losses = [float(sgd(layer)) for _ in range(40)]
  assert min(losses) >= entropy - 1e-5, (min(losses), entropy)
  assert losses[-1] - entropy < 0.5 * (losses[0] - entropy), (losses, entropy)
  # Only the feature maps moved; the teacher's projections stayed put.
  np.testing.assert_array_equal(np.asarray(layer.q_proj.kernel[...]), q_kernel)


# -- MoM ------------------------------------------------------------------------


def test_load_balancing_loss_matches_a_hand_computation():
  p = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.3, 0.2],
                [0.25, 0.15, 0.6]])
  # top-1 picks 0, 1, 0, 2: f = (1/2, 1/4, 1/4); P = column means
  # (0.3875, 0.3125, 0.3); L = 3 sum f P = 1.040625.
  # top-2 picks {0,1}, {1,2}, {0,1}, {0,2}: f = (3/8, 3/8, 2/8); L = 1.0125.
  for k, expected in ((1, 1.040625), (2, 1.0125)):
    probs, chosen, weights = route(jnp.log(jnp.asarray(p, jnp.float32)), k)
    numerics.assert_close(probs, p, rtol=RTOL, what="router probabilities")
    np.testing.assert_allclose(float(load_balancing_loss(probs, chosen)),
                               expected, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(weights[0]), [0.7 / 0.9, 0.2 / 0.9, 0.0],
                             rtol=1e-6)
  uniform = jnp.full((6, 3), 1 / 3)
  balanced = jnp.asarray(np.eye(3)[[0, 1, 2, 0, 1, 2]] > 0)
  np.testing.assert_allclose(float(load_balancing_loss(uniform, balanced)), 1.0,
                             rtol=1e-6)


@pytest.mark.parametrize("memory", ["gated_delta", "gla"])
def test_mom_decoding_leaves_unrouted_memories_bit_identical(memory):
  layer = MoM(D, n_heads=H, memory=memory, rngs=nnx.Rngs(0))
  cache = layer.init_cache(B)
  cache["h"] = _normal(15, cache["h"].shape)  # nonzero memories
  x = _normal(16, (B, 8, D))
  step = nnx.jit(lambda m, x_t, c: m.step(x_t, c))
  routed = nnx.jit(lambda m, x_t: m._routing(x_t)[3])
  changed_any = False
  for t in range(8):
    before = np.asarray(layer.memory_states(cache))  # [B, S, H, K, V]
    _, cache = step(layer, x[:, t], cache)
    after = np.asarray(layer.memory_states(cache))
    mask = np.asarray(routed(layer, x[:, t]))  # [B, S], shared slot last
    for b in range(B):
      for s in range(layer.n_slots):
        same = np.array_equal(before[b, s], after[b, s])
        if mask[b, s]:
          assert not same, f"t={t} b={b}: routed memory {s} did not change"
          changed_any = True
        else:
          assert same, f"t={t} b={b}: memory {s} changed without its token"
  assert changed_any


@pytest.mark.parametrize("memory, impl", [("gated_delta", "chunked"),
                                          ("gated_delta", "reference"),
                                          ("gla", "chunked")])
def test_mom_memories_no_token_chooses_keep_their_state_bit_identical(memory,
                                                                      impl):
  """A zero router ties every logit; top-k then takes memories 0..k-1, so
  memories k..M-1 receive no token over the whole (chunked) prefill."""
  layer = MoM(D, n_heads=H, memory=memory, n_memories=4, top_k=2, impl=impl,
              chunk_size=16, rngs=nnx.Rngs(0))
  layer.router.kernel.set_value(jnp.zeros_like(layer.router.kernel[...]))
  cache = layer.init_cache(B)
  h0 = _normal(17, cache["h"].shape)
  cache["h"] = h0
  _, new = nnx.jit(lambda m, x, c: m(x, c))(layer, _normal(18, (B, 37, D)), cache)
  before, after = (np.asarray(layer.memory_states(c)) for c in (cache, new))
  np.testing.assert_array_equal(after[:, 2:4], before[:, 2:4])
  assert not np.allclose(after[:, :2], before[:, :2])  # routed memories moved
  assert not np.allclose(after[:, 4], before[:, 4])  # the shared memory moved


def test_mom_aux_loss_reaches_the_language_model_objective():
  cfg = LMConfig(vocab_size=32, d_model=D, n_layers=2, n_heads=H,
                 pattern=("mom", "gla"), impl="chunked", chunk_size=16,
                 mixer_kwargs={"mom": {"aux_loss_weight": 0.5}})
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (B, 10), 0, 32)
  logits, aux = nnx.jit(logits_and_aux_loss)(model, tokens)
  plain_call = nnx.jit(lambda m, t: m(t)[0])
  numerics.assert_close(logits, plain_call(model, tokens), rtol=RTOL,
                        what="logits")
  # The same loss computed from the layer's router on the layer's input.
  blk = model.blocks[0]
  x = blk.mixer_norm(model.embed(tokens))
  probs, chosen, _ = route(blk.mixer.router(x), blk.mixer.top_k)
  np.testing.assert_allclose(float(aux),
                             0.5 * float(load_balancing_loss(probs, chosen)),
                             rtol=1e-6)
  assert float(aux) >= 0.5 * (1 - 1e-6)  # L_aux >= 1 (Cauchy-Schwarz bound)
  plain = LanguageModel(LMConfig(vocab_size=32, d_model=D, n_layers=1, n_heads=H,
                                 mixer="gla"), rngs=nnx.Rngs(0))
  assert float(nnx.jit(logits_and_aux_loss)(plain, tokens)[1]) == 0.0
  # Plain calls record nothing: the layer's state is parameters only.
  plain_call(model, tokens)
  assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))


# -- fixed decays -----------------------------------------------------------------


def test_retnet_decays_are_one_minus_two_to_the_minus_five_minus_h():
  gammas = np.exp(np.asarray(retention_log_decays(6), np.float64))
  np.testing.assert_allclose(gammas, 1 - 2.0 ** (-5 - np.arange(6)), rtol=1e-7)


def test_retnet_rotary_positions_continue_across_the_cache():
  """Prefilling [0:5] then [5:9] equals one pass over [0:9]: the cached
  position places the second call's rotations."""
  layer = RetNet(D, n_heads=H, impl="chunked", chunk_size=16, rngs=nnx.Rngs(0))
  x = _normal(19, (B, 9, D))
  run = nnx.jit(lambda m, x, c: m(x, c))
  y = nnx.jit(lambda m, x: m(x)[0])(layer, x)
  y1, cache = run(layer, x[:, :5], layer.init_cache(B))
  y2, cache = run(layer, x[:, 5:], cache)
  assert int(cache["pos"]) == 9
  numerics.assert_close(jnp.concatenate([y1, y2], 1), y, rtol=RTOL, what="split")


def test_lightning_decays_follow_the_layer_schedule_in_the_lm():
  cfg = LMConfig(vocab_size=32, d_model=D, n_layers=3, n_heads=H,
                 mixer="lightning")
  model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))
  h = np.arange(H)
  for layer_index, blk in enumerate(model.blocks):
    rate = 2.0 ** (-8.0 * (h + 1) / H)
    expected = -rate * (1 - layer_index / 2 + 1e-5)
    np.testing.assert_allclose(np.asarray(blk.mixer.log_decays()), expected,
                               rtol=1e-6)
  # First layer: lambda_0 = exp(-2^{-2}) at H = 4; last: nearly no decay.
  assert abs(float(np.exp(model.blocks[0].mixer.log_decays()[0]))
             - np.exp(-0.25 * (1 + 1e-5))) < 1e-6
  assert float(model.blocks[2].mixer.log_decays()[0]) > -1e-5


# -- LASP-2 on 8 devices ---------------------------------------------------------


def _eight_device_check(*args):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, str(ROOT / "tests/layers/seq_mixers_check.py"),
                        *args], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=280)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_eight_device_sequence_parallel_equals_one_device():
  result = _eight_device_check()
  assert set(result) == {"lightning", "retnet", "based", "hedgehog", "mom",
                         "mom_gla", "mamba2", "mamba2_signed", "delta_product",
                         "rwkv7"}


@pytest.mark.slow
def test_eight_device_sequence_parallel_kda_and_gdn2():
  result = _eight_device_check("--slow")
  assert {"kda", "gdn2"} <= set(result)
