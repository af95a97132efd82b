# Every target runs from the repository root; state lives in .mlops/ (MLOPS_HOME) unless the environment says otherwise.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
UV_VERSION := 0.13.8
# The platform's certificate store, as pip and git use: uv's own bundle misses CAs that a machine adds locally.
UV := $(BIN)/uv --system-certs
LOCAL_ENV = eval "$$($(BIN)/mlops env)" && PATH="$(BIN):$$PATH"

.PHONY: setup browser run test test-fast screenshots lint format bench airflow-ui mlflow-ui serve status lock clean

setup: $(VENV)/.installed

# Bytecode is compiled at install, the ml package's included: where PYTHONDONTWRITEBYTECODE is set, as on many CI
# machines and images, Python would otherwise recompile every module on every import (`import mlflow`: 3.2 s against
# 1.3 s on the development machine).
$(VENV)/.installed: requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) pip install --quiet --compile-bytecode --python $(BIN)/python -r requirements.lock
	$(UV) pip install --quiet --compile-bytecode --python $(BIN)/python --no-deps -e .
	$(BIN)/python -m compileall -q ml
	touch $@

# The browser tests drive Debian's Chromium (Playwright's own browser download is not used). Installed when missing
# and we are root; otherwise the browser tests skip and say why.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "NO BROWSER: apt-get could not install chromium; the browser tests will skip"; \
	else echo "NO BROWSER: chromium is missing and cannot be installed here (needs root and apt-get); the browser tests will skip"; fi

run: setup  ## the main job: one full pipeline run through Airflow on embedded defaults
	$(BIN)/mlops run

test: setup browser  ## the whole test suite, as CI runs it
	$(BIN)/pytest

test-fast: setup  ## everything but the end-to-end and stack tests
	$(BIN)/pytest -m "not slow and not stack"

screenshots: setup browser  ## the browser test, saving a PNG of every page it visits in .mlops/screenshots/
	MLOPS_SCREENSHOTS=$(CURDIR)/.mlops/screenshots $(BIN)/pytest tests/test_browser.py

lint: setup  ## style, format and types (mypy on ml/, configured in pyproject.toml), as CI runs them
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python bench/pipeline_bench.py
	$(BIN)/python bench/serving_bench.py

status: setup
	$(BIN)/mlops status

airflow-ui: setup  ## Airflow UI on the same settings as `make run`: http://localhost:8080
	$(LOCAL_ENV) && airflow standalone

# Without MLflow's server job runner (GenAI scorers, trace roll-ups): seven processes this project never uses.
mlflow-ui: setup  ## MLflow UI on the same store as `make run`: http://localhost:5000
	$(LOCAL_ENV) && MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri "$$MLFLOW_TRACKING_URI" --host 127.0.0.1 --port 5000

serve: setup  ## the model server, following Production: http://localhost:5001
	$(BIN)/mlops serve --port 5001

lock:  ## re-resolve requirements.lock from pyproject.toml
	$(UV) pip compile pyproject.toml --extra dev --python-version 3.11 --quiet -o requirements.lock

clean:
	rm -rf .mlops
