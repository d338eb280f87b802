"""Comparison of a fast op against its float32 reference: outputs, final state and
the gradient of every input, through ``jax.vjp`` with random cotangents on both
outputs. Shared by the per-op test files."""

import functools
import re

import jax
import jax.numpy as jnp

from tests import numerics


@functools.cache
def vjp_runner(op, impl: str, chunk_size: int, names: tuple[str, ...],
               interpret=False):
  """A jitted fn(primals, cotangents) -> (o, h_T, grads) for ``op`` with ``impl``.

  ``op`` is called with every primal by keyword (``q=..., k=..., h0=...``), and
  with ``interpret`` when it is set (Pallas impls on CPU). Cached per argument
  tuple so tests that share shapes share compiles.
  """
  extra = {"interpret": interpret} if interpret is not False else {}

  def run(primals, cotangents):
    def f(*xs):
      return op(**dict(zip(names, xs)), impl=impl, chunk_size=chunk_size, **extra)

    (o, h_t), pullback = jax.vjp(f, *primals)
    return o, h_t, pullback(cotangents)

  return jax.jit(run)


def cotangents(key, o_shape, o_dtype, h_shape):
  k1, k2 = jax.random.split(key)
  return (jax.random.normal(k1, o_shape, jnp.float32).astype(o_dtype),
          jax.random.normal(k2, h_shape, jnp.float32))


def run_against_reference(op, impl: str, chunk_size: int, primals: dict, key,
                          *, interpret=False):
  """Runs ``op`` with ``impl`` on ``primals`` (which may be low precision) and the
  reference on the same values upcast to float32, with the same cotangents.
  ``interpret`` goes to the fast impl only (Pallas interpret mode).

  Returns (names, got, want): the output names (``o``, ``h_t``, then ``d`` and
  each primal's name) and the two matching tuples of outputs."""
  names = tuple(primals)
  xs = tuple(primals.values())
  f32 = tuple(x.astype(jnp.float32) for x in xs)
  o_ref_shape = jax.eval_shape(
      lambda *a: op(**dict(zip(names, a)), impl="reference"), *f32)
  dt = cotangents(key, o_ref_shape[0].shape, xs[0].dtype, o_ref_shape[1].shape)
  dt_f32 = tuple(x.astype(jnp.float32) for x in dt)
  o, h_t, grads = vjp_runner(op, impl, chunk_size, names, interpret)(xs, dt)
  o_e, h_e, grads_e = vjp_runner(op, "reference", chunk_size, names)(f32, dt_f32)
  assert o.dtype == xs[0].dtype, f"output dtype {o.dtype} != input {xs[0].dtype}"
  assert h_t.dtype == jnp.float32, f"final state dtype {h_t.dtype}"
  for g, x, n in zip(grads, xs, names):
    assert g.dtype == x.dtype, f"d{n} dtype {g.dtype} != {x.dtype}"
  return (("o", "h_t", *(f"d{n}" for n in names)), (o, h_t, *grads),
          (o_e, h_e, *grads_e))


def check_against_reference(op, impl: str, chunk_size: int, primals: dict, key,
                            *, interpret=False) -> None:
  """``run_against_reference``, then each output compared with its own row of
  tests/numerics.py for (impl, the input dtype of the first primal, output)."""
  names, got, want = run_against_reference(op, impl, chunk_size, primals, key,
                                           interpret=interpret)
  dtype = next(iter(primals.values())).dtype
  numerics.assert_outputs_close(got, want, impl=impl, dtype=dtype, names=names)


def mosaic_gpu_kernels(lowered):
  """(kernel name, dynamic SMEM bytes) of every Mosaic GPU custom call in a
  lowering (``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``):
  the kernel module is MLIR bytecode in the call's
  ``mhlo.backend_config["module"]``, its symbol ``<kernel_name>_mosaic_gpu``,
  and the SMEM size the last operand of its ``gpu.launch``. The parsing context
  registers the Mosaic GPU dialect: without it a kernel module failed to parse
  ("invalid memref element type") once the interpreter or another lowering
  had run in the process (jax 0.11.2)."""
  # pylint: disable=g-import-not-at-top
  from jax._src.interpreters import mlir
  from jax._src.lib import mosaic_gpu_dialect
  from jax._src.lib.mlir import ir
  # pylint: enable=g-import-not-at-top
  modules = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for o in block.operations:
          if (o.operation.name == "stablehlo.custom_call" and
              ir.StringAttr(o.attributes["call_target_name"]).value
              == "mosaic_gpu_v2"):
            config = ir.DictAttr(o.attributes["mhlo.backend_config"])
            modules.append(ir.StringAttr(config["module"]).value_bytes)
          walk(o.operation)

  walk(lowered.compiler_ir("stablehlo").operation)
  out = []
  with mlir.make_ir_context() as ctx:
    ctx.allow_unregistered_dialects = True
    mosaic_gpu_dialect.register_dialect(ctx)
    for data in modules:
      text = str(ir.Module.parse(data))
      name = re.search(r'sym_name = "(\w+)_mosaic_gpu"', text).group(1)
      launch = re.search(r'gpu\.launch"\(([^)]*)\)', text).group(1)
      size = launch.split(", ")[-1]
      size = re.search(re.escape(size) + r' = "[\w.]*arith\.constant"\(\) '
                       r'\{value = (\d+)', text).group(1)
      out.append((name, int(size)))
  return out


# The input limits that lsm.ops.common.mosaic_gpu.check_inputs states, shared
# by the GLA and delta-rule Mosaic GPU impls: (change to valid inputs, the
# message after "<op>: impl='pallas_mosaic_gpu' ").
MOSAIC_GPU_BAD_INPUTS = [
    (dict(dtype=jnp.float32), r"takes bfloat16 or float16 inputs; got float32"),
    (dict(K=160), r"supports K up to 128; got K \(key/query head dim\) "
                  r"= 160"),
    (dict(V=600), r"supports V up to 512; got V \(value head dim\) "
                  r"= 600"),
    (dict(chunk_size=32), r"needs chunk_size=64; got chunk_size=32"),
]


def mosaic_gpu_bad_inputs(make_inputs, change: dict) -> dict:
  """``make_inputs(seed, B, T, H, K, V, dtype=)`` at valid Mosaic GPU sizes
  with ``change`` (a MOSAIC_GPU_BAD_INPUTS entry's dims and dtype) applied."""
  dims = dict(B=1, T=8, H=1, K=64, V=64) | {
      n: change[n] for n in ("K", "V") if n in change}
  return make_inputs(0, *dims.values(), dtype=change.get("dtype", jnp.bfloat16))
