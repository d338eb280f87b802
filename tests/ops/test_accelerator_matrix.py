"""Every preset op call on every accelerator, on CPU: what ``impl="auto"``
picks and that it lowers there.

The matrix (experiments/gpu_acceptance.py, ``build_matrix``): every mixer of
``lsm.layers.MIXERS`` x every size preset of ``configs.common.SIZES`` x
{float32, bfloat16} compute x {h100, a100, tpu, cpu}. Each (mixer, size, dtype)
is a one-layer model of the preset (``configs.common.lm_run``, so the heads are
the presets' own), traced abstractly (B=1, T=2 chunks) with packed documents as
the trainer feeds text and once more without; every op call it makes is
resolved for each target as the op resolves it there (``_dispatch.resolve``
under ``assume_platform``). The default suite asserts:

- every case resolves (an op call nobody takes raises), on CPU to "chunked",
  and the impl picked accepts the call when named explicitly;
- where "auto" passes over a platform's preferred kernel, the limit it hit is
  a dtype or a head dim (never a chunk size, gate kind or documents: presets
  and kernels agree on those); on the H100, float32 calls and head dims over
  Mosaic GPU's limit go to Triton;
- the calls that fall to "chunked" on the accelerators are exactly
  ``CHUNKED_ON_ACCELERATORS`` (ops without kernels, and Based's 273-wide
  Taylor features);
- lowering, forward and backward through the op's public function: per
  (op, impl, target), the distinct call (with documents) with the largest
  arrays, for CUDA on an abstract H100 / A100, TPU export and CPU;
  the Pallas impls' kernels must be in the module, chunked's must not;
- one whole-model train step (gla + gated_delta_net layers, the 20m preset,
  "auto" compute dtype) per target, whose op calls resolve inside the model as
  the matrix says.

``-m slow`` lowers every distinct call (with and without documents) for its
target. ``test_bf16_compute_feeds_the_kernels_bf16`` caught nnx.Embed
promoting the bf16 table back to float32 (every op call float32 under bf16
compute; fixed in lsm/models/lm.py, 2026-12). The report of the matrix (table of impls,
fallbacks with their reasons) is in every failure message, and in matrix.txt
of ``bash experiments/gpu_acceptance.sh --dry-run``.
"""

import re

import jax.numpy as jnp
import pytest

from configs import common
from experiments import gpu_acceptance as ga
from lsm import layers
from lsm.ops import _dispatch

ACCELERATORS = ("h100", "a100", "tpu")
# (mixer, op) -> why every call of it runs "chunked" on every accelerator.
CHUNKED_ON_ACCELERATORS = {
    ("lssl", "ssm_scan"): "ssm_scan has no Pallas kernel",
    ("s4d", "ssm_scan"): "ssm_scan has no Pallas kernel",
    ("mamba", "selective_scan"): "selective_scan has no Pallas kernel",
    ("based", "gla"): "Taylor features: K = 1 + 16 + 16 * 17 / 2 = 273, over the "
                      "kernels' 256",
    ("delta_product", "dplr"): "dplr has no Pallas kernel",
    ("kda", "dplr"): "dplr has no Pallas kernel",
    ("gdn2", "dplr"): "dplr has no Pallas kernel",
    ("rwkv7", "dplr"): "dplr has no Pallas kernel",
}
# The limits "auto" may find in a preferred kernel: input dtype (Mosaic GPU
# takes 16-bit inputs) and head dims.
ALLOWED_REFUSALS = (r"takes [a-z0-9 ]+ inputs; got float32",
                    r"supports [KV] up to \d+; got [KV] ")
KERNEL_OPS = ("gla", "delta_rule")


@pytest.fixture(scope="module")
def matrix():
  return ga.build_matrix()


def _report(m) -> str:
  return (f"\n{m.summary()}\n{m.table()}\nfallbacks:\n" + "\n".join(m.fallbacks()))


def test_every_case_resolves(matrix):
  assert matrix.n_cases == len(layers.MIXERS) * len(common.SIZES) * 2 * 4
  with_calls = {(e.mixer, e.size, e.dtype) for e in matrix.entries}
  for mixer in layers.MIXERS:
    for size in common.SIZES:
      for dtype in ga.DTYPES:
        # softmax attention is the one mixer that calls no lsm op
        assert ((mixer, size, dtype) in with_calls) == (mixer != "attention"), (
            mixer, size, dtype)
  for e in matrix.entries:
    op, call = e.call.op, e.call.call
    ga._apis()[op]._ACCEPTS[e.choice.impl].check(op, e.choice.impl, call)
    assert e.choice.impl != "reference"
    if e.target == "cpu":
      assert e.choice.impl == "chunked", e
    else:
      plat, family = ga.TARGETS[e.target]
      assert e.choice.impl == "chunked" or e.choice.impl in _dispatch.preference(
          plat, family), e


