# dpo-dist: `make test` and `make demo` each set themselves up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned: on a CPU machine an unpinned torch pulls gigabytes of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH_SPEC)"
	touch $@

test: install
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache *.egg-info
