"""The Pallas Triton kernels fit an A100 and an H100: every kernel of every op,
forward and backward, compiled to cubin without a GPU (experiments/
kernel_resources.py), at head dims 64 and 128 in bf16, within the limits that
``kernel_resources.violations`` states (shared memory per block, spills,
no ptxas fallback to 32 registers). Needs PyPI triton (the test extra pins it).

The kernels on packed rows ("+docs", with their document masks) are compiled
too, at D = 128, and must fit the shared memory; they are not held to the spill limits:
the GLA dqkg and the delta rule's two sequential kernels sit at 255 registers
without documents, and the masks push them to 28-100 B of sm_90a spills
(BENCHMARKS.md, "Pallas Triton kernels with document masks")."""

import pytest

from experiments import kernel_resources as kr

pytest.importorskip("triton", reason="PyPI triton compiles the kernels to cubin")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
  return kr.measure(dims=(64, 128), dtypes=("bfloat16",),
                    out=str(tmp_path_factory.mktemp("kernel-resources")))


@pytest.fixture(scope="module")
def doc_rows(tmp_path_factory):
  """Plain and "+docs" kernels at D = 128 (the larger tiles)."""
  return kr.measure(dims=(128,), dtypes=("bfloat16",), documents=True,
                    out=str(tmp_path_factory.mktemp("kernel-resources-docs")))


def test_every_kernel_was_compiled_for_both_targets(rows):
  kernels = {(r.op, r.kernel, r.D) for r in rows}
  by_sm = {sm: {(r.op, r.kernel, r.D) for r in rows if r.sm == sm}
           for sm in ("sm_80", "sm_90a")}
  assert by_sm["sm_80"] == by_sm["sm_90a"] == kernels
  for op in kr.OPS:  # forward and backward kernels of each op
    assert len({k for o, k, _ in kernels if o == op}) >= 4, op


@pytest.mark.parametrize("op", kr.OPS)
def test_kernels_fit_the_hardware(rows, op):
  assert kr.violations([r for r in rows if r.op == op]) == []


# The +docs kernels' compile sweep takes about 5 minutes of a worker: a long
# sweep (slow), kept out of the default suite's 20-minute budget since
# 2026-12-06; the plain kernels above stay in it. Run with -m slow after any
# change to the document masks.
@pytest.mark.slow
def test_kernels_with_documents_fit_shared_memory(doc_rows):
  kernels = {(r.op, r.kernel, r.sm) for r in doc_rows}
  plain = {(o, k, sm) for o, k, sm in kernels if not k.endswith("+docs")}
  assert {(o, k + "+docs", sm) for o, k, sm in plain} == kernels - plain
  docs = [r for r in doc_rows if r.kernel.endswith("+docs")]
  assert [m for m in kr.violations(docs) if "shared memory" in m] == []


def _row(**kw):
  base = dict(op="gla", kernel="k", D=128, dtype="bfloat16", sm="sm_90a",
              num_warps=4, num_stages=1, regs=200, spill_stores=0, spill_loads=0,
              smem=1000, serialized_wgmma=False)
  return kr.Row(**{**base, **kw})


def test_violations_names_each_limit():
  """The limits themselves, on made-up rows, so the check above can fail."""
  assert kr.violations([_row(), _row(sm="sm_80", spill_stores=1024)]) == []
  msgs = kr.violations([
      _row(smem=232_449),
      _row(sm="sm_80", smem=166_913, D=256),  # shared memory counts at any D
      _row(spill_stores=4),  # none allowed on sm_90a
      _row(sm="sm_80", spill_stores=1025),
      _row(sm="sm_80", regs=32, spill_stores=8),
      _row(serialized_wgmma=True),
      _row(D=256, spill_stores=10**5),  # D > 128: spills allowed
      _row(dtype="float32", spill_stores=10**5),
  ])
  assert msgs == [
      "k D=128 bfloat16 sm_90a: 232449 B of shared memory > 232448",
      "k D=256 bfloat16 sm_80: 166913 B of shared memory > 166912",
      "k D=128 bfloat16 sm_90a: 4 B of spill stores > 0",
      "k D=128 bfloat16 sm_80: 1025 B of spill stores > 1024",
      "k D=128 bfloat16 sm_80: ptxas fell back to 32 registers",
      "k D=128 bfloat16 sm_90a: ptxas serialized wgmma",
  ]
