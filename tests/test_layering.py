"""The one-way import rule of docs/style.md, checked with ``ast`` over lsm/."""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LSM = ROOT / "lsm"

# package -> the lsm packages it may import (itself always allowed).
ALLOWED = {
    "ops": set(),
    "parallel": {"ops"},
    "layers": {"ops", "parallel"},
    "models": {"layers", "parallel"},
    "data": set(),
    "tasks": {"data"},
    "train": {"ops", "parallel", "layers", "models", "data", "tasks"},
    # After training (lsm-eval, lsm-generate, lsm-plot, the lm-eval adapter):
    # reopens runs through lsm.train; train never imports it.
    "eval": {"ops", "parallel", "layers", "models", "data", "tasks", "train"},
}
# Top-level folders that are never imported by lsm.
OUTSIDE = {"configs", "experiments", "launch", "notebooks", "tests"}
# Pure array functions: no Flax, no configs, no training or data stack.
OPS_FORBIDDEN = {"flax", "ml_collections", "optax", "orbax", "tensorflow_datasets",
                 "grain", "tensorflow", "torch"}


def _package(path: pathlib.Path) -> str:
  """lsm/ops/gla/api.py -> "ops"; lsm/__init__.py -> ""."""
  rel = path.relative_to(LSM)
  if rel.parts == ("__init__.py",):
    return ""
  return rel.parts[0].removesuffix(".py")


def _imports(path: pathlib.Path):
  """Absolute module names imported by ``path`` (relative imports resolved)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        # module ends in ".__init__" for packages, so one level up is the package.
        base = module.split(".")[:-node.level]
        name = ".".join(base + ([node.module] if node.module else []))
      else:
        name = node.module
      yield node.lineno, name
      # ``from lsm import layers`` imports lsm.layers: check the full names too.
      for alias in node.names:
        yield node.lineno, f"{name}.{alias.name}"


def _modules():
  return sorted(p for p in LSM.rglob("*.py"))


def test_every_lsm_package_is_in_the_table():
  packages = {_package(p) for p in _modules()} - {""}
  assert packages <= set(ALLOWED), packages - set(ALLOWED)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path):
  pkg = _package(path)
  bad = []
  for lineno, name in _imports(path):
    top, *rest = name.split(".")
    if top in OUTSIDE:
      bad.append(f"line {lineno}: {name} (lsm never imports {top}/)")
    if top == "lsm" and rest and pkg:
      target = rest[0]
      if target != pkg and target not in ALLOWED[pkg]:
        bad.append(f"line {lineno}: {name} ({pkg} may import only "
                   f"{sorted(ALLOWED[pkg]) or 'nothing'} from lsm)")
    if pkg == "ops" and top in OPS_FORBIDDEN:
      bad.append(f"line {lineno}: {name} (ops are pure array functions)")
  assert not bad, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(bad)


def test_ops_init_stays_empty():
  """Re-exporting from lsm/ops/__init__.py would rebind lsm.ops.gla (docs/style.md §5)."""
  assert (LSM / "ops" / "__init__.py").read_text().strip() == ""


def test_checker_catches_a_violation(tmp_path, monkeypatch):
  """The rule above could fail: a planted ops -> layers import is reported."""
  fake = tmp_path / "lsm"
  (fake / "ops").mkdir(parents=True)
  bad = fake / "ops" / "bad.py"
  bad.write_text("from lsm import layers\nimport flax\n")
  monkeypatch.setattr(sys.modules[__name__], "LSM", fake)
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  with pytest.raises(AssertionError, match="ops may import only"):
    test_imports_point_one_way(bad)
