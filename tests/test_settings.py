"""One settings module: every variable validated with one policy, and the
README's table is the registry's (torch_mps_ext/_settings.py)."""

import os
import re

import pytest

from conftest import ROOT, run_python
from torch_mps_ext import _settings

TORCHS_OWN = {"TORCH_DEVICE_BACKEND_AUTOLOAD"}


def _readme_rows():
    text = open(os.path.join(ROOT, "README.md")).read()
    return {m.group(1): (m.group(2).strip(), m.group(3).strip())
            for m in re.finditer(r"^\| `([A-Z0-9_]+)` \| [^|]* \| ([^|]*) \| ([^|]*) \|$",
                                 text, re.M)}


def test_readme_table_is_the_registry():
    rows = _readme_rows()
    assert set(rows) - TORCHS_OWN == set(_settings.SETTINGS)
    for name, setting in _settings.SETTINGS.items():
        assert rows[name] == (setting.allowed, setting.default), name


BAD = {
    "TORCH_MPS_EXT_DEVICE_COUNT": "17",
    "TORCH_MPS_EXT_MEMORY_BYTES": "-5",
    "PYTORCH_MPS_EXT_HIGH_WATERMARK_RATIO": "nan",
    "PYTORCH_MPS_EXT_LOW_WATERMARK_RATIO": "3",
    "TORCH_MPS_EXT_AUTOGRAD_DEVICE_THREAD": "yes",
    "TORCH_MPS_EXT_SHADER_CHECKED": "true",
    "TORCH_MPS_EXT_SHADER_CCACHE": "2",
    "TORCH_MPS_EXT_SHADER_COMPILE_TIMEOUT_S": "0",
    "TORCH_MPS_EXT_SHADER_COMPILE_MEMORY_BYTES": "1000",
    "PYTORCH_MPS_EXT_LOG_PROFILE_INFO": "999",
    "MTL_CAPTURE_ENABLED": "on",
    "TORCH_MPS_EXT_RNG_BASELINE": "2",
    "TORCH_MPS_EXT_FIDELITY": "strict",
    "TORCH_MPS_EXT_INDUCTOR": "triton",
    "PYTORCH_ENABLE_MPS_FALLBACK": "yes",
    "PYTORCH_MPS_HIGH_WATERMARK_RATIO": "-1",
    "PYTORCH_MPS_LOW_WATERMARK_RATIO": "3",
    "TORCH_MPS_EXT_KERNEL_TIMEOUT_S": "-1",
}


def test_every_bad_value_is_refused_at_import_with_one_text():
    # Paths and compiler flags accept any text; every other variable has a
    # bad value here.
    free_text = {n for n, s in _settings.SETTINGS.items() if s.parse is _settings._text}
    assert set(BAD) | free_text == set(_settings.SETTINGS)
    for name, value in BAD.items():
        proc = run_python("import torch_mps_ext", env={name: value}, check=False)
        assert proc.returncode != 0, name
        allowed = _settings.SETTINGS[name].allowed
        if name in ("PYTORCH_MPS_EXT_LOW_WATERMARK_RATIO", "PYTORCH_MPS_LOW_WATERMARK_RATIO"):
            allowed = "a number in [0, 1.7]"  # its bound is the high watermark
        assert f"ValueError: {name} must be {allowed}, got '{value}'" in proc.stderr, proc.stderr


def test_values_read_at_use_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_MPS_EXT_SHADER_CACHE", str(tmp_path))
    assert _settings.get("TORCH_MPS_EXT_SHADER_CACHE") == str(tmp_path)
    monkeypatch.setenv("TORCH_MPS_EXT_SHADER_CHECKED", "maybe")
    with pytest.raises(ValueError, match="^TORCH_MPS_EXT_SHADER_CHECKED must be 0 or 1, got 'maybe'$"):
        _settings.get("TORCH_MPS_EXT_SHADER_CHECKED")
    monkeypatch.setenv("TORCH_MPS_EXT_SHADER_CHECKED", "")
    assert _settings.get("TORCH_MPS_EXT_SHADER_CHECKED", False) is False
