"""Notebooks run top to bottom (at their SMOKE size), so they cannot rot: each
code cell of notebooks/*.ipynb is executed in order in one namespace."""

import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


# state_tracking.ipynb trains for about 2 minutes of a worker: slow (-m slow),
# kept out of the default suite's budget; the other notebooks stay in it.
@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.slow) if p.name == "state_tracking.ipynb"
    else p for p in NOTEBOOKS], ids=lambda p: p.name)
def test_notebook_runs_at_smoke_size(path, monkeypatch):
  cells = [c for c in json.loads(path.read_text())["cells"]
           if c["cell_type"] == "code"]
  source = ["".join(c["source"]) for c in cells]
  assert "SMOKE = False" in source[0], "first code cell must define SMOKE"
  source[0] = source[0].replace("SMOKE = False", "SMOKE = True", 1)
  monkeypatch.chdir(ROOT)
  namespace = {"__name__": "__notebook__"}
  for i, code in enumerate(source):
    exec(compile(code, f"{path.name}[cell {i}]", "exec"), namespace)  # noqa: S102
  import matplotlib.pyplot as plt  # the notebook drew its figures
  assert plt.get_fignums()
  plt.close("all")
