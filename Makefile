# moeplat developer commands. Everything runs from a local virtual environment in .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test test-fast lint format clean bench

$(BIN)/moeplat: pyproject.toml requirements/cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first (pinned), so that resolving the project does not pull CUDA wheels.
	$(BIN)/pip install --quiet -r requirements/cpu.txt
	$(BIN)/pip install --quiet -e '.[dev,dashboard]'
	touch $@

setup: $(BIN)/moeplat

# System packages beyond the venv: PostgreSQL (tests/postgres.py) and Chromium (tests/browser.py).
# Installs with apt-get when missing (as root); .ci/run calls it. Not a dependency of `test`.
system-deps:
	scripts/system-deps.sh

# Train the quick-start spec on the built-in corpus and log it to the local MLflow store (./mlflow.db).
demo: setup
	$(BIN)/moeplat validate specs/quickstart.yaml
	$(BIN)/moeplat plan specs/quickstart.yaml
	$(BIN)/moeplat run specs/quickstart.yaml

# The whole suite, slow end-to-end tests included (what CI runs).
test: setup
	$(BIN)/pytest -q $(PYTEST_ARGS)

# Everything but the slow end-to-end tests: for the edit-test loop.
test-fast: setup
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

# MoE layer speed and memory vs dense and transformers, step overhead, validate time (see README).
bench: setup
	$(BIN)/moeplat bench $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check moeplat tests
	$(BIN)/ruff format --check moeplat tests

format: setup
	$(BIN)/ruff format moeplat tests
	$(BIN)/ruff check --fix moeplat tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs mlruns mlflow.db
