# synthlearn: `make demo` and `make test` each set up everything they need, then run.
# The project venv is .venv; torch 2.13.0 (CPU) is installed first and alone, then every other dependency
# at the exact versions of requirements/lock.txt, held by requirements/constraints.txt (torch==2.13.0,
# packaging<26), so pip can never pull a CUDA torch (GBs) or a packaging that breaks Flower.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.synthlearn-installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export FLWR_HOME := $(CURDIR)/.flwr
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install demo demo-long test test-slow test-browser bench clean help

help:
	@echo "make demo       set up .venv, make the default phantom study if absent, run the four-arm demo study and its report"
	@echo "make demo-long  the same with CATphishing generators trained 3x as long (not yet measured at the 16^3 latent; well over an hour)"
	@echo "make test       set up .venv, check the package's import contracts (lint-imports) and run the test suite (slow and gpu tests excluded)"
	@echo "make test-slow  the longer checks (pytest -m slow)"
	@echo "make test-browser  report.html in headless Chromium (installs Debian's chromium and playwright if absent)"
	@echo "make bench      the benchmarks recorded in docs/benchmarks.md"

install: $(STAMP)

$(STAMP): requirements/lock.txt requirements/constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==2.13.0
	$(PIP) install --quiet --disable-pip-version-check -c requirements/constraints.txt -r requirements/lock.txt
	$(PIP) install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, monai, flwr, nibabel; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

STUDY ?= data/phantom

demo: $(STAMP)
	$(VENV)/bin/synthlearn demo --study $(STUDY) --out runs/demo

demo-long: $(STAMP)
	$(VENV)/bin/synthlearn demo --study $(STUDY) --config configs/demo_long.toml --out runs/demo_long

test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Debian's chromium (no browser download: a test tool's own browser download fails here) and Playwright to drive it
test-browser: $(STAMP)
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(PIP) install --quiet --disable-pip-version-check -c requirements/constraints.txt -r requirements/browser.txt
	$(PY) -m pytest -q -m browser

bench: $(STAMP)
	$(PY) benchmarks/bench_phantom.py

clean:
	rm -rf $(VENV) .pytest_cache .flwr
