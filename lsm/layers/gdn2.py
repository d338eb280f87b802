r"""Gated DeltaNet-2 (GDN-2; NVIDIA, "Gated DeltaNet-2: Decoupling Erase and
Write in Linear Attention"; flash-linear-attention's ``gdn2``): the
channel-wise gated delta rule.

KDA (lsm/layers/kda.py) with its one step size per head split into two
channel-wise gates, an erase gate e on the key and a write gate w on the value:

    S_t = (I - k_t (e_t o k_t)^T) diag(exp g_t) S_{t-1} + k_t (w_t o v_t)^T
    o_t = K^{-1/2} S_t^T q_t

e_t = beta_scale * sigmoid(x_t W_e) in R^K and w_t = sigmoid(x_t W_w) in R^V
per head; g_t is KDA's low-rank per-channel decay -exp(A_log) * softplus(x_t
W_f_down W_f_up + dt_bias). e = w = beta recovers KDA. On lsm.ops.dplr (through
``sequence.dplr``): a = exp(g) o e o k, b = -k, u = k, v -> w o v. q, k
L2-normalised, short convolutions and the sigmoid-gated output norm as KDA.

Simplified relative to flash-linear-attention's GatedDeltaNet2: no grouped
value heads, no ``safe_gate`` (bounded in-kernel gate) option; the short
convolutions have a bias; lsm's LeCun-normal init. dt_bias starts as Mamba-2's
(softplus^-1 of log-uniform [1e-3, 1e-1]), as flash-linear-attention's layer.
"""

import math

import jax
import jax.numpy as jnp

from lsm.layers.kda import KDA
from lsm.parallel import axes


class GDN2(KDA):
  """GDN-2 mixer: [B, T, D] -> [B, T, D] (protocol in lsm/layers/__init__.py;
  equations in the module docstring). Arguments as ``KDA``; ``beta_scale``
  scales the erase gate e (2: eigenvalues of the erase factor down to -1)."""

  @staticmethod
  def preset(d_model: int) -> dict:
    """Constructor options of the paper's head structure at width ``d_model``
    (the size presets): flash-linear-attention's GatedDeltaNet2 defaults,
    heads of K = V = 128 (d_model 2048: 16 heads), as KDA."""
    return KDA.preset(d_model)

  def _gate_projections(self, d_model, linear):
    """e: one per key channel; w: one per value channel."""
    self.e_proj = linear(d_model, self.key_dim, axes.EMBED, axes.HEADS)
    self.w_proj = linear(d_model, self.value_dim, axes.EMBED, axes.HEADS)

  def _dt_bias_init(self, rngs):
    dt = jnp.exp(jax.random.uniform(rngs.params(), (self.key_dim,), jnp.float32,
                                    math.log(1e-3), math.log(1e-1)))
    return dt + jnp.log(-jnp.expm1(-dt))

  def _rank_one(self, x, k, v, decay):
    """a = exp(g) o e o k, b = -k, u = k, v -> w o v."""
    e = self.beta_scale * jax.nn.sigmoid(
        self._split(self.e_proj(x)).astype(jnp.float32))
    w = jax.nn.sigmoid(self._split(self.w_proj(x)).astype(jnp.float32))
    a = decay * e * k.astype(jnp.float32)
    v = (w * v.astype(jnp.float32)).astype(v.dtype)
    return a.astype(k.dtype), -k, k, v
