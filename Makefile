# bitback developer entry points. A newcomer needs two: `make demo` and `make test`.
# Every target that runs Python first makes sure the virtualenv exists and holds the project
# (scripts/venv.sh); it is re-installed when pyproject.toml changes (the stamp file).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bitback-installed
PYTEST_ARGS ?= -n 2 -ra --durations=15
BENCH_ARGS ?=

.PHONY: help venv qemu demo test lint typecheck pytest bench clean distclean

help:
	@echo "make demo       image tools tour, then a live full + incremental backup with bitbackd"
	@echo "make test       ruff + mypy + the pytest suite (installs QEMU 7.2 tools if root)"
	@echo "make lint       ruff check src tests bench"
	@echo "make typecheck  mypy (strict, configured in pyproject.toml)"
	@echo "make pytest     the pytest suite only (PYTEST_ARGS=... to pass options)"
	@echo "make bench      benchmarks against QEMU (BENCH_ARGS='--size 64M --runs 3' for a smoke run)"
	@echo "make venv       create $(VENV) and install bitback with its dev tools"
	@echo "make clean      remove caches and build output; make distclean also removes $(VENV)"

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/venv.sh
	bash scripts/venv.sh $(VENV) $(STAMP)

qemu:
	bash scripts/ensure-qemu.sh

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python scripts/backup_demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# pytest exits 5 when it collected no tests: that is reported, not treated as a failure.
pytest: $(STAMP)
	@rc=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected (exit 5); nothing failed"; rc=0; fi; \
	exit $$rc

# Runs every check even when an earlier one fails, so one run shows all problems; the pytest
# summary stays the last line of a passing run.
test: $(STAMP)
	bash scripts/ensure-qemu.sh
	@failed=""; \
	echo "== ruff check src tests bench"; \
	$(BIN)/ruff check src tests bench || failed="$$failed ruff"; \
	echo "== mypy"; \
	$(BIN)/mypy || failed="$$failed mypy"; \
	if [ -n "$$failed" ]; then echo "== FAILED so far:$$failed (running pytest anyway)"; fi; \
	echo "== pytest"; \
	$(MAKE) --no-print-directory pytest || failed="$$failed pytest"; \
	if [ -n "$$failed" ]; then echo "make test: FAILED:$$failed"; exit 1; fi

bench: $(STAMP)
	bash scripts/ensure-qemu.sh
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find src tests bench -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
