# Two entry points (see README): `make demo` and `make test`. Each creates or reuses
# the virtual environment in $(VENV) and installs lsm into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lsm-installed

.PHONY: demo test test-all bench clean-venv

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "lsm needs Python >= 3.11, found " + sys.version'
	@# A venv left broken (e.g. Python without ensurepip) is rebuilt, not reused.
	$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV) || { echo "python -m venv failed: install your distribution's venv package (e.g. python3-venv)"; exit 1; }; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) experiments/demo_ops.py

# Default suite: everything but tests marked slow; two workers share the 2 cores.
test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -q -m ""

bench: $(STAMP)
	PYTHONPATH=. $(PY) experiments/bench_ops.py

clean-venv:
	rm -rf $(VENV)
