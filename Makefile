# Quickstart: `make run` (creates .venv, installs pinned deps, runs the default job) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export WANDB_SILENT ?= true

.PHONY: install run test test-slow toy science science-mini pretrain-mini bench tables suite clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

run: install  ## the quick default job (conf/scale/mini_quickstart.yaml): TMPO, PickScore reward, mini model, 60 iterations (minutes on a CPU)
	$(PY) -m tmpo.run scale=mini_quickstart

test: install  ## the default test suite (slow tests excluded)
	$(PY) -m pytest -q

test-slow: install  ## long end-to-end tests only
	$(PY) -m pytest -q -m slow

toy: install  ## toy comparison of every method (paper Fig. 2): results/toy/{summary.csv,fig2.png}
	$(PY) -m experiments.toy_fig2

science: install  ## the science issue's toy experiments (5 seeds per cell): results/science/
	$(PY) -m experiments.science

science-mini: install  ## the same questions on the mini scale (GenEval reward): results/science/mini_*
	$(PY) -m experiments.science_mini

ARCH ?= dit
MINUTES ?= 110
pretrain-mini: install  ## (re)train a mini base model; resumable: make pretrain-mini ARCH=mmdit MINUTES=90
	$(PY) -m tmpo.policies.mini_pretrain --arch $(ARCH) --minutes $(MINUTES)

bench: install  ## every method vs the lower bound of its network evaluations, toy/mini/tiny FLUX, 1 thread (~12 min): results/bench/
	$(PY) -m experiments.bench

SCALE ?= mini
SOURCE ?= local
WANDB ?=
# The committed mini suite ran over several sessions from three commits that compute the same runs
# (results/mini/README.md): its tables list each row's commit. Paper-scale tables stay strict.
ifeq ($(SCALE),mini)
TABLES_FLAGS ?= --allow-mixed-commits
endif
TABLES_FLAGS ?=
tables: install  ## the paper's Tables 1, 2, 5, 6 and Figs. 4, 6 from run summaries: results/$(SCALE)/ (SOURCE=wandb WANDB=<entity>/<project>)
	$(PY) -m tmpo.results --scale $(SCALE) --source $(SOURCE) $(if $(WANDB),--wandb $(WANDB)) $(TABLES_FLAGS)

BLOCKS ?= mini
LANES ?= 2
UNTIL ?=
suite: install  ## run/resume table blocks (BLOCKS=mini | "mini/table1_geneval ..."; UNTIL=HH:MM: only jobs that end by then), record finished runs in results/<scale>/records
	$(PY) -m experiments.run_suite run $(BLOCKS) --lanes $(LANES) $(if $(UNTIL),--until $(UNTIL))

clean:
	rm -rf outputs multirun .pytest_cache
