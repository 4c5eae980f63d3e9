# moeplat developer commands. Everything runs from a local virtual environment in .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# pytest-xdist processes for test/test-fast (0: one process). A test file stays on one process (--dist
# loadfile), so its module fixtures (a sweep, a server) run once; most tests wait on subprocesses and servers.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup lock system-deps demo test test-fast lint format clean bench web

# Installs are locked (requirements/lock.txt, pip-compile --generate-hashes): a fresh clone gets exactly
# the versions and files the suite was last run with. torch comes first, on its own (requirements/cpu.txt:
# the CPU build, pinned); scripts/install-locked.sh installs everything else from the lock, by hash.
$(BIN)/moeplat: pyproject.toml requirements/lock.txt requirements/cpu.txt scripts/install-locked.sh
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps -r requirements/cpu.txt
	PYTHON=$(BIN)/python scripts/install-locked.sh --editable dev,dashboard,hf,eval
	touch $@

# Re-resolve the lock on purpose (newest versions within pyproject.toml's bounds), then `make setup` and
# `make test`, and commit the lock with the result. UPGRADE="-P optuna" upgrades just that package.
PIP_TOOLS := pip-tools==7.6.2 pip==26.3
LOCK_VENV := .venv-lock
lock:
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet $(PIP_TOOLS)
	$(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --all-extras --strip-extras \
		--unsafe-package torch --no-emit-index-url --no-emit-find-links \
		$(if $(UPGRADE),$(UPGRADE),--upgrade) --output-file requirements/lock.txt \
		pyproject.toml requirements/lock.in

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
	$(PYTEST) $(PYTEST_ARGS)

# Everything but the slow end-to-end tests: for the edit-test loop.
test-fast: setup
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

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
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache .ruff_cache runs mlruns mlflow.db
