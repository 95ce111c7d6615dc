# sandtrace developer commands. `make` alone lists them; each target's `## ` comment is its help.
# Targets that load eBPF programs (run, test, bench) need root: `sudo make test`.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
BPF_SOURCES := $(wildcard bpf/*.c bpf/include/*.h)
PY_SOURCES := sandtrace api probes collector detect service tail fleet tests bench

.PHONY: help setup venv run test test-unit lint check bench bench-instructions format clean

help: ## List the targets
	@echo "Usage: make TARGET   (targets that load eBPF need root: sudo make TARGET)"
	@echo
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) \
		| awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

setup: ## Install system packages, kernel headers, tracefs and .venv (root; quick when done)
	bash scripts/setup.sh

venv: ## Create or refresh .venv only (no root; needs python3-venv installed)
	bash scripts/setup.sh --venv-only

run: setup ## Set up, then trace with `sandtrace watch` on its default scope (root)
	exec $(VENV)/bin/sandtrace watch

test: setup ## Set up, then run every test layer: unit, kernel, e2e (root; never skips)
	$(PY) -m pytest tests/unit tests/kernel tests/e2e

test-unit: venv ## Run the unit tests only (no root)
	$(PY) -m pytest tests/unit

lint: venv ## ruff, mypy --strict, the layers' import direction, clang-format on bpf/
	@command -v clang-format >/dev/null \
		|| { echo "clang-format is missing: run 'sudo make setup'" >&2; exit 1; }
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict $(PY_SOURCES)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_architecture.py
	clang-format --dry-run --Werror $(BPF_SOURCES)

check: lint test ## lint, then the whole test suite (root)

bench: setup ## Set up, then measure overhead and throughput with the bench package (root)
	$(PY) -m bench

bench-instructions: setup ## Instructions per event of the engine and ingest path (valgrind)
	$(PY) -m bench.instructions

format: venv ## Rewrite Python with ruff (format, import order) and C with clang-format
	$(VENV)/bin/ruff check --fix --select I .
	$(VENV)/bin/ruff format .
	@command -v clang-format >/dev/null \
		|| { echo "clang-format is missing: run 'sudo make setup'" >&2; exit 1; }
	clang-format -i $(BPF_SOURCES)

clean: ## Remove .venv, build leftovers and tool caches
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
