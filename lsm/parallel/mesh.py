"""The device mesh: four named axes, sized from the config.

Axes, outermost first: ``data`` (pure data parallelism: replicated parameters),
``fsdp`` (data parallelism with parameters and optimiser state sharded over it),
``seq`` (sequence parallelism, LASP-2) and ``tensor`` (heads / MLP width). Tensor
is innermost so its collectives stay on the fastest links (within a host).
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np

AXES = ("data", "fsdp", "seq", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh options (``MeshConfig(**config.mesh)``).

  Attributes:
    shape: size of each axis in AXES; one axis may be -1 to take the remaining
      devices. Missing axes are 1.
    rules: logical-axis rules as (logical name, mesh axis or None) pairs; None for
      ``lsm.parallel.rules.DEFAULT_RULES``.
  """
  shape: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {"data": -1}, hash=False)
  rules: Sequence[Sequence] | None = dataclasses.field(default=None, hash=False)

  def __post_init__(self):
    unknown = sorted(set(self.shape) - set(AXES))
    if unknown:
      raise ValueError(f"mesh.shape has unknown axes {unknown}; expected names "
                       f"from {list(AXES)}")
    for name, size in self.shape.items():
      if not isinstance(size, int) or (size < 1 and size != -1):
        raise ValueError(f"mesh.shape.{name}={size!r}; expected a positive int "
                         "or -1 (fill with the remaining devices)")
    if sum(size == -1 for size in self.shape.values()) > 1:
      raise ValueError(f"mesh.shape={dict(self.shape)}: at most one axis may be -1")


def resolve_shape(shape: Mapping[str, int], n_devices: int) -> dict[str, int]:
  """Axis sizes with -1 filled in; the product must equal ``n_devices``."""
  sizes = {name: int(shape.get(name, 1)) for name in AXES}
  fixed = math.prod(s for s in sizes.values() if s != -1)
  fill = [name for name, s in sizes.items() if s == -1]
  if fill:
    if n_devices % fixed:
      raise ValueError(f"mesh.shape={dict(shape)}: the fixed axes use {fixed} "
                       f"devices, which does not divide the {n_devices} devices")
    sizes[fill[0]] = n_devices // fixed
  elif fixed != n_devices:
    raise ValueError(f"mesh.shape={dict(shape)} needs {fixed} devices; "
                     f"{n_devices} are available (set one axis to -1 to fill)")
  return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A mesh over ``devices`` (default: all) with AXES in order.

  Axis types are Auto: the trainer gives explicit shardings for parameters and
  batches and lets XLA propagate the rest.
  """
  devices = list(jax.devices() if devices is None else devices)
  try:
    sizes = resolve_shape(cfg.shape, len(devices))
  except ValueError as e:
    if jax.process_count() == 1:
      raise
    raise ValueError(f"{e} ({jax.process_count()} processes with "
                     f"{jax.local_device_count()} devices each on this one: the "
                     "mesh must use every device of every process)") from None
  dims = tuple(sizes[name] for name in AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(dims, AXES, axis_types=auto, devices=devices)
  # A subset of the devices (tests, restores onto fewer devices): keep their order.
  return jax.sharding.Mesh(np.asarray(devices).reshape(dims), AXES,
                           axis_types=auto)
