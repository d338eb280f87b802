"""Dispatch by capability: each impl's ACCEPTS is the one statement of what it
takes; "auto" takes the first impl in the platform's order that accepts the
call and logs what it skipped; an explicit impl raises naming its limit.
No device needed: ``_dispatch.assume_platform`` stands in for one."""

import logging

import jax
import jax.numpy as jnp
import pytest

from lsm.ops import _dispatch
from lsm.ops.delta_rule import api as delta_api
from lsm.ops.delta_rule import delta_rule
from lsm.ops.gla import api as gla_api
from lsm.ops.gla import gla

BF16, F32 = jnp.bfloat16, jnp.float32


def _auto(accepts, dtype, K, V, chunk=64, gate="channel", docs=False):
  return _dispatch.resolve("op", "auto", accepts,
                           _dispatch.Call.of(dtype, K, V, chunk, gate, docs))


@pytest.mark.parametrize("accepts", [gla_api._ACCEPTS, delta_api._ACCEPTS],
                         ids=["gla", "delta_rule"])
@pytest.mark.parametrize("plat, family, dtype, K, V, chunk, want", [
    # Hopper: Mosaic GPU for 16-bit inputs at head dims <= 128 ...
    ("gpu", "hopper", BF16, 128, 128, 64, "pallas_mosaic_gpu"),
    ("gpu", "hopper", jnp.float16, 64, 100, 64, "pallas_mosaic_gpu"),
    # ... Triton for float32 (wgmma's float32 is TF32), K = 256 or another
    # chunk ...
    ("gpu", "hopper", F32, 64, 64, 64, "pallas_triton"),
    ("gpu", "hopper", BF16, 256, 128, 64, "pallas_triton"),
    ("gpu", "hopper", BF16, 64, 64, 32, "pallas_triton"),
    # ... and chunked past every kernel's head dims (Based: K = 273).
    ("gpu", "hopper", BF16, 273, 33, 64, "chunked"),
    ("gpu", "hopper", BF16, 64, 64, 48, "chunked"),
    ("gpu", "hopper", BF16, 128, 512, 64, "pallas_mosaic_gpu"),  # V blocks
    ("gpu", "hopper", BF16, 256, 512, 64, "pallas_triton"),
    ("gpu", "ampere", BF16, 64, 64, 64, "pallas_triton"),
    ("gpu", "ampere", F32, 256, 256, 64, "pallas_triton"),
    ("gpu", "ampere", BF16, 64, 512, 64, "pallas_triton"),  # V tiled to 512
    ("gpu", "ampere", BF16, 64, 1024, 64, "chunked"),
    ("gpu", "other", BF16, 64, 64, 64, "chunked"),
    ("tpu", "other", BF16, 256, 256, 64, "pallas_tpu"),
    ("tpu", "other", BF16, 64, 640, 64, "chunked"),
    ("cpu", "other", BF16, 64, 64, 64, "chunked"),
])
def test_auto_takes_the_first_impl_that_accepts(accepts, plat, family, dtype,
                                                K, V, chunk, want):
  with _dispatch.assume_platform(plat, family):
    assert _auto(accepts, dtype, K, V, chunk) == want
    assert _auto(accepts, dtype, K, V, chunk, docs=True) == want


def test_auto_logs_once_what_it_skipped_and_why(caplog):
  _dispatch._log_choice.cache_clear()
  with caplog.at_level(logging.INFO, logger="lsm.ops"), \
      _dispatch.assume_platform("gpu", "hopper"):
    for _ in range(3):
      assert _auto(gla_api._ACCEPTS, F32, 273, 64) == "chunked"
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1, lines
  assert ("skipped pallas_mosaic_gpu (takes bfloat16 or float16 inputs; got "
          "float32 (wgmma's float32 path is TF32") in lines[0], lines
  assert ("pallas_triton (supports K up to 256; got K (key/query head "
          "dim) = 273); took 'chunked'") in lines[0], lines


@pytest.mark.parametrize("impl, K, match", [
    # Each impl names its own limit (before, the common check answered
    # "up to 256" for Mosaic GPU too).
    ("pallas_mosaic_gpu", 273, r"supports K up to 128; got K \(key/"
     r"query head dim\) = 273"),
    ("pallas_mosaic_gpu", 160, r"supports K up to 128; got K"),
    ("pallas_triton", 273, r"supports K up to 256; got K \(key/query "
     r"head dim\) = 273"),
    ("pallas_tpu", 300, r"supports K up to 256"),
])
@pytest.mark.parametrize("op", ["gla", "delta_rule"])
def test_explicit_impl_raises_naming_its_limit(op, impl, K, match):
  x = jnp.zeros((1, 8, 1, K), BF16)
  fn = gla if op == "gla" else delta_rule
  args = (x, x, x) if op == "gla" else (x, x, x, jnp.ones((1, 8, 1), BF16))
  with pytest.raises(ValueError, match=rf"{op}: impl='{impl}' {match}"):
    fn(*args, impl=impl, interpret=True)


def test_the_ops_describe_their_calls():
  """Through the public op (traced, not run): on an assumed Hopper, a float32
  GLA call gets the Triton kernels, a bfloat16 one with a per-head gate Mosaic
  GPU's, a K = 273 call the chunked form."""
  def traced(K, dtype, log_g_shape):
    q = jnp.zeros((1, 64, 2, K), dtype)
    v = jnp.zeros((1, 64, 2, 32), dtype)
    log_g = jnp.zeros(log_g_shape)
    with _dispatch.assume_platform("gpu", "hopper"):
      return str(jax.make_jaxpr(lambda q, v, g: gla(q, q, v, g))(q, v, log_g))
  triton = traced(64, F32, (1, 64, 2, 64))
  assert "pallas_call" in triton and "Ref<gmem>" not in triton
  assert "Ref<gmem>" in traced(64, BF16, (1, 64, 2))   # Mosaic GPU's refs
  chunked = traced(273, BF16, (1, 64, 2))
  assert "pallas_call" not in chunked and "Ref<gmem>" not in chunked


def test_assume_platform_is_scoped_and_checked():
  real = _dispatch.platform()
  with _dispatch.assume_platform("tpu"):
    assert _dispatch.platform() == "tpu"
  assert _dispatch.platform() == real
  with pytest.raises(ValueError, match=r"plat='cuda'; expected 'cpu', 'gpu'"):
    with _dispatch.assume_platform("cuda"):
      pass
