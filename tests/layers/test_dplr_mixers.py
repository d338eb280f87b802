"""The mixers on lsm.ops.dplr (DeltaProduct, KDA, GDN-2): each maps its
paper's recurrence onto dplr (checked against token loops written from the
papers' equations), decodes the parallel logits, its chunked layer equals its
reference layer in outputs and gradients, and every parameter has logical
axes. bf16 in -> bf16 out is tests/layers/test_protocol.py's, packed documents
test_documents.py's, smoke training tests/configs/test_configs.py's."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lsm.layers.delta_product import DeltaProduct
from lsm.layers.gdn2 import GDN2
from lsm.layers.kda import KDA
from lsm.models.lm import LanguageModel, LMConfig
from lsm.ops.dplr import delta_product as expansion
from lsm.ops.dplr import dplr
from tests import numerics
from tests.layers import decoding

D, H, B, T = 32, 2, 2, 13
INVARIANT = numerics.TOLERANCES[("invariant", "float32")]
CHUNKED = numerics.tolerance("chunked", jnp.float32)
MIXERS = ("delta_product", "kda", "gdn2")
LAYERS = {
    "delta_product": (DeltaProduct, dict(beta_scale=2.0)),  # n_h = 2, gated
    "delta_product_n3": (DeltaProduct, dict(n_householder=3, gated=False)),
    "kda": (KDA, dict(beta_scale=2.0)),
    "gdn2": (GDN2, {}),
}


def build(name, impl="chunked"):
  cls, kwargs = LAYERS[name]
  return cls(D, n_heads=H, impl=impl, chunk_size=16, rngs=nnx.Rngs(0), **kwargs)


def _x(seed=1, t=T):
  return jax.random.normal(jax.random.key(seed), (B, t, D))


def _jit_with(module, fn):
  """jit(fn(module, *args)) with the module's state a traced argument."""
  graphdef, state = nnx.split(module)
  run = jax.jit(lambda s, *args: fn(nnx.merge(graphdef, s), *args))
  return lambda *args: run(state, *args)


# -- the papers' recurrences, token by token --------------------------------


def _loop(q, k, v, log_g, h0, update):
  """o_t = K^-1/2 S_t^T q_t after S_t = update(S_{t-1}, k_t, v_t, g_t, t)."""
  K = q.shape[-1]

  def token(s, x):
    t, q_t, k_t, v_t, g_t = x
    s = update(s, k_t, v_t, g_t, t)
    return s, K ** -0.5 * jnp.einsum("bhk,bhkv->bhv", q_t, s, precision="highest")

  xs = (jnp.arange(q.shape[1]),) + tuple(
      jnp.moveaxis(a, 1, 0) for a in (q, k, v, log_g))
  s, o = jax.lax.scan(token, h0, xs)
  return jnp.moveaxis(o, 0, 1), s


def _outer(x, y):
  return x[..., :, None] * y[..., None, :]


def _gdn2_update(e, w):
  """GDN-2: S <- (I - k (e o k)^T) diag(exp g) S + k (w o v)^T (e [B, T, H, K],
  w [B, T, H, V]); e = w = beta is KDA."""
  def update(s, k, v, g, t):
    s = jnp.exp(g)[..., None] * s
    r = jnp.einsum("bhk,bhkv->bhv", e[:, t] * k, s, precision="highest")
    return s - _outer(k, r) + _outer(k, w[:, t] * v)
  return update


@functools.cache
def _raw(seed=0, n_h=2):
  """Seeded inputs of the token loops: [B, T, H, *] (keys and values with an
  n_h axis after T for DeltaProduct)."""
  ks = jax.random.split(jax.random.key(seed), 7)
  Bq, Tq, Hq, K, V = 2, 11, 2, 8, 6
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  return dict(
      x=jax.random.normal(ks[0], (Bq, Tq, 16)),
      q=jax.random.normal(ks[1], (Bq, Tq, Hq, K)),
      k=unit(jax.random.normal(ks[2], (Bq, Tq, Hq, K))),
      v=jax.random.normal(ks[3], (Bq, Tq, Hq, V)),
      log_g=jax.nn.log_sigmoid(jax.random.normal(ks[4], (Bq, Tq, Hq, K)) + 1.0),
      h0=jax.random.normal(ks[5], (Bq, Hq, K, V)),
      kn=unit(jax.random.normal(ks[6], (Bq, Tq, n_h, Hq, K))),
      vn=jax.random.normal(ks[1], (Bq, Tq, n_h, Hq, V)),
      beta_n=2.0 * jax.random.uniform(ks[2], (Bq, Tq, n_h, Hq)))


