# Two commands do all set-up on a fresh clone: `make repro` and `make test`.
# Both create .venv (pip, from requirements.lock) when it is missing or out of date.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Stages run `python ...`: put the venv first on PATH so DVC and mlflow find its tools.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: repro test test-all lint format typecheck lock mlflow-ui clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

repro: $(STAMP)  ## run the whole DVC pipeline (fetch, prepare, train)
	$(BIN)/dvc repro

test: $(STAMP)  ## fast tests (not slow, not gpu)
	$(BIN)/pytest

test-all: $(STAMP)  ## every test, slow ones included (gpu tests skip without CUDA)
	$(BIN)/pytest -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check src stages tests
	$(BIN)/ruff format --check src stages tests

format: $(STAMP)
	$(BIN)/ruff format src stages tests
	$(BIN)/ruff check --fix src stages tests

typecheck: $(STAMP)
	$(BIN)/mypy

lock: $(STAMP)  ## re-pin requirements.lock from the current venv
	(head -n 2 requirements.lock; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^dlpipe') > requirements.lock.new
	mv requirements.lock.new requirements.lock

mlflow-ui: $(STAMP)  ## browse runs at http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --port 5000

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
