# The two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DATA   ?= var

.PHONY: run test lint typecheck unit sysdeps weak-lists bytecode bench chaos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The packages are installed editable; their bytecode is written here once (and again for a
# changed file), not compiled in memory by each process when PYTHONDONTWRITEBYTECODE is set, as
# on this machine type: about 0.2 s of every CLI command, server and test child process.
PACKAGES = sekisho ca hsm audit enrollment web ocsp

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

# Debian's weak-key lists (GPL-3 data, not shipped): downloaded once into $(VENV)/cache, checked
# against pinned SHA-256 digests, installed under $(VENV)/share/sekisho. Once installed, only a
# package missing from the cache is fetched (a failure is then a warning).
# Without them RSA-2048/4096 keys are refused (docs/decisions.md).
weak-lists: $(VENV)/.installed
	$(BIN)/sekisho key install-weak-lists --debs $(VENV)/cache

# First run initialises $(DATA) (SQLite + software CA keys), then serves on 127.0.0.1:8080.
run: $(VENV)/.installed weak-lists bytecode
	$(BIN)/sekisho --data-dir $(DATA) run

bytecode: $(VENV)/.installed
	$(BIN)/python -m compileall -q $(PACKAGES) tests bench

sysdeps:
	tools/sysdeps.sh

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

# Two pytest workers (pytest-xdist): the suite waits on fsyncs, servers and child processes as
# much as it computes; on 2 vCPUs two workers took it from 12 min 48 s to 6 min 47 s, four
# took 6 min 57 s (docs/dependencies.md). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
unit: $(VENV)/.installed-test weak-lists bytecode
	$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS)

test: sysdeps lint typecheck unit

# kill -9 chaos at the nightly size (security target 10): 20 rounds of 200 concurrent
# issuances (4 processes x 50 threads) killed at random, on SQLite and PostgreSQL; about
# 10 s a round here. `make test` runs two short rounds of the same test.
chaos: $(VENV)/.installed-test sysdeps
	CHAOS_ROUNDS=20 CHAOS_PROCESSES=4 CHAOS_THREADS=50 \
		$(BIN)/pytest -q -p no:cacheprovider -n 0 -s tests/ca/test_chaos.py

bench: $(VENV)/.installed-test bytecode
	$(BIN)/python -m bench.issuance
	$(BIN)/python -m bench.crl
	$(BIN)/python -m bench.ocsp
	$(BIN)/python -m bench.backup
	$(BIN)/python -m bench.merkle
	$(BIN)/python -m bench.retention
	$(BIN)/python -m bench.prove

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
	find $(PACKAGES) tests bench -name __pycache__ -type d -prune -exec rm -rf {} +
