# Two entry points for a fresh machine: `make demo` (main job) and `make test` (test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= data/synth
OUT ?= runs/smoke

.PHONY: venv demo test lint bench clean

# The package and its runtime dependencies (all `make demo` needs) ...
$(BIN)/kvseg: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch lies on local disk; install it first so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $(BIN)/kvseg

# ... and the `dev` extras (pytest, ruff, onnx, tensorboard, ...) for `make test` and the rest.
$(VENV)/.dev: $(BIN)/kvseg
	$(BIN)/pip install -q -e ".[dev]"
	touch $(VENV)/.dev

venv: $(VENV)/.dev

demo: $(BIN)/kvseg
	$(BIN)/kvseg synth --out $(DATA) --cases 96 --days 1 --slices 8
	$(BIN)/kvseg reproduce --data $(DATA) --out $(OUT) --preset smoke

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/models.py
	$(BIN)/python benchmarks/data.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
