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

Rows are keyed by (impl, input dtype, output): each output and gradient of an op
has its own bound, because one call mixes precisions. With bfloat16 q, k, v the
chunked ops return o and dq in bfloat16 (errors of bf16 rounding, ~2e-3) but the
final state h_t and dh0 in float32, computed in float32 from the same rounded
values as the reference's (errors ~3e-7): one bound for both would let h_t be
wrong by 1e-2. Output names are the ops' own: ``o`` / ``y``, ``h_t`` and ``d``
plus an argument's name (``dq``, ``dlog_g``, ``dh0``, ``dA``, ...).
"""

import jax.numpy as jnp
import numpy as np

ANY = "*"  # the output of a row that bounds every output of a call alike

# Output names of the ops, as the op tests name them.
_GLA = ("o", "h_t", "dq", "dk", "dv", "dlog_g", "dh0")
_DELTA_RULE = ("o", "h_t", "dq", "dk", "dv", "dbeta", "dlog_g", "dh0")
_PALLAS_OUTPUTS = tuple(dict.fromkeys(_GLA + _DELTA_RULE))


def _rows(impls, dtypes, outputs, rtol):
  return {(i, d, o): rtol for i in impls for d in dtypes for o in outputs}


class _Table(dict):
  """TOLERANCES; a 2-tuple key (impl, dtype) reads the (impl, dtype, ANY) row,
  as tests that compare a whole layer or model did before rows had outputs."""

  def __missing__(self, key):
    if len(key) == 2:
      return self[(*key, ANY)]
    raise KeyError(key)


# (impl, input dtype, output) -> relative RMS tolerance against the float32
# reference fed the same values upcast to float32. Each row group says what was
# measured: the worst relative RMS error (and max-abs error / GUARD, whichever
# is larger) over the shapes and seeds the tests use, on CPU, 2026-12; a row is
# about 10x that, rounded up to 1, 2 or 5 x 10^k, and never above the bound it
# replaces (1e-5 chunked float32, 1e-4 Pallas float32, 1e-2 bfloat16).
TOLERANCES = _Table({
    # chunked, float32 inputs. Measured (gla, delta_rule, ssm_scan,
    # selective_scan; every form; packed documents; strong decay; the property
    # tests' draws): o 4.4e-7 (delta_rule), y 1.3e-7, h_t 4.2e-7, dq 4.5e-7,
    # dk 6.8e-7, dv 4.8e-7, dlog_g 1.2e-6 (gla, packed, strong decay), dbeta
    # 6.1e-7, dh0 7.2e-7; ssm_scan da 7.5e-8, db 5.5e-8; selective_scan dx
    # 1.3e-7, ddt 1.2e-7, dA 1.9e-7, dB 7.4e-8, dC 5.6e-8, dD 8.4e-8.
    **{("chunked", "float32", o): r for o, r in {
        "o": 5e-6, "y": 2e-6, "h_t": 5e-6, "dq": 5e-6, "dk": 1e-5, "dv": 5e-6,
        "dlog_g": 1e-5, "dbeta": 1e-5, "dh0": 1e-5, "da": 1e-6, "db": 1e-6,
        "dx": 2e-6, "ddt": 2e-6, "dA": 2e-6, "dB": 1e-6, "dC": 1e-6,
        "dD": 1e-6}.items()},
    # chunked, bfloat16 inputs (h0, and selective_scan's A and D, float32).
    # Outputs and gradients returned in bfloat16 carry its rounding (2^-9
    # relative): measured o 1.7e-3, y 1.9e-3, dq dk dv dlog_g dbeta 1.7e-3,
    # da db 1.8e-3, dx ddt dB dC 1.9e-3: 10x is above 1e-2, so 1e-2 stays.
    # The chunked ops compute everything in float32 from the rounded inputs,
    # as the reference does from the same values: the float32 outputs are
    # float32-exact. Measured h_t 2.6e-7, dh0 2.6e-7 (delta_rule), dA 7.9e-8,
    # dD 8.4e-8.
    **_rows(("chunked",), ("bfloat16",),
            ("o", "y", "dq", "dk", "dv", "dlog_g", "dbeta", "da", "db", "dx",
             "ddt", "dB", "dC"), 1e-2),
    **{("chunked", "bfloat16", o): r for o, r in {
        "h_t": 5e-6, "dh0": 5e-6, "dA": 1e-6, "dD": 1e-6}.items()},
    # dplr (lsm.ops.dplr), chunked: the gradients of its rank-one vectors a,
    # b, u, named "dplr:da" etc. because "da" and "db" above are ssm_scan's.
    # They are key-side gradients like the delta rule's dk, so they start
    # from its rows (1e-5 float32, 1e-2 bfloat16). Measured
    # (tests/ops/test_dplr.py: every gate kind, T < C, two remat groups,
    # decay -5 and -50, mixed strong and mild gates, packed documents):
    # float32 da 5.3e-7, db 5.4e-7, du 3.9e-7 -> 1e-5 (10x rounded up, the
    # starting bound); bfloat16 1.7e-3 each (bf16 rounding of the returned
    # gradients; 10x is above 1e-2, so 1e-2 stays). dplr's other outputs use
    # the shared rows above; measured float32 o 3.7e-7, h_t 3.8e-7, dq 3.5e-7,
    # dv 3.8e-7, dlog_g 5.0e-7, dh0 4.1e-7; bfloat16 h_t 2.8e-7, dh0 3.7e-7,
    # the rest 1.7e-3.
    **{("chunked", "float32", o): 1e-5 for o in ("dplr:da", "dplr:db",
                                                  "dplr:du")},
    **_rows(("chunked",), ("bfloat16",), ("dplr:da", "dplr:db", "dplr:du"),
            1e-2),
    # Pallas kernels. bfloat16 / float16 inputs: every output keeps the 16-bit
    # bound. The kernels round by design: pallas_triton and pallas_tpu feed
    # their matmuls 16-bit operands with float32 accumulation
    # (tiles.precision_for), rounding float32 values that enter a matmul (decayed
    # q and k, A, the states) to the input dtype; pallas_mosaic_gpu rounds the
    # per-chunk states, A and the key factors to the input dtype (wgmma
    # operands), see each kernel's docstring. Interpret mode on CPU measures
    # these roundings (1.5e-3 to 4.1e-3 at V = 512) but not the device's
    # accumulation order: these rows stay at the
    # bf16 bound, as the kernels' own notes record (float16 has finer steps and
    # the same rounding points, so the bf16 bound holds for it).
    **_rows(("pallas_triton", "pallas_tpu"), ("bfloat16",), _PALLAS_OUTPUTS, 1e-2),
    **_rows(("pallas_mosaic_gpu",), ("bfloat16", "float16"), _PALLAS_OUTPUTS,
            1e-2),
    # Pallas kernels, float32 inputs (pallas_triton, pallas_tpu: IEEE float32
    # matmuls). Not re-measured for this table: interpret mode on CPU is not
    # the devices' arithmetic (another summation order, FMA), so the rows keep
    # the bound the device tests were written against.
    **_rows(("pallas_triton", "pallas_tpu"), ("float32",), _PALLAS_OUTPUTS,
            1e-4),
    # Rows that bound every output alike (output ANY).
    # Two runs of the same impl that should agree up to summation order (split
    # sequences, other chunk sizes, step-by-step decoding, sequence-parallel
    # slices against one device, packed rows against documents run alone by
    # the reference), in float32: every output is float32 arithmetic on both
    # sides.
    ("invariant", "float32", ANY): 1e-5,
    # Initialisation maths checked in numpy float64 (e.g. LSSL's HiPPO modes).
    ("init", "float64", ANY): 1e-9,
    # Whole train steps that should agree up to summation order: accumulated
    # micro-batches vs one batch, a sharded mesh vs one device; parameters after
    # a few AdamW steps, losses and gradient norms.
    ("train", "float32", ANY): 1e-5,
    # The same step with bf16 compute against float32 compute.
    ("train", "bfloat16", ANY): 1e-2,
    # A whole layer or model on the chunked impl against the reference
    # (tests/layers, tests/models), where one output mixes every op's
    # outputs and gradients: the bounds every output had before rows had
    # outputs. The op tests never read these rows.
    ("chunked", "float32", ANY): 1e-5,
    ("chunked", "bfloat16", ANY): 1e-2,
})
# Families whose rows bound every output alike.
_OUTPUT_BLIND = ("invariant", "init", "train")
GUARD = 10.0
ABS_FLOOR = 1e-6


def family(impl: str) -> str:
  """"chunked" for the chunked impl and its forced forms ("chunked-<form>")."""
  return "chunked" if impl.startswith("chunked") else impl


def tolerance(impl: str, dtype, output: str = ANY) -> float:
  """The row of (impl, input dtype, output).

  ``output`` is an output's name (``o``, ``h_t``, ``dq``, ...). Left out, it
  reads the (impl, dtype, ANY) row: one bound for every output of a call, which
  only the output-blind families (invariant, init, train) and whole-layer
  comparisons of the chunked impl have. An op output without its own row is a
  KeyError, never a silent fallback to a looser bound.
  """
  dt = jnp.dtype(dtype).name
  fam = family(impl)
  if (fam, dt, output) in TOLERANCES:
    return TOLERANCES[(fam, dt, output)]
  if output == ANY or fam in _OUTPUT_BLIND:
    return TOLERANCES[(fam, dt, ANY)]
  raise KeyError(f"tests/numerics.py has no row for impl={impl!r}, "
                 f"dtype={dt}, output={output!r}")


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


def assert_outputs_close(actual, expected, *, impl: str, dtype, names,
                         what: str = "") -> None:
  """Compares matching sequences of outputs, each with its own row
  ``tolerance(impl, dtype, name)``; ``dtype`` is the call's input dtype."""
  for a, e, name in zip(actual, expected, names, strict=True):
    assert_close(a, e, rtol=tolerance(impl, dtype, name),
                 what=f"{what} {name}".strip())


def assert_pytrees_close(actual, expected, *, rtol: float, what: str = "") -> None:
  """Compares two pytrees of the same structure leaf by leaf, naming each."""
  import jax  # pylint: disable=g-import-not-at-top
  flat_a = jax.tree_util.tree_leaves_with_path(actual)
  flat_e = jax.tree.leaves(expected)
  assert len(flat_a) == len(flat_e), f"{what}: trees differ in size"
  for (path, a), e in zip(flat_a, flat_e):
    assert_close(a, e, rtol=rtol, what=f"{what}{jax.tree_util.keystr(path)}")
