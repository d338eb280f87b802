r"""Language model over any mixer stack. The model section is complete; the
data, optimiser and training sections arrive with the trainer. Build it:

python -c "import configs.lm as c; print(c.get_config('mixer=gla,size=20m'))"

Args (``:arg``): mixer (a name in lsm.layers.MIXERS, or "hybrid" for three
delta_net layers then one attention layer, repeated), size (configs/common.py
SIZES), impl, vocab_size, beta_scale (DeltaNet eigenvalue range: 2 gives
[-1, 1]), smoke (tiny shapes for CPU tests).
"""

import ml_collections

from configs import common

HYBRID = ("delta_net", "delta_net", "delta_net", "attention")


def get_config(arg=None):
  arg = common.parse_arg(arg, mixer="gla", size="20m", impl="auto",
                         vocab_size=32000, beta_scale=1.0, smoke=False)
  c = ml_collections.ConfigDict()
  model = dict(vocab_size=arg.vocab_size, impl=arg.impl,
               **common.check_size(arg.size))
  if arg.mixer == "hybrid":
    model["pattern"] = HYBRID
  else:
    model["mixer"] = arg.mixer
  # beta_scale=2 lets DeltaNet transitions reach eigenvalue -1 (state tracking).
  model["mixer_kwargs"] = {"delta_net": {"beta_scale": arg.beta_scale},
                           "gated_delta_net": {"beta_scale": arg.beta_scale}}
  if arg.smoke:
    model.update(common.SMOKE)
    if arg.mixer == "hybrid":
      model["n_layers"] = len(HYBRID)
  c.model = model
  return c
