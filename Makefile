# Everyday commands. `make demo` and `make test` work on a fresh clone with only Python and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo_out

.PHONY: setup demo test lint format bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, pinned, so the project's range is already satisfied and no CUDA wheels are pulled
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m mova_train.demo --out $(DEMO_OUT)

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: setup
	$(PY) -m mova_train.bench model
	$(PY) -m mova_train.bench codecs
	$(PY) -m data_tools bench
	$(PY) -m mova_train.bench train
	$(PY) -m mova_train.sampling.bench

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
