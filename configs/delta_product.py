r"""DeltaProduct / Gated DeltaProduct (Siems et al. 2025): n_h Householder
steps per token on the dplr op. Pretraining.

lsm-train --config=configs/delta_product.py:size=125m --workdir=runs/delta_product
Smoke run on a CPU (under a minute):
lsm-train --config=configs/delta_product.py:smoke=True --workdir=/tmp/delta_product_smoke

Args (``:arg``): as configs/lm.py (configs/common.py ``lm_run``), mixer fixed;
``beta_scale=2`` gives eigenvalues in [-1, 1] (the paper's state-tracking
setting). n_householder is the layer's default, 2 (the paper's main setting).
"""

from configs import common


def get_config(arg=None):
  return common.lm_run(arg, mixer="delta_product")
