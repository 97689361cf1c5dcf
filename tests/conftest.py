"""Shared fixtures: every test imports torch_mps_ext explicitly (autoload is
tested on its own), and runs code in a fresh interpreter when it needs a
different environment (device count, memory size, bad settings)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_mps_ext  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
