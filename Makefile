# esdwatch: the two quick-start commands (README) and their helpers.
# Every target installs what it needs into ./.venv first, so both work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.esdwatch-installed

.PHONY: demo test lint typecheck install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU wheel on local disk: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# weightwatcher 0.7.7 calls powerlaw 1.x (under powerlaw 2 its TPL fits return alpha = -1): the
	# parity test runs it against powerlaw 1.5 kept apart here (tests/test_parity_tail_laws.py)
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/powerlaw-1.5 "powerlaw==1.5"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m esdwatch.demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# Style, architecture and type gates (CI runs this before `make test`); configuration in
# pyproject.toml. All four run even if one fails; the target fails if any did. PYTHONPATH=src
# makes lint-imports and mypy read this checkout even when the venv's editable install points
# elsewhere. mypy keeps its incremental cache in .mypy_cache (a cold run analyses torch's own
# annotations too and takes about a minute; a warm one a few seconds).
lint: $(STAMP)
	@rc=0; \
	echo "== ruff check";         $(PY) -m ruff check . || rc=1; \
	echo "== ruff format --check"; $(PY) -m ruff format --check . || rc=1; \
	echo "== lint-imports";       PYTHONPATH=src $(VENV)/bin/lint-imports --no-cache --no-logo || rc=1; \
	echo "== mypy";               PYTHONPATH=src $(PY) -m mypy || rc=1; \
	exit $$rc

# mypy alone (also part of `make lint`); files and options in [tool.mypy].
typecheck: $(STAMP)
	PYTHONPATH=src $(PY) -m mypy

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) experiments/bench_analyze.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
