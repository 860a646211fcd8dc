# DeepEarth Cube: developer entry points. Everything runs from ./.venv (scripts/install.sh).
#   make demo     install, write the demo source, build its cubes, serve them on :8080
#   make test     install, then run the test suite
#   make lint     ruff check
#   make bench    benchmarks (benchmarks/run_all.py)
#   make clean    caches and build outputs (keeps data/ and .venv; see distclean)

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV       := .venv
PYTHON     := $(VENV)/bin/python
DEEPEARTH  := $(VENV)/bin/deepearth
RUFF       := $(VENV)/bin/ruff
PORT       ?= 8080
PYTEST_ARGS ?=

# Tests drive the system Chromium (Debian package); never let Playwright fetch a browser.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1
export DEEPEARTH_CHROMIUM ?= /usr/bin/chromium

DEMO_SOURCE := data/source-demo
DEMO_CUBES  := data/cubes-demo

.PHONY: help install test demo lint bench clean distclean

help:
	@sed -n 's/^#   //p' Makefile

# Idempotent: install.sh returns at once when pyproject.toml and itself are unchanged.
install:
	bash scripts/install.sh

test: install
	$(PYTHON) -m pytest -q --durations=25 tests $(PYTEST_ARGS)

# Each step is skipped when its output exists (synth and gen publish folders atomically).
# The project's bytecode first (install.sh compiles the rest): with PYTHONDONTWRITEBYTECODE
# set, every process of the build would otherwise compile cube_gen and server again.
demo: install
	@$(PYTHON) -m compileall -q cube_gen server > /dev/null
	@if [ ! -d $(DEMO_SOURCE) ]; then \
		echo "==> deepearth synth --preset demo --out $(DEMO_SOURCE)"; \
		$(DEEPEARTH) synth --preset demo --out $(DEMO_SOURCE); \
	fi
	@if [ ! -f $(DEMO_CUBES)/cubeset.json ]; then \
		echo "==> deepearth gen recipes/demo.yaml"; \
		$(DEEPEARTH) gen recipes/demo.yaml; \
	fi
	$(DEEPEARTH) serve $(DEMO_CUBES) --port $(PORT)

lint: install
	$(RUFF) check .

bench: install
	$(PYTHON) -m benchmarks.run_all

clean:
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache build dist artifacts benchmarks/out viewer/.dist

# Also the generated data and the virtual environment.
distclean: clean
	rm -rf data $(VENV)
