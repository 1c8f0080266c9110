# The only entry points a user needs: `make test`, `make bench`, `make lint`, `make clean`.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_MODE ?= quick
# Type-check everything, tests included.
MYPY_TARGETS := $(wildcard ltx sidecar bench demo examples tests)

.PHONY: test lint bench redis system-deps install clean distclean demo soak

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

# System packages the tests use: redis-server (tests start their own throwaway instances),
# the sqlite3 shell (a writer process in the tailer tests) and faketime (the chaos
# suite's clock jump). Installed when missing.
SYSTEM_TOOLS := redis-server:redis-server sqlite3:sqlite3 faketime:faketime

system-deps:
	@missing=; for pair in $(SYSTEM_TOOLS); do \
		cmd=$${pair%%:*}; pkg=$${pair##*:}; \
		command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	else echo "make: missing system packages:$$missing, and this user cannot install them (not root, no sudo)." >&2; exit 1; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "make: missing system packages:$$missing, and apt-get is not available: install them and retry." >&2; exit 1; fi; \
	echo "make: installing$$missing with apt-get"; \
	$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends $$missing \
		|| { echo "make: installing$$missing with apt-get failed: install them by hand and retry." >&2; exit 1; }

redis: system-deps

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(MYPY_TARGETS)

test: $(STAMP) system-deps
	$(MAKE) lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# A three-node cluster on 127.0.0.1 with the example app; runs until Ctrl-C.
demo: $(STAMP) system-deps
	$(PY) -m demo

# Random nemeses against a local cluster for DURATION (e.g. 30m, 2h); prints a summary.
DURATION ?= 30m
soak: $(STAMP) system-deps
	$(PY) -m tests.chaos.soak --duration $(DURATION)

bench: $(STAMP)
	$(PY) -m bench --mode $(BENCH_MODE)

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis bench/out
	find . -type d -name __pycache__ -not -path './.venv*' -not -path '$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
