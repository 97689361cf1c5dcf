r"""The compatibility report: every incompatibility with Apple's MPS backend a
program meets, recorded instead of raised (``python -m torch_mps_ext.fidelity``).

The native core calls :func:`_record` (with the GIL) for each one: an
operator without an MPS kernel, an operator MPS runs on the CPU, a float64
or complex128 tensor MPS would refuse. Each row keeps a count and the first
place in the user's code that met it: the innermost frame outside torch,
torchgen, this package and Python's standard library.

Processes the command starts inherit ``TORCH_MPS_EXT_FIDELITY_REPORT`` (a
directory): each writes its rows there at exit (``<dir>/<pid>.json``), and
the command merges them into its own.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import sysconfig
import threading

from .. import _C

# Kinds, as the native core names them (csrc/aten/Fidelity.h: Recorder).
OPERATOR = "operator"  # no MPS kernel: NotImplementedError on a Mac
DTYPE = "dtype"        # float64 / complex128: TypeError on a Mac
CPU = "cpu"            # MPS runs it on the CPU (a warning, not an error)
INCOMPATIBLE = (OPERATOR, DTYPE)

_lock = threading.Lock()
_rows: dict[tuple[str, str, str], dict] = {}
_started = False


def _skipped_dirs() -> tuple[str, ...]:
    import torch

    dirs = {os.path.dirname(torch.__file__),
            os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}  # torch_mps_ext
    try:
        import torchgen

        dirs.add(os.path.dirname(torchgen.__file__))
    except ImportError:
        pass
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(path)
    return tuple(os.path.realpath(d) + os.sep for d in dirs)


_SKIPPED: tuple[str, ...] | None = None


def _user_location() -> str:
    """file:line of the innermost frame that is the user's code."""
    global _SKIPPED
    if _SKIPPED is None:
        _SKIPPED = _skipped_dirs()
    try:
        frame = sys._getframe(2)
    except ValueError:  # called from a thread running no Python code
        return "<unknown>"
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith("<frozen"):  # "<string>" (python -c) is the user's
            real = filename if filename.startswith("<") else os.path.realpath(filename)
            if not real.startswith(_SKIPPED):
                return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


def _key(kind: str, dtype: str, op: str) -> tuple[str, str]:
    # One row per operator, one per dtype (with the operators that met it).
    return (kind, dtype) if kind == DTYPE else (kind, op)


def _add(row: dict, op: str, n: int) -> None:
    row["count"] += n
    if row["kind"] == DTYPE:
        name = op or "(a random operator)"
        row["operators"][name] = row["operators"].get(name, 0) + n


def _record(kind: str, dtype: str, op: str) -> None:
    key = _key(kind, dtype, op)
    with _lock:
        row = _rows.get(key)
        if row is not None:
            _add(row, op, 1)
            return
    where = _user_location()
    with _lock:
        row = _rows.get(key)
        if row is None:
            row = _rows[key] = {"kind": kind, "dtype": dtype or None,
                                "operator": None if kind == DTYPE else op,
                                "count": 0, "first": where}
            if kind == DTYPE:
                row["operators"] = {}
        _add(row, op, 1)


def start(report_dir: str | None = None) -> None:
    """mps mode, recording: operators without an MPS kernel run (as with
    PYTORCH_ENABLE_MPS_FALLBACK=1) and every incompatibility is recorded.
    With `report_dir`, the rows are written there at exit."""
    global _started
    from . import set_fidelity

    if not _started:
        _started = True
        _C._fidelity_set_recorder(_record)
        if report_dir:
            atexit.register(_write, os.path.join(report_dir, f"{os.getpid()}.json"))
    _C._fidelity_set_options(cpu_fallback=True, record=True)
    set_fidelity("mps")


def rows() -> list[dict]:
    """The recorded rows (copies), incompatibilities first, most frequent first."""
    with _lock:
        out = [dict(r) for r in _rows.values()]
    for r in out:
        if "operators" in r:
            r["operators"] = dict(sorted(r["operators"].items(), key=lambda kv: (-kv[1], kv[0])))
    out.sort(key=lambda r: (r["kind"] not in INCOMPATIBLE, -r["count"], r["kind"],
                            r["dtype"] or "", r["operator"] or ""))
    return out


def incompatible(rows_: list[dict]) -> list[dict]:
    return [r for r in rows_ if r["kind"] in INCOMPATIBLE]


def merge(other: list[dict]) -> None:
    """Adds rows recorded by another process."""
    with _lock:
        for r in other:
            key = _key(r["kind"], r["dtype"] or "", r["operator"] or "")
            if key not in _rows:
                _rows[key] = dict(r, count=0, operators={}) if r["kind"] == DTYPE \
                    else dict(r, count=0)
            row = _rows[key]
            if r["kind"] == DTYPE:
                for op, n in r.get("operators", {}).items():
                    _add(row, op, n)
            else:
                _add(row, r["operator"], r["count"])


def _write(path: str) -> None:
    data = rows()
    if not data:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)
