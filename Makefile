# Two commands on a fresh machine: `make demo` (the quickstart plan on scikit-learn's digits) and `make test`.
# Each creates .venv and installs what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/make_digits.py data/digits
	$(VENV)/bin/pgshell examples/quickstart.plan

# tests/test_tune_shared.py starts a PostgreSQL server of its own. Best effort, as root where apt-get exists: install
# Debian's server when none is found; should that fail, the test skips and says what to install.
PG_INITDB := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb) $(shell command -v initdb 2>/dev/null))

test: $(VENV)/.installed
	@[ -n "$(PG_INITDB)" ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || { \
	  echo "installing PostgreSQL for the shared-study test (apt-get, best effort)"; \
	  (apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -qq install -y postgresql) >/dev/null 2>&1 || true; }
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) data *.egg-info
