"""lsm: a JAX/Flax framework for training linear sequence models.

Layers of the package (imports point one way; tests/test_layering.py checks it):
ops -> parallel -> layers -> models, with data, tasks and train beside them.
Import ops from their subpackage, e.g. ``from lsm.ops.gla import gla``.
"""

__version__ = "0.1.0"
