"""Logical-axis rules: which mesh axis each logical name (lsm.parallel.axes) maps
to, and the partition specs they give parameter trees and batches.

Defaults (MaxText-style): batch over (data, fsdp); parameters' embed dimension
over fsdp (ZeRO-3 style: each fsdp shard holds a slice of every matrix); heads,
MLP width and vocabulary over tensor; sequence over seq; recurrent state dims
unsharded.
"""

from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from lsm.parallel import axes

DEFAULT_RULES = (
    (axes.BATCH, ("data", "fsdp")),
    (axes.SEQ, "seq"),
    (axes.EMBED, "fsdp"),
    (axes.HEADS, "tensor"),
    (axes.MLP, "tensor"),
    (axes.VOCAB, "tensor"),
    (axes.STATE_K, None),
    (axes.STATE_V, None),
)


def normalize_rules(rules: Sequence[Sequence] | None) -> tuple:
  """Rules as a tuple of (name, mesh axes) pairs; None gives DEFAULT_RULES."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"mesh.rules entry {rule!r}; expected a (logical name, "
                       "mesh axis or None) pair")
    name, target = rule
    out.append((name, tuple(target) if isinstance(target, list) else target))
  return tuple(out)


def param_specs(params: nnx.State, rules) -> dict:
  """Mesh PartitionSpecs for an nnx parameter State, as a pure dict tree.

  Every logical name a parameter carries must have a rule: an unmapped name would
  otherwise be read as a mesh axis name and fail far from its cause.
  """
  known = {name for name, _ in rules}
  for path, var in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = var.get_metadata().get("out_sharding") or ()
    missing = [n for n in names if n is not None and n not in known]
    if missing:
      where = jax.tree_util.keystr(path)
      raise ValueError(f"parameter {where} has logical axes {missing} with no "
                       f"rule; known names: {sorted(known)}")
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(params)
  return nnx.to_pure_dict(specs)


def batch_spec(rules) -> P:
  """Spec of [B, T] batch arrays: batch and sequence axes per the rules."""
  table = dict(rules)
  return P(table.get(axes.BATCH), table.get(axes.SEQ))
