# Quick start: `make demo` (set up + run examples/quickstart.py), `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup build demo test test-models bench conformance clean

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

# Editable install: builds csrc/ with CMake (ccache when installed) and
# registers the torch.backends entry point, so `import torch` autoloads mps_ext.
# setup.py compiles first, in the open (Ninja's [n/N] lines; "no work to do"
# when nothing changed); pip, which would hide that output, then finds the
# build done and installs (quietly: its progress shows on a failure).
build: $(VENV)/.deps
	$(PY) setup.py -q build_ext --inplace
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

setup: build

demo: build
	$(PY) examples/quickstart.py

# Test-only dependencies (transformers for the model zoo, tests/models).
# requirements-test.txt includes requirements.txt, so torch keeps its pin.
$(VENV)/.test-deps: requirements-test.txt requirements.txt $(VENV)/.deps
	$(PY) -m pip install -r requirements-test.txt
	touch $@

# pytest exits 5 when it collected no test: that is a failure here too.
# The model zoo's heavy cases (marker models_heavy) are left to test-models.
test: build $(VENV)/.test-deps
	$(PY) -m pytest -q -m "not models_heavy" $(PYTEST_ARGS) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The whole model zoo (tests/models, docs/testing.md), heavy cases included.
test-models: build $(VENV)/.test-deps
	$(PY) -m pytest -q $(PYTEST_ARGS) tests/models; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The full OpInfo sweep (tests/test_opinfo.py, TORCH_MPS_EXT_OPINFO=full), one
# pytest process per op category, and the full module_db sweep (category
# module_db: tests/test_module_db.py, TORCH_MPS_EXT_MODULEDB=full), then
# docs/conformance.md (generated).
# CONFORMANCE_CATEGORIES=linalg,fft (or module_db) to run some; the report
# covers what ran.
CONFORMANCE_CATEGORIES ?=
conformance: build
	$(PY) tests/conformance_report.py --run $(if $(CONFORMANCE_CATEGORIES),--categories $(CONFORMANCE_CATEGORIES))

bench: build
	$(PY) -m bench

clean:
	rm -rf build $(VENV) torch_mps_ext/*.so *.egg-info
