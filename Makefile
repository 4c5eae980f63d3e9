# moeplat developer commands. Everything runs from a local virtual environment in .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test test-fast lint format clean bench web

$(BIN)/moeplat: pyproject.toml requirements/cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first (pinned), so that resolving the project does not pull CUDA wheels.
	$(BIN)/pip install --quiet -r requirements/cpu.txt
	$(BIN)/pip install --quiet -e '.[dev,dashboard]'
	touch $@

setup: $(BIN)/moeplat web

# The web UI (web/, docs/web-ui.md), built into web/dist and served by `moeplat serve` at /: npm ci when
# web/package-lock.json changed, then an esbuild bundle (about a second). Without npm it only warns, and the
# server shows its "run make setup" page instead of the UI.
WEB_SRC := $(filter-out web/src/examples.gen.json,$(wildcard web/src/*)) web/build.mjs web/package.json
web:
	@if command -v npm >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory web/dist/index.html; \
	else \
		echo "warning: npm not found: the web UI (web/dist) is not built; install Node.js 20 and run 'make web'"; \
	fi

web/node_modules/.installed: web/package-lock.json
	cd web && npm ci --no-audit --no-fund
	touch $@

web/dist/index.html: web/node_modules/.installed $(WEB_SRC)
	cd web && npm run --silent build

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
