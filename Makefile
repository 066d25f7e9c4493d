# Two entry points (see README): `make demo` runs the main job end to end on the bundled tiny M1,
# `make test` runs the tests. Both set up .venv first; torch 2.13.0 goes in before the project so pip
# never pulls a multi-GB CUDA build on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: setup demo test test-slow test-all bench lint clean

# llama-cpp-python (test extra) compiles llama.cpp once, then comes from pip's wheel cache. GGML_NATIVE=OFF:
# the cached wheel then targets AVX2/FMA/F16C, not the building CPU, so it never dies of SIGILL on another
# machine that reuses the cache, and the GGUF tests' figures are those of that build.
$(BIN)/m1: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	CMAKE_ARGS="-DGGML_NATIVE=OFF $${CMAKE_ARGS:-}" $(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/m1

setup: $(BIN)/m1

demo: setup
	bash scripts/demo.sh $(DEMO)

# make test: the suite without the studies and long matrices (at most 3 minutes on 2 cores); make test-slow:
# those (marked slow); make test-all: both. CI (.ci/run) runs both, with the 15 slowest tests printed.
# The fast suite runs on 2 pytest-xdist workers, a test file per worker (fixtures are per file): on 2 cores
# the spawned m1 processes and torch's threads then keep both busy.
test: setup
	$(BIN)/python -m pytest -q tests -m "not slow" -n 2 --dist loadfile --durations=15

test-slow: setup
	$(BIN)/python -m pytest -q tests -m slow --durations=15

test-all: test test-slow

bench: setup
	$(BIN)/python bench/run_all.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(DEMO) .pytest_cache
