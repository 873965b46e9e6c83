# The two commands the README opens with: `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

$(BIN)/raypp: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off -q torch==2.13.0
	$(BIN)/pip install --progress-bar off -q -e '.[dev]'
	touch $(BIN)/raypp

setup: $(BIN)/raypp

serve: setup
	$(BIN)/serve run deployments/tiny_cpu.yaml

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

.PHONY: setup serve test
