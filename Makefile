# Two entry points (see README): `make train` and `make test`. Each creates or reuses
# the virtual environment in $(VENV) and installs lsm into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lsm-installed

.PHONY: train demo test test-all bench bench-train clean-venv

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "lsm needs Python >= 3.11, found " + sys.version'
	@# A venv left broken (e.g. Python without ensurepip) is rebuilt, not reused.
	$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV) || { echo "python -m venv failed: install your distribution's venv package (e.g. python3-venv)"; exit 1; }; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The main job: a real (small) Gated DeltaNet training run on an embedded corpus
# (lsm's own source and docs; no download), about a minute on 2 cores. Running it
# again resumes from runs/quickstart; delete that folder to start over.
train: $(STAMP)
	$(VENV)/bin/lsm-train --config=configs/lm.py:mixer=gated_delta_net,smoke=True,steps=300 \
	  --workdir=runs/quickstart --config.train.log_every=50

demo: $(STAMP)
	$(PY) experiments/demo_ops.py

# Default suite: everything but tests marked slow; two workers share the 2 cores.
test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -q -m ""

bench: $(STAMP)
	PYTHONPATH=. $(PY) experiments/bench_ops.py

bench-train: $(STAMP)
	PYTHONPATH=. $(PY) experiments/bench_train.py

clean-venv:
	rm -rf $(VENV)
