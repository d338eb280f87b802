"""Shared pieces of the run configs: size presets and ``:arg`` parsing.

Imports only ml_collections (configs never import JAX or lsm).
"""

import ml_collections

# Model shapes. 340m and 1.3b follow the GLA / DeltaNet papers (Yang et al. 2023,
# 2024: d_model 1024 / 2048, 24 layers); 125m and 760m follow the GPT-3 / Mamba
# ladder (768 x 12, 1536 x 24); 20m is for CPU work. Parameter counts depend on the
# mixer and vocabulary: tests/models/test_lm.py checks each preset against a
# closed form.
SIZES = {
    "20m": dict(d_model=384, n_layers=8, n_heads=4),
    "125m": dict(d_model=768, n_layers=12, n_heads=4),
    "340m": dict(d_model=1024, n_layers=24, n_heads=4),
    "760m": dict(d_model=1536, n_layers=24, n_heads=4),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=4),
}
# Tiny shapes that compile and run one step on a laptop CPU in seconds.
SMOKE = dict(d_model=64, n_layers=2, n_heads=2, vocab_size=256, chunk_size=16)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"size=20m,impl=chunked,smoke=True"`` over ``defaults``.

  Every key must be one of the defaults; values are converted to the default's
  type (bools accept true/false/1/0).
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config arg {item!r}: expected key=value with key one of "
                       f"{sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {key}={value!r}: expected true or false")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = type(default)(value)
  return out


def check_size(size: str) -> dict:
  if size not in SIZES:
    raise ValueError(f"size={size!r}; expected one of {sorted(SIZES)}")
  return dict(SIZES[size])
