"""tests/numerics.py's rows per output, and the error they catch: with bfloat16
inputs the chunked ops' float32 final state and its gradient are held to
float32-level bounds, so a relative error of 1e-4 in h_t or dh0 fails where the
bfloat16 bound of 1e-2 (which o and the input gradients keep) would pass it."""

import jax
import jax.numpy as jnp
import pytest

from lsm.ops.delta_rule import delta_rule
from lsm.ops.gla import gla
from tests import numerics
from tests.ops import harness, test_delta_rule, test_gla, test_ssm_scan

BF16, F32 = jnp.bfloat16, jnp.float32


def test_rows_are_per_output():
  for state in ("h_t", "dh0"):
    assert numerics.tolerance("chunked", BF16, state) <= 1e-5, state
    assert numerics.tolerance("chunked", BF16, state) < numerics.tolerance(
        "chunked", BF16, "o")
  # Forced forms read the chunked rows; a kernel that rounds its states to
  # bf16 by design keeps the bf16 bound on them.
  assert (numerics.tolerance("chunked-associative", BF16, "h_t")
          == numerics.tolerance("chunked", BF16, "h_t"))
  assert numerics.tolerance("pallas_mosaic_gpu", BF16, "h_t") == 1e-2
  # An output without its own row is an error, never the looser whole-call row.
  with pytest.raises(KeyError, match="no row for impl='chunked'"):
    numerics.tolerance("chunked", BF16, "h_T")
  # Output-blind rows, and the (impl, dtype) keys tests outside ops/ read.
  assert (numerics.tolerance("invariant", F32, "dh0")
          == numerics.TOLERANCES[("invariant", "float32")]
          == numerics.tolerance("invariant", F32))
  assert numerics.tolerance("chunked", F32) == 1e-5


def _gla():
  *dims, chunk = test_gla.SHAPES["T63_KneV"]  # test_gla's bf16 case: shared compiles
  primals = test_gla.make_inputs(0, *dims, gate="channel", dtype=BF16)
  return harness.run_against_reference(gla, "chunked", chunk, primals,
                                       jax.random.key(1))


def _delta_rule():
  *dims, chunk = test_delta_rule.SHAPES["T63_KneV"]
  primals = test_delta_rule.make_inputs(0, *dims, beta_max=2.0, gated=True,
                                        dtype=BF16)
  return harness.run_against_reference(delta_rule, "chunked", chunk, primals,
                                       jax.random.key(1))


def _ssm_scan():
  a, b, h0, dy, dh = test_ssm_scan._inputs((2, 63, 3), BF16)
  return (test_ssm_scan._NAMES,
          test_ssm_scan._forward_backward("chunked")(a, b, h0, dy, dh),
          test_ssm_scan._forward_backward("reference")(
              a.astype(F32), b.astype(F32), h0, dy.astype(F32), dh))


@pytest.mark.parametrize("output", ["h_t", "dh0"])
@pytest.mark.parametrize("run", [_gla, _delta_rule, _ssm_scan],
                         ids=["gla", "delta_rule", "ssm_scan"])
def test_bf16_state_off_by_1e4_fails(run, output):
  names, got, want = run()
  numerics.assert_outputs_close(got, want, impl="chunked", dtype=BF16,
                                names=names)
  i = names.index(output)
  assert got[i].dtype == F32
  off = (*got[:i], got[i] * (1 + 1e-4), *got[i + 1:])
  assert numerics.errors(off[i], want[i])[0] < numerics.tolerance(
      "chunked", BF16, "o")  # the bound h_t and dh0 had before
  with pytest.raises(AssertionError, match=rf"^{output}: relative RMS"):
    numerics.assert_outputs_close(off, want, impl="chunked", dtype=BF16,
                                  names=names)
