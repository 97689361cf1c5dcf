# Quick start: `make demo` (set up + run examples/quickstart.py), `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup build demo test bench conformance clean

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Editable install: builds csrc/ with CMake (ccache when installed) and
# registers the torch.backends entry point, so `import torch` autoloads mps_ext.
build: $(VENV)/.deps
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

setup: build

demo: build
	$(PY) examples/quickstart.py

# pytest exits 5 when it collected no test: that is a failure here too.
test: build
	$(PY) -m pytest -q $(PYTEST_ARGS) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: build
	$(PY) -m bench

clean:
	rm -rf build $(VENV) torch_mps_ext/*.so *.egg-info
