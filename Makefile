# Two entry points a new user needs: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_AUTH_MODE ?= disabled

.PHONY: venv demo test test-fast bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev,plots]"
	touch $@

demo: venv
	$(BIN)/itsim demo --out runs/demo

test: venv
	$(BIN)/python -m pytest -q -ra

test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not slow"

bench: venv
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs build *.egg-info .pytest_cache
