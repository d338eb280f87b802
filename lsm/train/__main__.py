"""``python -m lsm.train``: the same as ``lsm-train``."""

from lsm.train.main import run

run()
