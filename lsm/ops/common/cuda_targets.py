"""Lowering the ops for an NVIDIA GPU that this machine does not have.

From jax 0.11 the Pallas Triton lowering reads the target GPU from the device
(``jax._src.pallas.triton.gpu_info``), so on a CPU-only machine it needs an
abstract GPU: an ``AbstractMesh`` with an ``AbstractDevice`` of the wanted kind,
installed with ``jax.sharding.use_abstract_mesh`` around ``.lower``. The kind
string picks the compute capability ("NVIDIA A100" -> sm_80, "NVIDIA H100" ->
sm_90). The mesh axis is ``AxisType.Auto``: with ``Explicit`` the ops' own
reshapes fail a sharding check. jax 0.10 needs none of this and always assumes
sm_90 (``TARGETS`` then only names the kind; the lowering is the same).

jax is imported inside the functions, so ``TARGETS`` can be read by a process
that must not load jaxlib's MLIR (experiments/kernel_resources.py compiles with
PyPI triton's).
"""

import contextlib
import dataclasses


@dataclasses.dataclass(frozen=True)
class Target:
  device_kind: str  # as jax.Device.device_kind reports it
  num_cores: int  # streaming multiprocessors
  sm: int  # compute capability, e.g. 80
  smem_per_block: int  # opt-in dynamic shared memory per block, bytes


# Shared memory per block: CUDA programming guide, compute capability tables.
TARGETS = {
    "a100": Target("NVIDIA A100-SXM4-80GB", 108, 80, 166_912),
    "h100": Target("NVIDIA H100 80GB HBM3", 132, 90, 232_448),
}


def abstract_gpu(target: str | Target):
  """Context manager: lowerings inside it target ``target`` (a ``TARGETS`` key
  or a ``Target``). A no-op on jax versions without abstract devices."""
  import jax  # pylint: disable=g-import-not-at-top
  t = TARGETS[target] if isinstance(target, str) else target
  sh = jax.sharding
  if not hasattr(sh, "AbstractDevice"):
    return contextlib.nullcontext()
  device = sh.AbstractDevice(device_kind=t.device_kind, num_cores=t.num_cores,
                             platform="gpu")
  mesh = sh.AbstractMesh((1,), ("x",), (sh.AxisType.Auto,),
                         abstract_device=device)
  return sh.use_abstract_mesh(mesh)


def lower_for_cuda(fn, *args, target: str | Target = "h100"):
  """``jax.jit(fn)`` lowered for CUDA at ``target`` on abstract ``args``
  (``jax.ShapeDtypeStruct``s); returns the ``Lowered`` object."""
  import jax  # pylint: disable=g-import-not-at-top
  with abstract_gpu(target):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
