# Quick start: `make demo` (set up + run examples/quickstart.py), `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup build demo test test-models bench conformance asan clean

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

# AddressSanitizer + UBSan (docs/testing.md). The C++ core is built with
# TORCH_MPS_EXT_SANITIZE=ON in build/cmake-asan, into a copy of the package
# and the tests in build/asan (the normal build, torch_mps_ext/_C*.so, is not
# touched), then a subset of the tests runs there, the ASan runtime preloaded
# into the uninstrumented interpreter (with libstdc++, loaded before ASan
# looks for __cxa_throw: python does not link it). --capture=sys: a report
# goes to the terminal even when it aborts pytest. Not part of `make test`.
ASAN_TREE  := build/asan
ASAN_TESTS ?= tests/test_device.py tests/test_memory.py tests/test_streams.py \
	tests/test_random.py tests/test_ops.py tests/test_fallback_conformance.py \
	tests/test_fallback_properties.py tests/test_stress.py tests/test_shader.py
ASAN_PRELOAD = $(shell $(CXX) -print-file-name=libasan.so) $(shell $(CXX) -print-file-name=libstdc++.so)
asan: $(VENV)/.test-deps
	rm -rf $(ASAN_TREE)/torch_mps_ext $(ASAN_TREE)/tests $(ASAN_TREE)/examples
	mkdir -p $(ASAN_TREE)
	cp -r torch_mps_ext tests examples torch_mps_ext_autoload.py $(ASAN_TREE)/
	rm -f $(ASAN_TREE)/torch_mps_ext/*.so
	TORCH_MPS_EXT_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib $(ASAN_TREE) \
		--build-temp $(ASAN_TREE)/temp
	cd $(ASAN_TREE) && export LD_PRELOAD="$(ASAN_PRELOAD)" \
		ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 && \
	$(abspath $(PY)) -c "import torch_mps_ext, os; f = torch_mps_ext._C.__file__; \
		assert f.startswith(os.getcwd()), f; print('sanitized build:', f)" && \
	$(abspath $(PY)) -m pytest -q -p no:cacheprovider --capture=sys $(PYTEST_ARGS) $(ASAN_TESTS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: build
	$(PY) -m bench

clean:
	rm -rf build $(VENV) torch_mps_ext/*.so *.egg-info
