# `make demo` and `make test` each create (or refresh) .venv, install the pinned dependencies, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# 2 math threads per process is the measured sweet spot on the 2-core CI machines; override as you like.
export OMP_NUM_THREADS ?= 2
export PYTHONWARNINGS ?= ignore::DeprecationWarning

.PHONY: demo test test-quick install clean benchmarks

$(STAMP): pyproject.toml requirements.txt requirements-dev.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/python -m pip install --quiet -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/paddle-llm demo

# Every test this machine can run (CI runs this). `make test-quick` is the local loop: unit tests plus the fast
# integration tests (validation and error paths, export and serving on tiny checkpoints); it leaves out every test
# marked slow (training runs, multi-process launches, emulated CPUs, the demo, the README walk-through). One math
# thread per process: the integration tests run several training processes side by side on 2 cores.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not gpu and not extended" -q

test-quick: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow and not gpu and not extended" -q

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/preprocess_throughput.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