@pytest.mark.parametrize("cls", [KDA, GDN2])
def test_rank_one_terms_give_the_papers_recurrence(cls):
  """The layer's map onto dplr (its ``_rank_one``, fed the raw k, v and decay)
  against the paper's update, token by token: KDA's (I - beta k k^T)
  diag(exp g) S + beta k v^T, GDN-2's (I - k (e o k)^T) diag(exp g) S +
  k (w o v)^T, with beta, e, w from the layer's projections as the papers
  write them."""
  r = _raw()
  layer = cls(16, n_heads=2, expand_k=1.0, expand_v=0.75, beta_scale=2.0,
              impl="reference", rngs=nnx.Rngs(0))
  x = r["x"]
  if cls is KDA:
    beta = 2.0 * jax.nn.sigmoid(layer.b_proj(x))[..., None]
    e, w = (jnp.broadcast_to(beta, r[n].shape) for n in ("k", "v"))
  else:
    split = lambda y: y.reshape(*y.shape[:-1], 2, -1)  # noqa: E731
    e = 2.0 * jax.nn.sigmoid(split(layer.e_proj(x)))
    w = jax.nn.sigmoid(split(layer.w_proj(x)))

  def both(m, r, e, w):
    a, b, u, v = m._rank_one(r["x"], r["k"], r["v"], jnp.exp(r["log_g"]))  # noqa: SLF001
    return (dplr(r["q"], a, b, u, v, r["log_g"], h0=r["h0"], impl="reference"),
            _loop(r["q"], r["k"], r["v"], r["log_g"], r["h0"], _gdn2_update(e, w)))

  got, want = _jit_with(layer, both)(r, e, w)
  numerics.assert_outputs_close(got, want, impl="chunked", dtype=jnp.float32,
                                names=("o", "h_t"), what=cls.__name__)


@pytest.mark.parametrize("gate", ["head", "channel", None])
def test_time_expansion_gives_householder_products(gate):
  """lsm.ops.dplr.delta_product.expand + dplr against n_h = 2 Householder
  steps per token after the token's decay: S <- exp(g) S, then S <- (I -
  beta_j k_j k_j^T) S + beta_j k_j v_j^T; outputs of each token's last step."""
  r = _raw()
  log_g = {"head": r["log_g"][..., 0], "channel": r["log_g"], None: None}[gate]
  g_loop = jnp.zeros(r["q"].shape[:3]) if log_g is None else log_g
  kn, vn, beta = r["kn"], r["vn"], r["beta_n"]

  def update(s, k, v, g, t):
    s = jnp.exp(g).reshape(*g.shape, *(1,) * (s.ndim - g.ndim)) * s
    for j in range(kn.shape[2]):
      kj, bj = kn[:, t, j], beta[:, t, j][..., None]
      rd = jnp.einsum("bhk,bhkv->bhv", kj, s, precision="highest")
      s = s + _outer(bj * kj, vn[:, t, j] - rd)
    return s

  @jax.jit
  def both(r, log_g, g_loop):
    args = expansion.expand(r["q"], kn, vn, beta, log_g)
    del args["segment_ids"]
    return (dplr(**args, h0=r["h0"], impl="reference"),
            _loop(r["q"], r["k"], r["v"], g_loop, r["h0"], update))

  (o, h), want = both(r, log_g, g_loop)
  numerics.assert_outputs_close((expansion.token_outputs(o, 2), h), want,
                                impl="chunked", dtype=jnp.float32,
                                names=("o", "h_t"), what=f"gate {gate}")


# -- layers ------------------------------------------------------------------


def _lm(impl):
  return LanguageModel(LMConfig(
      vocab_size=61, d_model=D, n_layers=len(MIXERS), n_heads=H, pattern=MIXERS,
      impl=impl, chunk_size=16,
      mixer_kwargs={"delta_product": {"beta_scale": 2.0},
                    "kda": {"beta_scale": 2.0}}), rngs=nnx.Rngs(0))


