"""configs/state_tracking.py: the length args (train_max, test_max) and the
DeltaProduct options (n_h, gated) that the DeltaProduct paper's word problems
use (issue 29)."""

import importlib

import pytest

from lsm.train import loop


def test_state_tracking_lengths_and_delta_product_options():
  """train_max / test_max move the training and test lengths (the DeltaProduct
  paper's word problems: train to 128, test to 512); n_h and gated reach
  delta_product's options; bad lengths fail with the arg's name."""
  st = importlib.import_module("configs.state_tracking")
  default = loop.RunConfig.from_config(st.get_config("task=permutation"))
  assert default.task.train_sizes == (3, 40)
  assert default.task.eval_sizes == st.TEST_LENGTHS == (40, 64, 128, 256)
  run = loop.RunConfig.from_config(st.get_config(
      "task=permutation,group=S4,train_max=128,test_max=512,"
      "mixer=delta_product,n_h=3,beta_scale=2"))
  assert run.task.train_sizes == (3, 128)
  assert run.task.eval_sizes == (128, 256, 512)
  assert run.task.options == {"group": "S4"}
  assert run.model.mixer_kwargs["delta_product"] == dict(
      n_householder=3, beta_scale=2.0, gated=False)
  # parity counts the answer token: length 128 is 127 bits.
  parity = st.get_config("task=parity,train_max=128,test_max=300")
  assert parity.task.eval_sizes == (127, 255, 299)
  with pytest.raises(ValueError, match=r"test_max=100; expected >= train_max=128"):
    st.get_config("train_max=128,test_max=100")
  with pytest.raises(ValueError, match=r"train_max=2; expected >= 3"):
    st.get_config("train_max=2")
