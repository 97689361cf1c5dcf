r"""Every environment variable of torch_mps_ext, read and validated here.

One policy for all of them: a bad value is a ``ValueError`` naming the
variable and what it accepts (``NAME must be ..., got 'value'``), raised by
``import torch_mps_ext`` (with autoload, ``import torch`` warns instead and
leaves torch usable on the CPU). The native core reads the variables it
needs itself (``csrc/runtime/Settings.h``) with the same policy and texts;
they are listed here too, so this table is the whole list and the README's
table is checked against it (``tests/test_settings.py``).

``when``: ``import`` values are read once, when the package is imported;
``use`` values are read each time they are used (a program may set them with
``os.environ`` before the use), and validated at import as well.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Setting:
    name: str
    allowed: str          # what the error message says it must be
    default: str          # as the README shows it
    when: str             # "import" or "use"
    native: bool          # read by the C++ core (csrc/runtime/Settings.h)
    parse: Callable[[str], Any]


class _Invalid(Exception):
    pass


def _flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise _Invalid
    return raw == "1"


def _int_in(lo: int, hi: int | None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            v = int(raw, 0)
        except ValueError:
            raise _Invalid from None
        if v < lo or (hi is not None and v > hi):
            raise _Invalid
        return v
    return parse


def _number_in(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            v = float(raw)
        except ValueError:
            raise _Invalid from None
        if not lo <= v <= hi:  # also refuses nan
            raise _Invalid
        return v
    return parse


_ratio = _number_in(0.0, 2.0)
_seconds = _number_in(0.0, 1e9)


def _text(raw: str) -> str:
    if not raw:
        raise _Invalid
    return raw


def _choice(*values: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in values:
            raise _Invalid
        return raw
    return parse


_LOG_ALL = (1 << 7) - 1  # csrc/core/Profiler.h: LogOptions

SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("TORCH_MPS_EXT_DEVICE_COUNT", "an integer from 1 to 16", "1", "import", True,
            _int_in(1, 16)),
    Setting("TORCH_MPS_EXT_MEMORY_BYTES", "a positive integer number of bytes",
            "3/4 of physical RAM", "import", True, _int_in(1, None)),
    Setting("PYTORCH_MPS_EXT_HIGH_WATERMARK_RATIO", "a number in [0, 2]", "1.7", "import", True,
            _ratio),
    Setting("PYTORCH_MPS_EXT_LOW_WATERMARK_RATIO", "a number in [0, high]", "1.4", "import", True,
            _ratio),
    Setting("TORCH_MPS_EXT_AUTOGRAD_DEVICE_THREAD", "0 or 1", "0", "import", False, _flag),
    Setting("TORCH_MPS_EXT_SHADER_CACHE", "a directory path",
            "$XDG_CACHE_HOME/torch_mps_ext/shaders (~/.cache/...)", "use", False, _text),
    Setting("TORCH_MPS_EXT_SHADER_CHECKED", "0 or 1", "0", "use", False, _flag),
    # Read by the native core on the first kernel launch (runtime/Fault.cpp).
    Setting("TORCH_MPS_EXT_KERNEL_TIMEOUT_S", "a number of seconds, 0 (off) or more", "0",
            "import", False, _seconds),
    Setting("TORCH_MPS_EXT_SHADER_CCACHE", "0 or 1", "1", "use", False, _flag),
    Setting("TORCH_MPS_EXT_SHADER_ARCH_FLAGS", "compiler flags", "-march=native", "use", False,
            _text),
    Setting("TORCH_MPS_EXT_SHADER_COMPILE_TIMEOUT_S", "an integer number of seconds from 1 to 86400",
            "300", "use", False, _int_in(1, 86400)),
    Setting("TORCH_MPS_EXT_SHADER_COMPILE_MEMORY_BYTES", "an integer number of bytes, at least 16 MiB",
            "4294967296 (4 GiB)", "use", False, _int_in(16 << 20, None)),
    Setting("PYTORCH_MPS_EXT_TRACE_FILE", "a file path",
            "<tmp>/torch_mps_ext_traces-<uid>/trace-<pid>-<n>.json", "use", False, _text),
    Setting("PYTORCH_MPS_EXT_LOG_PROFILE_INFO", f"a bit mask between 0 and {_LOG_ALL}", "0",
            "import", False, _int_in(0, _LOG_ALL)),
    Setting("MTL_CAPTURE_ENABLED", "0 or 1", "unset (0)", "use", False, _flag),
    # torch.compile's code generator on mps_ext, read at each compile
    # (torch_mps_ext/_inductor.py, docs/compile.md).
    Setting("TORCH_MPS_EXT_INDUCTOR", "cpp or metal", "cpp (metal in MPS fidelity mode)", "use",
            False, _choice("cpp", "metal")),
    # MPS fidelity mode (torch_mps_ext/fidelity, docs/fidelity.md).
    Setting("TORCH_MPS_EXT_FIDELITY", "off or mps", "off", "import", False,
            _choice("off", "mps")),
    Setting("PYTORCH_ENABLE_MPS_FALLBACK", "0 or 1", "0", "import", False, _flag),
    Setting("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "a number in [0, 2]",
            "PYTORCH_MPS_EXT_HIGH_WATERMARK_RATIO", "import", True, _ratio),
    Setting("PYTORCH_MPS_LOW_WATERMARK_RATIO", "a number in [0, high]",
            "PYTORCH_MPS_EXT_LOW_WATERMARK_RATIO", "import", True, _ratio),
    Setting("TORCH_MPS_EXT_FIDELITY_REPORT", "a directory path", "unset", "import", False,
            _text),
    # For tests: random ops use the portable kernels instead of the AVX2 ones
    # (both must give the same numbers). Read by the native core on the
    # first random op; validated here at import.
    Setting("TORCH_MPS_EXT_RNG_BASELINE", "0 or 1", "0", "import", False, _flag),
)}


def _error(setting: Setting, raw: str) -> ValueError:
    return ValueError(f"{setting.name} must be {setting.allowed}, got {raw!r}")


def get(name: str, default: Any = None) -> Any:
    """The parsed value of a setting, or `default` when it is unset (or set
    to the empty string, which counts as unset for paths and flags alike)."""
    setting = SETTINGS[name]
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return setting.parse(raw)
    except _Invalid:
        raise _error(setting, raw) from None


def validate_all() -> None:
    """Raises ValueError for the first bad value (import time). The native
    core validates its own (``_C._init()``)."""
    for name, setting in SETTINGS.items():
        if not setting.native:
            get(name)
