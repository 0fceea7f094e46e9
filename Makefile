# Everyday commands. `make demo` and `make test` work on a fresh clone with only Python and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# The package index torch comes from, e.g. `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu` (the CPU-only
# build, no CUDA libraries) or .../whl/cu128; empty = pip's default index (on Linux that wheel bundles CUDA).
TORCH_INDEX ?=
DEMO_OUT ?= demo_out
# Every other package at the exact version the tests (and the golden-loss file) were made with; `make lock` refreshes it.
LOCK := requirements/lock.txt

.PHONY: setup demo test lint format bench clean lock

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c $(LOCK) pip
	# torch first, pinned, so the project's range is already satisfied and pip never picks another torch
	# With TORCH_INDEX, only torch comes from there (--no-deps); its dependencies come with the next line, at the
	# lock's versions, from the default index.
	$(PY) -m pip install -c $(LOCK) "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--no-deps --index-url $(TORCH_INDEX))
	$(PY) -m pip install -c $(LOCK) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m mova_train.cli.demo --out $(DEMO_OUT)

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
	$(PY) -m mova_train.bench cli --demo-out $(DEMO_OUT)
	$(PY) -m mova_train.bench model
	$(PY) -m mova_train.bench codecs
	$(PY) -m data_tools bench
	$(PY) -m mova_train.bench data --synthetic 8
	$(PY) -m mova_train.bench train
	$(PY) -m mova_train.bench sampling
	$(PY) -m mova_train.bench export
	$(PY) -m mova_train.bench load

# Re-resolve the newest versions the project's ranges allow into $(LOCK), in a throw-away venv. Then regenerate the
# golden-loss file in the same commit (README: "Pinned dependencies"); the tests refuse a lock the golden file was not
# made with.
lock:
	rm -rf .lockenv
	$(PYTHON) -m venv .lockenv
	.lockenv/bin/python -m pip install --upgrade pip
	.lockenv/bin/python -m pip install "$(TORCH_SPEC)"
	.lockenv/bin/python -m pip install ".[dev]"
	head -n 3 $(LOCK) > $(LOCK).new
	.lockenv/bin/python -m pip freeze --all --exclude-editable | grep -viE '^(torch|mova-train)==' >> $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .lockenv

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
