# The only entry points a user needs: `make test`, `make bench`, `make lint`, `make clean`.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_MODE ?= quick
# Type-check the packages that exist (ltx/ and sidecar/ land in separate steps).
MYPY_TARGETS := $(wildcard ltx sidecar bench)

.PHONY: test lint bench redis install clean distclean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

# redis-server is a system package: tests start their own throwaway instance.
redis:
	@if command -v redis-server >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	else echo "make redis: redis-server is not installed and this user cannot install it (not root, no sudo). Install the redis-server package and retry." >&2; exit 1; fi; \
	echo "make redis: redis-server not found; installing it with apt-get"; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "make redis: redis-server is not installed and apt-get is not available. Install redis-server (Redis >= 6) and retry." >&2; exit 1; fi; \
	$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends redis-server \
		|| { echo "make redis: installing redis-server with apt-get failed. Install it by hand and retry." >&2; exit 1; }; \
	command -v redis-server >/dev/null 2>&1 \
		|| { echo "make redis: redis-server is still not on PATH after installing it." >&2; exit 1; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(MYPY_TARGETS)

test: $(STAMP) redis
	$(MAKE) lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench --mode $(BENCH_MODE)

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis bench/out
	find . -type d -name __pycache__ -not -path './.venv*' -not -path '$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