def test_kernels_are_passed_over_only_for_dtype_or_head_dim(matrix):
  bad = [e for e in matrix.entries for _, why in e.choice.skipped
         if not any(re.search(p, why) for p in ALLOWED_REFUSALS)]
  assert not bad, f"{bad[:3]}{_report(matrix)}"
  for e in matrix.entries:
    call = e.call.call
    if e.target != "h100" or e.call.op not in KERNEL_OPS:
      continue
    # Mosaic GPU takes bf16 / f16 with K <= 128 and V <= 512 (V in blocks of
    # 128); the rest that a kernel takes goes to Triton (issue 28, item 3).
    fits = (_dispatch.padded_pow2(call.K) <= 128
            and _dispatch.padded_pow2(call.V) <= 512)
    if e.choice.impl != "chunked" and (call.dtype == "float32" or not fits):
      assert e.choice.impl == "pallas_triton", e
    if call.dtype != "float32" and fits:
      assert e.choice.impl == "pallas_mosaic_gpu", e


def test_chunked_fallbacks_are_the_expected_ones(matrix):
  chunked = {(e.mixer, e.call.op) for e in matrix.entries
             if e.target in ACCELERATORS and e.choice.impl == "chunked"}
  assert chunked == set(CHUNKED_ON_ACCELERATORS), _report(matrix)
  for e in matrix.entries:  # all of their calls, every size, dtype, target
    if (e.mixer, e.call.op) in CHUNKED_ON_ACCELERATORS:
      assert e.choice.impl == "chunked", e


def test_bf16_compute_feeds_the_kernels_bf16(matrix):
  """With bf16 compute, gla and delta_rule get bf16 inputs (the SSM ops run
  float32 by design), and on an H100 some preset of each runs Mosaic GPU."""
  for e in matrix.entries:
    if e.dtype == "bfloat16" and e.call.op in KERNEL_OPS:
      assert e.call.call.dtype == "bfloat16", (e.mixer, e.size, e.call.signature)
  for op in KERNEL_OPS:
    assert any(e.choice.impl == "pallas_mosaic_gpu" for e in matrix.entries
               if e.call.op == op and e.target == "h100"), _report(matrix)


def _size(entry) -> int:
  _, arrays = entry.call.arrays()
  return sum(int(jnp.prod(jnp.array(a.shape))) for a in arrays)


def _check_lowering(entry, target):
  impl = entry.choice.impl
  text = ga.lower_call(entry.call, impl, target)
  for name, mark in ga.KERNEL_MARKS.items():
    assert (mark in text) == (name == impl), (name, impl, entry.call.signature)


def _largest(matrix, target):
  """Per (op, impl): the distinct call with documents with the largest
  arrays."""
  groups = {}
  for (op, impl, t, _), e in matrix.distinct(documents=True).items():
    if t == target:
      groups.setdefault((op, impl), []).append(e)
  picked = []
  for _, entries in sorted(groups.items()):
    picked.append(max(entries, key=_size))
  return picked


@pytest.mark.parametrize("target", list(ga.TARGETS))
def test_largest_calls_lower_forward_and_backward(matrix, target):
  picked = _largest(matrix, target)
  impls = {e.choice.impl for e in picked}
  assert "chunked" in impls
  if target != "cpu":
    assert impls & set(ga.KERNEL_MARKS), impls
  for e in picked:
    _check_lowering(e, target)


@pytest.mark.parametrize("target", list(ga.TARGETS))
def test_model_train_step_lowers(target):
  text, calls, dtype = ga.lower_train_step(target)
  assert dtype == ("float32" if target == "cpu" else "bfloat16")
  assert [c.op for c, _ in calls] == ["gla", "delta_rule"]
  for call, impl in calls:
    assert impl == ga.choose(call.op, call.call, target).impl
    if impl in ga.KERNEL_MARKS:
      assert ga.KERNEL_MARKS[impl] in text, impl
  if target != "cpu":
    assert any(impl in ga.KERNEL_MARKS for _, impl in calls)


@pytest.mark.slow
@pytest.mark.parametrize("documents", [True, False], ids=["docs", "nodocs"])
@pytest.mark.parametrize("target", list(ga.TARGETS))
def test_every_distinct_call_lowers(matrix, target, documents):
  """About 1 s a call (7.5 minutes for the 408 calls of 2026-12-06)."""
  for (_, _, t, _), e in matrix.distinct(documents=documents).items():
    if t == target:
      _check_lowering(e, target)
