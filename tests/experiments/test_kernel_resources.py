"""The Pallas Triton kernels fit an A100 and an H100: every kernel of every op,
forward and backward, compiled to cubin without a GPU (experiments/
kernel_resources.py), at head dim 128 in bf16 (64 in a slow test), within the
limits that ``kernel_resources.violations`` states (shared memory per block,
spills, no ptxas fallback to 32 registers; float32 too, without the zero-spill
rule of bf16 on sm_90a); the widest heads (K 256, V 256 and 512, bf16 and
float32) in a slow sweep. Needs PyPI triton (the test extra pins it).

The kernels on packed rows ("+docs", with their document masks) are compiled
too, at D = 128, and must fit the shared memory; they are not held to the spill limits:
the GLA dqkg and the delta rule's two sequential kernels sit at 255 registers
without documents, and the masks push them to 28-100 B of sm_90a spills
(BENCHMARKS.md, "Pallas Triton kernels with document masks"). GLA's kernels
with one gate per head ("+head", ``--gates head``) are held to the same limits
in a slow test."""

import pytest

from experiments import kernel_resources as kr

pytest.importorskip("triton", reason="PyPI triton compiles the kernels to cubin")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
  """D = 128 in bf16: the larger tiles of the default-suite shapes."""
  return kr.measure(dims=(128,), dtypes=("bfloat16",),
                    out=str(tmp_path_factory.mktemp("kernel-resources")))


@pytest.fixture(scope="module")
def small_rows(tmp_path_factory):
  """D = 64 in bf16 (other block sizes than D = 128)."""
  return kr.measure(dims=(64,), dtypes=("bfloat16",),
                    out=str(tmp_path_factory.mktemp("kernel-resources-64")))


@pytest.fixture(scope="module")
def wide_rows(tmp_path_factory):
  """K = V = 256 and K 256 x V 512, bf16 and float32."""
  return kr.measure(dims=(256,), shapes=kr.WIDE, dtypes=("bfloat16", "float32"),
                    out=str(tmp_path_factory.mktemp("kernel-resources-wide")))


@pytest.fixture(scope="module")
def doc_rows(tmp_path_factory):
  """Plain and "+docs" kernels at D = 128 (the larger tiles)."""
  return kr.measure(dims=(128,), dtypes=("bfloat16",), documents=True,
                    out=str(tmp_path_factory.mktemp("kernel-resources-docs")))


def test_every_kernel_was_compiled_for_both_targets(rows):
  kernels = {(r.op, r.kernel, r.K, r.V) for r in rows}
  by_sm = {sm: {(r.op, r.kernel, r.K, r.V) for r in rows if r.sm == sm}
           for sm in ("sm_80", "sm_90a")}
  assert by_sm["sm_80"] == by_sm["sm_90a"] == kernels
  for op in kr.OPS:  # forward and backward kernels of each op
    assert len({k for o, k, *_ in kernels if o == op}) >= 4, op


@pytest.mark.parametrize("op", kr.OPS)
def test_kernels_fit_the_hardware(rows, op):
  assert kr.violations([r for r in rows if r.op == op]) == []


# D = 64 compiles every kernel again (about 40 s of a worker): with -m slow
# since 2026-12-06 (the suite's 20-minute budget); D = 128 stays above.
@pytest.mark.slow
@pytest.mark.parametrize("op", kr.OPS)
def test_kernels_fit_the_hardware_at_head_dim_64(small_rows, op):
  rows = [r for r in small_rows if r.op == op]
  assert {(r.K, r.V) for r in rows} == {(64, 64)}
  assert kr.violations(rows) == []


# Two dtypes, two shapes, two targets: 5-15 minutes of a worker, past the
# suite's 300 s per test, hence slow and its own timeout.
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("op", kr.OPS)
def test_wide_head_kernels_fit_the_hardware(wide_rows, op):
  """K up to 256 and V up to 512, bf16 and float32: shared memory, at most 1
  KiB of spills on either target, never a fallback to 32 registers."""
  rows = [r for r in wide_rows if r.op == op]
  assert {(r.K, r.V) for r in rows} == {(256, 256), (256, 512)}
  assert kr.violations(rows) == []


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


