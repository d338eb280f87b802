"""Rotary position embeddings (Su et al. 2021), rotate-half convention (GPT-NeoX,
Llama), with the frequency scalings pretrained checkpoints use.

For a head of K channels (K even) at position p, channel pair (i, i + K/2) is
rotated by the angle p * f_i, with the inverse frequencies

  f_i = base^(-2i / K),   i = 0 .. K/2 - 1

and cos, sin multiplied by an attention factor (1 but for YaRN). Scalings (the
``rope_scaling`` / ``rope_parameters`` of a Hugging Face config.json):

* ``linear`` (position interpolation, Chen et al. 2023): f_i / factor.
* ``llama3`` (Llama 3.1): with wavelength w_i = 2 pi / f_i and the pretraining
  length L, f_i / factor where w_i > L / low_freq_factor, f_i unchanged where
  w_i < L / high_freq_factor, and in between the blend
  (1 - s) f_i / factor + s f_i with s = (L / w_i - low) / (high - low).
* ``yarn`` (Peng et al. 2023): f_i blended between f_i (extrapolation) and
  f_i / factor (interpolation) by a linear ramp over the dims whose number of
  rotations over L lies between beta_slow and beta_fast; attention factor
  0.1 ln(factor) + 1 unless the config gives one (or mscale / mscale_all_dim).

Position-dependent scalings (``dynamic`` NTK, ``longrope``) are refused: their
frequencies change with the sequence length, so a cached decode and a parallel
forward would not agree.
"""

import math
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

SCALINGS = ("default", "linear", "llama3", "yarn")


def _require(scaling: Mapping, kind: str, *keys):
  missing = [k for k in keys if scaling.get(k) is None]
  if missing:
    raise ValueError(f"rope_scaling: type {kind!r} needs {missing}; got "
                     f"{dict(scaling)}")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(head_dim: int, base: float,
                     scaling: Mapping | None = None) -> tuple[np.ndarray, float]:
  """The inverse frequencies and the attention factor of a head.

  Args:
    head_dim: K, even.
    base: the frequency base (``rope_theta``).
    scaling: None, or a mapping with ``rope_type`` (or ``type``) in
      ``SCALINGS`` and that type's parameters, as in a Hugging Face config.

  Returns:
    (float32 [K/2] inverse frequencies, attention factor multiplying cos, sin).
  """
  if head_dim < 2 or head_dim % 2:
    raise ValueError(f"rope_frequencies: head_dim={head_dim}; expected an even "
                     "int >= 2")
  scaling = dict(scaling or {})
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind not in SCALINGS:
    raise ValueError(f"rope_scaling: type {kind!r} is not supported; expected one "
                     f"of {list(SCALINGS)} (dynamic NTK and longrope depend on the "
                     "sequence length)")
  if scaling.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"rope_scaling: partial_rotary_factor="
                     f"{scaling['partial_rotary_factor']}; expected 1.0 (every "
                     "channel rotated)")
  # float32 as Hugging Face computes them, so imported models match its logits.
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  pos_freq = np.float32(base) ** exponent
  inv_freq = (np.float32(1.0) / pos_freq).astype(np.float32)
  factor = 1.0
  if kind == "linear":
    _require(scaling, kind, "factor")
    inv_freq = inv_freq / np.float32(scaling["factor"])
  elif kind == "llama3":
    _require(scaling, kind, "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings")
    f = np.float32(scaling["factor"])
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / f, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / f + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  elif kind == "yarn":
    _require(scaling, kind, "factor", "original_max_position_embeddings")
    f = float(scaling["factor"])
    old_len = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    factor = scaling.get("attention_factor")
    if factor is None:
      mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
      factor = (_yarn_mscale(f, mscale) / _yarn_mscale(f, mscale_all)
                if mscale and mscale_all else _yarn_mscale(f))

    def dim_of(rotations):  # the dim that turns `rotations` times over old_len
      return (head_dim * math.log(old_len / (rotations * 2 * math.pi))
              / (2 * math.log(base)))

    lo, hi = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
      lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
      hi += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - lo) / (hi - lo),
                   0, 1).astype(np.float32)
    extrapolate = 1 - ramp
    interp = np.float32(1.0) / (np.float32(f) * pos_freq)
    inv_freq = interp * (1 - extrapolate) + inv_freq * extrapolate
  return np.asarray(inv_freq, np.float32), float(factor)


def apply_rope(x, positions, base: float, scaling: Mapping | None = None):
  """Rotary embedding of queries or keys, computed in float32.

  Args:
    x: [B, T, H, K] queries or keys, K even.
    positions: [T] or [B, T] int32 positions (per row for packed documents).
    base: the frequency base (10000 in the paper).
    scaling: optional frequency scaling (``rope_frequencies``).

  Returns:
    [B, T, H, K] in x.dtype.
  """
  half = x.shape[-1] // 2
  inv_freq, factor = rope_frequencies(x.shape[-1], base, scaling)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.broadcast_to(angles, (x.shape[0], x.shape[1], half))
  cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, K/2]
  sin = jnp.sin(angles)[:, :, None, :]
  if factor != 1.0:
    cos, sin = cos * factor, sin * factor
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): x * cos + rotate_half(x) * sin.
  y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return y.astype(x.dtype)
