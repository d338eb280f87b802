"""The float32-parameter policy: inside a bfloat16 train (and eval) step every
mixer's decay rates, step sizes, SSM parameters, skip gains, norms and biases
are float32 and its weight matrices bfloat16; AdamW decays exactly those
matrices. The expected lists below come from the layers' math (their module
docstrings), not from the marks in the code under test."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm import layers
from lsm.layers import precision
from lsm.models.lm import LanguageModel, LMConfig
from lsm.parallel.mesh import MeshConfig, make_mesh
from lsm.train import optim
from lsm.train import state as state_lib
from lsm.train import step as step_lib

# Per mixer (mixer_kwargs variant), the parameters under blocks.0.mixer that
# stay float32: the rest of the mixer's parameters are weight matrices.
CONV_BIASES = ("convs.0.bias", "convs.1.bias", "convs.2.bias")  # q, k, v convs
FLOAT32 = {
    # log_g = log_sigmoid(gk_up(gk_down(x))) / 16: gk_up's bias sets the
    # forget gates' decay; per-head RMSNorm of the output.
    "gla": ("gk_up.bias", "norm.scale"),
    # Short convs' biases, per-head output norm (beta comes from a matrix).
    "delta_net": (*CONV_BIASES, "norm.scale"),
    # + the decay alpha = exp(-exp(A_log) softplus(x W_a + dt_bias)).
    "gated_delta_net": (*CONV_BIASES, "norm.scale", "A_log", "dt_bias"),
    # The continuous-time SSM itself: dt, A = -exp(log_a_real) + i a_imag,
    # B, C (complex, discretised in complex64) and the skip D; out_proj is a
    # matrix.
    "lssl": ("log_dt", "log_a_real", "a_imag", "b_real", "b_imag", "c_real",
             "c_imag", "d"),
    "s4d": ("log_dt", "log_a_real", "a_imag", "b_real", "b_imag", "c_real",
            "c_imag", "d"),
    # dt = softplus(x W_dt + dt_bias), A = -exp(a_log) [E, N] (2-D, but a
    # decay), skip D, the conv's bias; in_proj, bc_proj, W_dt = dt_down dt_up,
    # the conv kernel and out_proj are matrices.
    "mamba": ("conv.bias", "dt_bias", "a_log", "d"),
    # dt_bias, A_log, D per head, the conv's bias, the gated RMSNorm.
    "mamba2": ("conv.bias", "dt_bias", "A_log", "D", "norm.scale"),
    # Projections only.
    "attention": (),
    # Qwen-style options (imported checkpoints): q/k/v biases, q/k norms.
    "attention:qwen": ("q_proj.bias", "k_proj.bias", "v_proj.bias",
                       "q_norm.scale", "k_norm.scale"),
    # LoLCATs: the feature maps' biases and the window factors; W is a matrix.
    "lolcats": ("fq_b", "fk_b", "window_factor"),
    # Liger: the attention's projections, nothing new.
    "liger": (),
    # Gated DeltaNet on attention's projections: its decay's A_log, dt_bias.
    "gdn_attention": ("A_log", "dt_bias"),
    # Fixed decays lambda_h (not parameters); SRMSNorm has no scale.
    "lightning": (),
    # Fixed gamma_h; GroupNorm's per-channel scale and bias.
    "retnet": ("gn_scale", "gn_bias"),
    # Taylor map and window attention: projections only.
    "based": (),
    # phi(x) = softmax(x W + b): the biases b; W is a matrix.
    "hedgehog": ("fq_b", "fk_b"),
    # Gated DeltaNet memories: conv biases, norm, A_log and dt_bias per slot.
    "mom": (*CONV_BIASES, "norm.scale", "A_log", "dt_bias"),
    # GLA memories: the forget-gate bias and the norm.
    "mom:gla": ("gk_up.bias", "norm.scale"),
    # Householder steps: conv biases, norm; gated (the default): A_log and
    # dt_bias of log_g = -exp(A_log) softplus(x W_a + dt_bias). beta's W is a
    # matrix.
    "delta_product": (*CONV_BIASES, "norm.scale", "A_log", "dt_bias"),
    "delta_product:ungated": (*CONV_BIASES, "norm.scale"),
    # g = -exp(A_log) softplus(x W_f_down W_f_up + dt_bias) (A_log per head,
    # dt_bias per key channel); the output gate's bias, the norm, conv biases.
    "kda": (*CONV_BIASES, "norm.scale", "A_log", "dt_bias", "g_up.bias"),
    # KDA's, with e and w from matrices.
    "gdn2": (*CONV_BIASES, "norm.scale", "A_log", "dt_bias", "g_up.bias"),
    # RWKV-7: the token-shift interpolations mu [6, D] (2-D, but six gains in
    # [0, 1], not a map), the decay's and the in-context rate's biases w0, a0
    # (w = exp(-e^-0.5 sigmoid(w0 + ...))), the key gains k_k, k_a, the bonus
    # gain r_k, the GroupNorm scale and bias. r, k, v, o and the LoRA
    # factors are matrices.
    "rwkv7": ("mu", "w0", "a0", "k_k", "k_a", "r_k", "gn_scale", "gn_bias"),
}
KWARGS = {"mom:gla": {"memory": "gla"}, "delta_product:ungated": {"gated": False},
          "attention:qwen": {"qkv_bias": True, "qk_norm": True}}
# Cases built with another block MLP (LMConfig.mlp): rwkv7 with its paper's
# channel mixing, whose mu_k (token-shift gains) stays float32; its key and
# value maps are matrices.
MLP = {"rwkv7": "rwkv7"}
MLP_FLOAT32 = {"swiglu": (), "rwkv7": ("blocks.0.mlp.mu_k",)}
# Outside the mixer: RMSNorm scales are float32; embedding and SwiGLU are
# matrices.
LM_FLOAT32 = ("norm.scale", "blocks.0.mixer_norm.scale", "blocks.0.mlp_norm.scale")


def test_every_mixer_has_an_expected_list():
  assert {case.split(":")[0] for case in FLOAT32} == set(layers.MIXERS)


def _config(case):
  mixer = case.split(":")[0]
  return LMConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, mixer=mixer,
                  chunk_size=8, mixer_kwargs={mixer: KWARGS.get(case, {})},
                  mlp=MLP.get(case, "swiglu"))


def _name(path):
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _expected_float32(case):
  return {*LM_FLOAT32, *MLP_FLOAT32[MLP.get(case, "swiglu")],
          *(f"blocks.0.mixer.{n}" for n in FLOAT32[case])}


@functools.cache
def _setup(case):
  cfg = _config(case)
  tx, schedule = optim.make_optimizer(optim.OptimConfig(), 10,
                                      state_lib.float32_mask(cfg))
  mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  return state_lib.build(cfg, tx, mesh, None), schedule


def _batch():
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  return {"inputs": tokens, "targets": tokens,
          "mask": jax.ShapeDtypeStruct((2, 8), jnp.bool_)}


@pytest.fixture
def seen_dtypes(monkeypatch):
  """Records the dtype of every parameter of the LanguageModel each time it is
  called: inside a step, the parameters its forward and backward pass use."""
  seen = []
  original = LanguageModel.__call__

  def recording(self, *args, **kwargs):
    params = nnx.to_pure_dict(nnx.state(self, nnx.Param))
    seen.append({_name(p): jnp.dtype(x.dtype)
                 for p, x in jax.tree_util.tree_leaves_with_path(params)})
    return original(self, *args, **kwargs)

  monkeypatch.setattr(LanguageModel, "__call__", recording)
  return seen


@pytest.mark.parametrize("case", sorted(FLOAT32))
def test_parameter_dtypes_inside_a_bf16_step(case, seen_dtypes):
  setup, schedule = _setup(case)
  # Tracing (eval_shape) runs the step's Python: the cast, the merge and the
  # model call, forward and backward, without compiling.
  train = step_lib.make_train_step(setup, schedule, compute_dtype=jnp.bfloat16)
  jax.eval_shape(train, setup.abstract_state, _batch())
  evaluate = step_lib.make_eval_step(setup, compute_dtype="bfloat16")
  jax.eval_shape(evaluate, setup.abstract_state["params"], _batch())
  assert len(seen_dtypes) == 2
  names = {_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      setup.abstract_state["params"])}
  float32 = _expected_float32(case)
  assert float32 <= names, sorted(float32 - names)
  expected = {n: jnp.dtype(jnp.float32 if n in float32 else jnp.bfloat16)
              for n in names}
  for dtypes in seen_dtypes:
    wrong = {n: (str(d), str(expected[n])) for n, d in dtypes.items()
             if d != expected[n]}
    assert not wrong, f"{case}: (dtype in the step, expected): {wrong}"
  # The float32 run casts nothing.
  seen_dtypes.clear()
  jax.eval_shape(step_lib.make_train_step(setup, schedule), setup.abstract_state,
                 _batch())
  assert set(seen_dtypes[0].values()) == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("case", sorted(FLOAT32))
def test_weight_decay_mask_reads_the_mark(case):
  """AdamW's mask, from the model's marks: every matrix the step casts is
  decayed, and nothing else."""
  setup, _ = _setup(case)
  mask = optim.decay_mask(setup.abstract_state["params"],
                          state_lib.float32_mask(_config(case)))
  float32 = _expected_float32(case)
  decayed = {_name(p): bool(m) for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert decayed == {n: n not in float32 for n in decayed}


def test_adamw_leaves_marked_parameters_undecayed():
  """End to end on Mamba, whose a_log [E, N] is a marked 2-D parameter: with
  zero gradients the update is -lr * wd * p exactly where p is decayed."""
  cfg = _config("mamba")
  tx, _ = optim.make_optimizer(
      optim.OptimConfig(lr=0.1, schedule="constant", warmup_steps=0,
                        weight_decay=0.5, clip_norm=None), 10,
      state_lib.float32_mask(cfg))
  # Any values will do (the init's random draws take seconds to compile).
  params = jax.tree.map(lambda s: jnp.full(s.shape, 2.0, s.dtype),
                        _setup("mamba")[0].abstract_state["params"])
  updates = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p),
                                        tx.init(p), p)[0])(params)
  float32 = _expected_float32("mamba")
  assert "blocks.0.mixer.a_log" in float32
  for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates),
                          jax.tree.leaves(params)):
    decayed = _name(path) not in float32
    np.testing.assert_allclose(u, -0.05 * p if decayed else np.zeros_like(p),
                               rtol=1e-6, err_msg=_name(path))


def test_the_mark_not_the_name_decides():
  """A marked matrix named like a weight stays float32 and undecayed; an
  unmarked one named like the old exempt list (a_log) is cast and decayed."""

  class Toy(nnx.Module):
    def __init__(self):
      self.w = precision.Float32Param(jnp.ones((2, 2), jnp.float32))
      self.a_log = nnx.Param(jnp.ones((2, 2), jnp.float32))
      self.v = nnx.Param(jnp.ones((2,), jnp.float32))  # unmarked vector

  state = nnx.state(Toy(), nnx.Param)
  mask = precision.float32_mask(state)
  assert mask == {"w": True, "a_log": False, "v": False}
  params = nnx.to_pure_dict(state)
  cast = step_lib.cast_params(params, mask, jnp.bfloat16)
  assert {k: str(v.dtype) for k, v in cast.items()} == {
      "w": "float32", "a_log": "bfloat16", "v": "float32"}
  assert optim.decay_mask(params, mask) == {"w": False, "a_log": True, "v": False}
  tx, _ = optim.make_optimizer(
      optim.OptimConfig(lr=0.1, schedule="constant", warmup_steps=0,
                        weight_decay=0.5, clip_norm=None), 10, mask)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params),
                         params)
  np.testing.assert_array_equal(updates["w"], 0.0)
  np.testing.assert_array_equal(updates["v"], 0.0)
  np.testing.assert_allclose(updates["a_log"], -0.05 * np.ones((2, 2)))
