# Two entry points (see README): `make train` and `make test`. Each creates or reuses
# the virtual environment in $(VENV) and installs lsm into it.
#
# lsm is pinned to the platform of the GPU machines: Python >= 3.12 with jax 0.11.2
# (constraints.txt). PYTHON, when given, is used as it is; otherwise the first of
# python3.12, a pyenv-installed 3.12 (pyenv's bare shim refuses without
# PYENV_VERSION), python3 and python3.13 that runs and is >= 3.12.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lsm-installed
NEEDS_312 := -c 'import sys; sys.exit(sys.version_info < (3, 12))'
PYENV_312 := $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.12.*/bin/python3.12)))
ifndef PYTHON
PYTHON := $(firstword $(foreach p,python3.12 $(PYENV_312) python3 python3.13,\
  $(shell $(p) $(NEEDS_312) >/dev/null 2>&1 && echo $(p))))
endif

.PHONY: train demo test test-all test-latest bench bench-train clean-venv

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "lsm needs Python >= 3.12 (jax 0.11+); none found as python3.12, python3 or python3.13 (or under ~/.pyenv/versions/3.12.*). Install one, or pass PYTHON=/path/to/python3.12"; exit 1; }
	@$(PYTHON) $(NEEDS_312) || { echo "lsm needs Python >= 3.12 (jax 0.11+); PYTHON=$(PYTHON) is $$($(PYTHON) -V 2>&1)"; exit 1; }
	@# A venv left broken (e.g. Python without ensurepip) or made by an older Python
	@# is rebuilt, not reused.
	$(PY) $(NEEDS_312) >/dev/null 2>&1 && $(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV) || { echo "python -m venv failed: install your distribution's venv package (e.g. python3.12-venv)"; exit 1; }; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The main job: a real (small) Gated DeltaNet training run on an embedded corpus
# (lsm's own source and docs; no download), about a minute on 2 cores. It ends
# with a summary (losses, tokens/s, where the files are, the lsm-eval /
# lsm-generate / lsm-plot commands for the run) and a 200-byte sample. Running
# it again resumes from runs/quickstart; delete that folder to start over.
train: $(STAMP)
	$(VENV)/bin/lsm-train --config=configs/lm.py:mixer=gated_delta_net,smoke=True,steps=300 \
	  --workdir=runs/quickstart --config.train.log_every=50 --sample_tokens=200

demo: $(STAMP)
	$(PY) experiments/demo_ops.py

# Default suite: everything but tests marked slow; two workers share the 2 cores.
test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -q -m ""

# The default suite against the newest releases of everything (no constraints), in
# a venv of its own; BENCHMARKS.md ("Platforms") records which versions passed.
LATEST_VENV ?= .venv-latest
test-latest:
	@test -n "$(PYTHON)" || { echo "lsm needs Python >= 3.12; pass PYTHON=/path/to/python3.12"; exit 1; }
	$(LATEST_VENV)/bin/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]"
	$(LATEST_VENV)/bin/python -m pip list 2>/dev/null | grep -E "^(jax|jaxlib|flax|optax|orbax-checkpoint|grain|triton) "
	$(LATEST_VENV)/bin/python -m pytest -n 2 -q

bench: $(STAMP)
	PYTHONPATH=. $(PY) experiments/bench_ops.py

bench-train: $(STAMP)
	PYTHONPATH=. $(PY) experiments/bench_train.py

clean-venv:
	rm -rf $(VENV) $(LATEST_VENV)
