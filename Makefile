# Quickstart: `make run` (creates .venv, installs pinned deps, runs the default job) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export WANDB_SILENT ?= true

.PHONY: install run test test-slow toy bench tables clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

run: install  ## the default job: TMPO with the GenEval reward on the mini model (a few minutes on CPU)
	$(PY) -m tmpo.run method=tmpo reward=geneval

test: install  ## the default test suite (slow tests excluded)
	$(PY) -m pytest -q

test-slow: install  ## long end-to-end tests only
	$(PY) -m pytest -q -m slow

toy: install  ## toy comparison of every method (paper Fig. 2): results/toy/{summary.csv,fig2.png}
	$(PY) -m experiments.toy_fig2

bench: install  ## speed/memory benchmarks, written to results/bench/
	$(PY) -m experiments.bench

clean:
	rm -rf outputs multirun .pytest_cache