@pytest.fixture(scope="module")
def head_rows(tmp_path_factory):
  """GLA's kernels with one gate per head ([C, 1] gate columns), D 64 and 128."""
  return kr.measure(ops=("gla",), dims=(64, 128), dtypes=("bfloat16",),
                    gates=("head",),
                    out=str(tmp_path_factory.mktemp("kernel-resources-head")))


# About 1-2 minutes of a worker (six more kernels at two shapes, two targets):
# slow, so the default suite's sweep above keeps its time. Run with -m slow
# after any change to the head-gate paths of lsm/ops/gla.
@pytest.mark.slow
def test_head_gate_kernels_fit_the_hardware(head_rows):
  """The same limits (no sm_90a spills at K, V <= 128 in bf16) for GLA's
  head-gate kernels, named "+head"."""
  assert {r.kernel for r in head_rows} == {
      f"gla_{k}+head" for k in ("states", "intra", "output", "dstates", "dv",
                                "dqkg")}
  assert {r.sm for r in head_rows} == {"sm_80", "sm_90a"}
  assert kr.violations(head_rows) == []


def test_gla_gate_forms_lower_with_their_shapes():
  """--gates head lowers GLA with [B, T, H] gates; the delta rule's are per
  head either way."""
  jnp = pytest.importorskip("jax.numpy")
  bf16 = jnp.dtype("bfloat16")
  assert kr._structs("gla", 64, 32, bf16, 128)[3].shape == (1, 128, 2, 64)
  assert kr._structs("gla", 64, 32, bf16, 128, gate="head")[3].shape == (
      1, 128, 2)
  assert kr._structs("delta_rule", 64, 32, bf16, 128, gate="head")[3].shape == (
      1, 128, 2)


def _row(**kw):
  base = dict(op="gla", kernel="k", K=128, V=128, dtype="bfloat16", sm="sm_90a",
              num_warps=4, num_stages=1, regs=200, spill_stores=0, spill_loads=0,
              smem=1000, serialized_wgmma=False)
  return kr.Row(**{**base, **kw})


def test_violations_names_each_limit():
  """The limits themselves, on made-up rows, so the check above can fail."""
  assert kr.violations([
      _row(), _row(sm="sm_80", spill_stores=1024),
      _row(K=256, V=512, spill_stores=1024),  # past 128: 1 KiB on sm_90a too
      _row(dtype="float32", spill_stores=1024),  # float32: 1 KiB at any shape
  ]) == []
  msgs = kr.violations([
      _row(smem=232_449),
      _row(sm="sm_80", smem=166_913, K=256, V=512),  # at any shape
      _row(dtype="float32", smem=232_449),  # and dtype
      _row(spill_stores=4),  # none allowed on sm_90a at K, V <= 128
      _row(V=512, spill_stores=1025),
      _row(sm="sm_80", spill_stores=1025),
      _row(sm="sm_80", K=256, V=512, regs=32, spill_stores=8),
      _row(serialized_wgmma=True),
      _row(dtype="float32", spill_stores=1025),
      _row(dtype="float32", sm="sm_80", regs=32, spill_stores=8),
  ])
  assert msgs == [
      "k K=128 V=128 bfloat16 sm_90a: 232449 B of shared memory > 232448",
      "k K=256 V=512 bfloat16 sm_80: 166913 B of shared memory > 166912",
      "k K=128 V=128 float32 sm_90a: 232449 B of shared memory > 232448",
      "k K=128 V=128 bfloat16 sm_90a: 4 B of spill stores > 0",
      "k K=128 V=512 bfloat16 sm_90a: 1025 B of spill stores > 1024",
      "k K=128 V=128 bfloat16 sm_80: 1025 B of spill stores > 1024",
      "k K=256 V=512 bfloat16 sm_80: ptxas fell back to 32 registers",
      "k K=128 V=128 bfloat16 sm_90a: ptxas serialized wgmma",
      "k K=128 V=128 float32 sm_90a: 1025 B of spill stores > 1024",
      "k K=128 V=128 float32 sm_80: ptxas fell back to 32 registers",
  ]


def test_shapes_of_pairs_square_dims_with_wide_shapes():
  assert kr.shapes_of((64, 128), ((256, 512), (64, 64))) == [
      (64, 64), (128, 128), (256, 512)]
  assert kr._kv("256x512") == (256, 512)
