"""The one tolerance table, and the comparison every numerical test uses.

A fast impl's result ``a`` is compared with the float32 reference's ``e`` by

  relative RMS error:  rms(a - e) / max(rms(e), ABS_FLOOR)          <= rtol
  max-abs guard:       max|a - e| / max(max|e|, ABS_FLOOR)           <= GUARD * rtol

The RMS criterion measures the typical error; the guard catches a few badly wrong
elements (one wrong chunk boundary, say) that an RMS over many elements would
dilute. ABS_FLOOR keeps quantities that are exactly or nearly zero in the
reference (gradients through a decay of exp(-50)) from turning rounding noise into
an infinite relative error. A failure fails: never loosen an entry to make a test
pass, find the bug.
"""

import jax.numpy as jnp
import numpy as np

# (impl family, input dtype) -> relative RMS tolerance against the f32 reference.
TOLERANCES = {
    ("chunked", "float32"): 1e-5,
    ("chunked", "bfloat16"): 1e-2,
    ("pallas", "float32"): 1e-4,
    ("pallas", "bfloat16"): 1e-2,
    # Two runs of the same impl that should agree up to summation order (split
    # sequences, other chunk sizes, step-by-step decoding), in float32.
    ("invariant", "float32"): 1e-5,
    # Initialisation maths checked in numpy float64 (e.g. LSSL's HiPPO modes).
    ("init", "float64"): 1e-9,
    # Whole train steps that should agree up to summation order: accumulated
    # micro-batches vs one batch, a sharded mesh vs one device; parameters after
    # a few AdamW steps, losses and gradient norms.
    ("train", "float32"): 1e-5,
    # The same step with bf16 compute against float32 compute.
    ("train", "bfloat16"): 1e-2,
}
GUARD = 10.0
ABS_FLOOR = 1e-6


def family(impl: str) -> str:
  return "pallas" if impl.startswith("pallas") else impl


def tolerance(impl: str, dtype) -> float:
  return TOLERANCES[(family(impl), jnp.dtype(dtype).name)]


def errors(actual, expected) -> tuple[float, float]:
  """(relative RMS error, relative max-abs error) of actual against expected."""
  a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
  if a.shape != e.shape:
    raise AssertionError(f"shape {a.shape} != expected shape {e.shape}")
  if not np.all(np.isfinite(a)):
    return float("inf"), float("inf")
  diff = a - e
  rms = np.sqrt(np.mean(diff ** 2)) / max(np.sqrt(np.mean(e ** 2)), ABS_FLOOR)
  mx = np.max(np.abs(diff), initial=0.0) / max(np.max(np.abs(e), initial=0.0),
                                               ABS_FLOOR)
  return float(rms), float(mx)


def assert_close(actual, expected, *, rtol: float, what: str = "") -> None:
  rms, mx = errors(actual, expected)
  if not (rms <= rtol and mx <= GUARD * rtol):
    raise AssertionError(
        f"{what}: relative RMS error {rms:.3e} (tol {rtol:.1e}), relative max-abs "
        f"error {mx:.3e} (guard {GUARD * rtol:.1e})")


def assert_trees_close(actual, expected, *, rtol: float, names) -> None:
  """Compares matching sequences of arrays, naming each in the message."""
  for a, e, name in zip(actual, expected, names, strict=True):
    assert_close(a, e, rtol=rtol, what=name)


def assert_pytrees_close(actual, expected, *, rtol: float, what: str = "") -> None:
  """Compares two pytrees of the same structure leaf by leaf, naming each."""
  import jax  # pylint: disable=g-import-not-at-top
  flat_a = jax.tree_util.tree_leaves_with_path(actual)
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e), f"{what}: trees differ in size"
  for (path, a), e in zip(flat_a, flat_e):
    assert_close(a, e, rtol=rtol, what=f"{what}{jax.tree_util.keystr(path)}")