def test_lm_decodes_the_parallel_logits():
  """A stack of the three mixers: prefill + step logits equal the parallel
  pass's within 1e-5, the caches agree, and the chunked model's logits equal
  the reference model's."""
  tok = jax.random.randint(jax.random.key(4), (B, 14), 0, 61)

  def run(m, tok):
    logits, _ = m(tok)
    dec, cache, cache_all = decoding.prefill_then_decode(m, tok, 5)
    return logits, dec, cache, cache_all

  logits, dec, cache, cache_all = _jit_with(_lm("chunked"), run)(tok)
  numerics.assert_close(dec, logits, rtol=INVARIANT, what="decoded logits")
  assert float(jnp.max(jnp.abs(dec - logits))) < 1e-5
  numerics.assert_pytrees_close(cache, cache_all, rtol=INVARIANT, what="caches ")
  reference = _jit_with(_lm("reference"), lambda m, t: m(t)[0])(tok)
  numerics.assert_close(logits, reference, rtol=CHUNKED,
                        what="chunked vs reference logits")


@pytest.mark.parametrize("name", list(LAYERS))
def test_chunked_layer_equals_reference_layer_with_gradients(name):
  """Output and the gradients of the input and every parameter, T = 21 (a
  chunk of 16 and a partial one; DeltaProduct runs T n_h micro-steps)."""
  x = _x(2, t=21)
  ct = jax.random.normal(jax.random.key(3), x.shape)

  def run(m, x):
    graphdef, params = nnx.split(m)
    y, pull = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x)[0], params, x)
    return y, pull(ct)

  def both(m, x):
    out = run(m, x)
    m.impl = "reference"
    return out, run(m, x)

  (y, (dp, dx)), (y_r, (dp_r, dx_r)) = _jit_with(build(name), both)(x)
  numerics.assert_close(y, y_r, rtol=CHUNKED, what=f"{name} output")
  numerics.assert_close(dx, dx_r, rtol=CHUNKED, what=f"{name} dx")
  numerics.assert_pytrees_close(dp, dp_r, rtol=CHUNKED, what=f"{name} dparams ")


@pytest.mark.parametrize("name", list(LAYERS))
def test_every_param_has_logical_axes(name):
  layer = build(name)
  leaves = jax.tree_util.tree_leaves_with_path(
      nnx.state(layer, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert leaves
  for path, var in leaves:
    names = var.get_metadata().get("out_sharding")
    assert names is not None, f"{name}: {path} has no logical axes"
    assert len(names) == var[...].ndim, (name, path, names)


def test_delta_product_signed_beta_and_finite_gradients():
  layer = build("delta_product")
  x = 4.0 * _x(3)  # large inputs push sigmoid(x W_beta) towards 0 and 1
  beta = 2.0 * jax.nn.sigmoid(layer.b_proj(x))
  assert float(jnp.max(beta)) > 1.0, "no negative eigenvalue"
  grads = _jit_with(layer, lambda m, x: nnx.grad(
      lambda m: jnp.sum(m(x)[0] ** 2))(m))(x)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert bool(jnp.all(jnp.isfinite(g))), f"non-finite gradient at {path}"


@pytest.mark.parametrize("cls, kwargs, match", [
    (DeltaProduct, dict(n_heads=2, n_householder=5), r"n_householder=5; "
     r"expected 1, 2, 3 or 4"),
    (DeltaProduct, dict(n_heads=2, beta_scale=3.0), r"beta_scale=3.0"),
    (DeltaProduct, dict(n_heads=5), r"DeltaProduct: n_heads=5"),
    (KDA, dict(n_heads=3), r"KDA: n_heads=3; expected a positive divisor"),
    (KDA, dict(n_heads=2, gate_rank=0), r"gate_rank=0"),
    (GDN2, dict(n_heads=2, beta_scale=0.0), r"GDN2: beta_scale=0.0"),
])
def test_bad_arguments(cls, kwargs, match):
  with pytest.raises(ValueError, match=match):
    cls(D, rngs=nnx.Rngs(0), **kwargs)


def test_presets_follow_the_papers():
  assert KDA.preset(2048) == dict(n_heads=16, expand_k=1.0, expand_v=1.0)
  assert GDN2.preset(2048) == KDA.preset(2048)
  p = DeltaProduct.preset(1024)
  assert (p["n_heads"], round(1024 * p["expand_k"]) // 6,
          round(1024 * p["expand_v"]) // 6) == (6, 256, 512)
