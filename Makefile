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

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) benchmarks/engine_overhead.py

clean:
	rm -rf $(VENV) data *.egg-info
