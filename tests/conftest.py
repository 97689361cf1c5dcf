"""Shared fixtures: every test imports torch_mps_ext explicitly (autoload is
tested on its own), and runs code in a fresh interpreter when it needs a
different environment (device count, memory size, bad settings).

The session's caches and output files go to one temporary folder, removed at
the end: compiled shaders, Inductor's and Triton's caches, torch extensions,
ccache (the shader compiler's), anything under $XDG_CACHE_HOME, and the
profiler's trace. Set here, before torch (and with it torch_mps_ext) is
imported, in os.environ, so every subprocess a test starts inherits them:
the test suite writes nothing into the user's home or caches."""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

SESSION_DIR = tempfile.mkdtemp(prefix="torch_mps_ext-tests-")
SESSION_ENV = {
    "TORCH_MPS_EXT_SHADER_CACHE": os.path.join(SESSION_DIR, "shaders"),
    "TORCHINDUCTOR_CACHE_DIR": os.path.join(SESSION_DIR, "inductor"),
    "TRITON_CACHE_DIR": os.path.join(SESSION_DIR, "triton"),
    "TORCH_EXTENSIONS_DIR": os.path.join(SESSION_DIR, "torch_extensions"),
    "CCACHE_DIR": os.path.join(SESSION_DIR, "ccache"),
    "XDG_CACHE_HOME": os.path.join(SESSION_DIR, "xdg-cache"),
    "PYTORCH_MPS_EXT_TRACE_FILE": os.path.join(SESSION_DIR, "trace.json"),
}
os.environ.update(SESSION_ENV)

import pytest  # noqa: E402
import torch  # noqa: E402

import torch_mps_ext  # noqa: F401,E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_report_header(config):
    return f"torch_mps_ext caches and traces for this session: {SESSION_DIR}"


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


def run_python(code: str, env: dict | None = None, timeout: float = 300,
               check: bool = True) -> subprocess.CompletedProcess:
    """Runs `code` in a new interpreter with the package importable."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)  # None unsets a variable
        else:
            full_env[key] = value
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({proc.returncode}):\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def fresh_memory():
    """Frees cached blocks before and after a memory-accounting test."""
    import gc
    gc.collect()
    fraction = torch.mps_ext.get_per_process_memory_fraction()
    torch.mps_ext.empty_cache()
    torch.mps_ext.reset_peak_memory_stats()
    torch.mps_ext.reset_accumulated_memory_stats()
    yield
    gc.collect()
    torch.mps_ext.set_per_process_memory_fraction(fraction)
    torch.mps_ext.empty_cache()


# Modules allowed to end with more device memory allocated than they started
# with, each with the reason (path from the repo root -> why). Empty: every
# module releases what it allocates.
KEEPS_DEVICE_MEMORY: dict[str, str] = {}


def _allocated_per_device(when: str) -> list[int]:
    import gc
    # pytest keeps the last exception a test raised (skip and xfail included)
    # for post-mortem debugging: its frames hold the test's tensors.
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    gc.collect()
    counts = []
    for index in range(torch.mps_ext.device_count()):
        error = None
        try:
            torch.mps_ext.synchronize(index)
        except torch.AcceleratorError as e:
            error = str(e)
        if error is not None:
            pytest.fail(f"a device error was pending {when}: {error}", pytrace=False)
        counts.append(torch.mps_ext.memory_allocated(index))
    return counts


@pytest.fixture(scope="module", autouse=True)
def _device_memory_returns_to_baseline(request):
    """Every test module gives back the device memory it allocated:
    torch.mps_ext.memory_allocated() of each device after the module (after
    gc.collect() and synchronize()) equals what it was before. A leak fails
    the module's last test at teardown, naming the module and the bytes."""
    name = os.path.relpath(request.path, ROOT)
    failed_before = request.session.testsfailed
    before = _allocated_per_device(f"before {name}")
    yield
    if name in KEEPS_DEVICE_MEMORY:
        return
    after = _allocated_per_device(f"after {name}")
    leaks = [f"mps_ext:{i}: {a - b:+d} bytes (memory_allocated() {b} before "
             f"the module, {a} after)" for i, (b, a) in enumerate(zip(before, after))
             if a != b]
    if leaks:
        failed = request.session.testsfailed - failed_before
        note = (f"; {failed} of its tests failed, and a failure can hold tensors"
                if failed else "")
        pytest.fail(f"{name} did not release its device "
                    f"memory: {'; '.join(leaks)}{note}. Release module-level "
                    "tensors at the end of the module, or list the module with "
                    "the reason in conftest.KEEPS_DEVICE_MEMORY.", pytrace=False)


@pytest.fixture(scope="module")
def private_shader_cache(tmp_path_factory):
    """A shader cache of the test module's own (compile_shader's cache key
    makes modules share nothing anyway; a fresh folder keeps them honest)."""
    d = tmp_path_factory.mktemp("shader-cache")
    old = os.environ.get("TORCH_MPS_EXT_SHADER_CACHE")
    os.environ["TORCH_MPS_EXT_SHADER_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("TORCH_MPS_EXT_SHADER_CACHE", None)
    else:
        os.environ["TORCH_MPS_EXT_SHADER_CACHE"] = old
