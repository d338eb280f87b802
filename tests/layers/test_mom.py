"""MoM's shared memory is a Gated DeltaNet (issue 27, item 7): with the routed
memories' reads zeroed (``routed_reads=False``), a MoM layer computes exactly
the Gated DeltaNet whose parameters are the shared slot's, over a sequence and
one decoding step at a time, and the routed memories get no gradient from the
output. Routing and load balancing are tested in
test_linear_attention_family.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsm.layers.delta_net import GatedDeltaNet
from lsm.layers.mom import MoM
from tests import numerics

RTOL = numerics.tolerance("invariant", "float32")
D, H, B, T, M = 32, 2, 2, 24, 4


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


def _shared_slot(mom):
  """(GatedDeltaNet attribute path, MoM attribute path, MoM columns) of every
  shared-memory parameter: slot M (the last one) of k, v, beta, the decay and
  their convs' channels; q, the output gate, norm and output projection are
  shared by every slot."""
  K, V = mom.key_dim, mom.value_dim
  k, v, h, all_ = (slice(M * K, None), slice(M * V, None), slice(M * H, None),
                   slice(None))
  return [("q_proj.kernel", "q_proj.kernel", all_),
          ("k_proj.kernel", "k_proj.kernel", k),
          ("v_proj.kernel", "v_proj.kernel", v),
          ("b_proj.kernel", "b_proj.kernel", h),
          ("a_proj.kernel", "a_proj.kernel", h),
          ("A_log", "A_log", h), ("dt_bias", "dt_bias", h),
          ("g_proj.kernel", "g_proj.kernel", all_),
          ("o_proj.kernel", "o_proj.kernel", all_),
          ("norm.scale", "norm.scale", all_)] + [
              (f"convs.{i}.{w}", f"convs.{i}.{w}", cols)
              for i, cols in enumerate((all_, k, v)) for w in ("kernel", "bias")]


def _get(tree, path):
  for name in path.split("."):
    tree = tree[int(name)] if name.isdigit() else getattr(tree, name)
  return tree


def _shared_slot_as_gated_delta_net(mom: MoM) -> GatedDeltaNet:
  """A GatedDeltaNet holding ``mom``'s shared-memory parameters."""
  gdn = GatedDeltaNet(D, n_heads=H, chunk_size=mom.chunk_size, impl=mom.impl,
                      rngs=nnx.Rngs(1))
  for g_path, m_path, cols in _shared_slot(mom):
    dst, src = _get(gdn, g_path), _get(mom, m_path)[...][..., cols]
    assert dst[...].shape == src.shape, (g_path, dst[...].shape, src.shape)
    dst.set_value(src)
  return gdn


def test_mom_without_routed_reads_is_its_shared_gated_delta_net():
  mom = MoM(D, n_heads=H, n_memories=M, top_k=2, routed_reads=False,
            impl="chunked", chunk_size=8, rngs=nnx.Rngs(0))
  gdn = _shared_slot_as_gated_delta_net(mom)
  x = _normal(0, (B, T, D))
  y_mom, _ = mom(x)
  y_gdn, _ = gdn(x)
  numerics.assert_close(y_mom, y_gdn, rtol=RTOL, what="MoM(routed_reads=False)")
  # Decoding: every step's output, and the shared state equals the GDN's.
  c_mom, c_gdn = mom.init_cache(B), gdn.init_cache(B)
  for t in range(6):
    o_mom, c_mom = mom.step(x[:, t], c_mom)
    o_gdn, c_gdn = gdn.step(x[:, t], c_gdn)
    numerics.assert_close(o_mom, o_gdn, rtol=RTOL, what=f"step {t}")
  numerics.assert_close(mom.memory_states(c_mom)[:, M], c_gdn["h"], rtol=RTOL,
                        what="shared state")


def test_mom_without_routed_reads_has_its_gated_delta_nets_gradients():
  """So an optimiser step moves the shared memory as it moves the Gated
  DeltaNet, and leaves the routed memories and the router to the aux loss
  (0 here) and weight decay."""
  mom = MoM(D, n_heads=H, n_memories=M, routed_reads=False, impl="chunked",
            chunk_size=8, aux_loss_weight=0.0, rngs=nnx.Rngs(0))
  gdn = _shared_slot_as_gated_delta_net(mom)
  x, cot = _normal(1, (B, T, D)), _normal(2, (B, T, D))
  loss = lambda m: jnp.sum(m(x)[0] * cot)  # noqa: E731
  g_mom, g_gdn = nnx.grad(loss)(mom), nnx.grad(loss)(gdn)
  for g_path, m_path, cols in _shared_slot(mom):
    numerics.assert_close(_get(g_mom, m_path)[...][..., cols],
                          _get(g_gdn, g_path)[...], rtol=RTOL, what=g_path)
  # The routed slots' columns and the router: exactly zero.
  K, V = mom.key_dim, mom.value_dim
  assert not np.any(g_mom.router.kernel[...])
  for path, n in (("k_proj.kernel", K), ("v_proj.kernel", V),
                  ("b_proj.kernel", H), ("a_proj.kernel", H), ("A_log", H),
                  ("dt_bias", H), ("convs.1.kernel", K), ("convs.2.kernel", V)):
    assert not np.any(_get(g_mom, path)[...][..., :M * n]), path


def test_mom_routed_reads_false_needs_the_shared_memory():
  with pytest.raises(ValueError, match="routed_reads=False needs shared_memory"):
    MoM(D, n_heads=H, routed_reads=False, shared_memory=False, rngs=nnx.Rngs(0))
