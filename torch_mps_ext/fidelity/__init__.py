r"""MPS fidelity mode: mps_ext fails where a Mac's MPS backend would fail.

``torch.mps_ext.set_fidelity("mps")`` (or ``TORCH_MPS_EXT_FIDELITY=mps`` at
import) makes the device refuse what Apple's MPS backend refuses, with MPS's
own error types and texts (``docs/fidelity.md``):

* float64 tensors created on the device, and float64/complex128 operands of
  a computation: ``TypeError`` (MPS creates and copies complex128 tensors
  but computes nothing on them);
* operators without an MPS kernel: ``NotImplementedError``; with
  ``PYTORCH_ENABLE_MPS_FALLBACK=1`` (read at import, as on MPS) they run, with
  MPS's ``UserWarning`` once per operator;
* memory: ``PYTORCH_MPS_HIGH/LOW_WATERMARK_RATIO`` over the ``_EXT_`` ones, and
  MPS's out-of-memory text.

Which operators have an MPS kernel comes from the installed torch's operator
table (``_optable.py``) corrected by ``mps_overrides.txt``; see
:func:`operator_table`. ``python -m torch_mps_ext.fidelity`` runs a program in
this mode and reports every incompatibility (``__main__.py``).

The default mode (``"off"``) checks nothing: the native core asks one relaxed
atomic flag where a check would go.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

from .. import _C, _settings
from ._datafile import records

MODES = ("off", "mps")

# Verdicts of operator_table(): MPS runs the operator ...
MPS = "mps"              # ... with its own kernel (table: dispatch MPS / delegate)
COMPOSITE = "composite"  # ... through a composite kernel (each callee judged alone)
ROUTE = "route"          # ... by another route; mps_ext reaches this op instead
CPU = "cpu"              # ... on the CPU, always, with the fallback warning
NONE = "none"            # not at all: MPS's error fallback (or CPU fallback)
# Override lines naming torch's own Python code (torch/<file>:<function>)
# that takes another branch on MPS, where it would compute in float32.
BRANCH = "branch"

_ACCEPTED = (MPS, COMPOSITE, ROUTE)
_NATIVE_VERDICT = {NONE: 1, CPU: 2}  # csrc/aten/Fidelity.h: Verdict

OVERRIDES_PATH = os.path.join(os.path.dirname(__file__), "mps_overrides.txt")


@dataclass(frozen=True)
class Verdict:
    name: str       # "aten::add.Tensor"
    verdict: str    # MPS, COMPOSITE, ROUTE, CPU or NONE
    why: str        # the table entry, or the override's reason
    source: str     # "table", "registered" (from Python, at import) or "override"

    @property
    def accepted(self) -> bool:
        """True when mps mode runs the operator without a word."""
        return self.verdict in _ACCEPTED


_lock = threading.Lock()
_table: dict[str, Verdict] | None = None
_pushed = False


def read_overrides(path: str = OVERRIDES_PATH) -> dict[str, tuple[str, str]]:
    """``{"aten::op.overload": (verdict, reason), "torch/file.py:function":
    ("branch", reason)}`` from the reviewed override file: one entry a line,
    ``name  verdict  reason`` (``#`` comments)."""
    out: dict[str, tuple[str, str]] = {}
    for number, line, parts in records(path, 3):
        ok = len(parts) == 3 and (
            (parts[0].startswith("aten::") and parts[1] in (MPS, ROUTE, CPU, NONE))
            or (parts[0].startswith("torch/") and ":" in parts[0] and parts[1] == BRANCH))
        if not ok:
            raise ValueError(f"{path}:{number}: expected '<aten::op> <mps|route|cpu|none> "
                             f"<reason>' or '<torch/file.py:function> branch <reason>', "
                             f"got {line!r}")
        if parts[0] in out:
            raise ValueError(f"{path}:{number}: {parts[0]} listed twice")
        out[parts[0]] = (parts[1], parts[2])
    return out


def torch_branches() -> dict[str, frozenset[str] | None]:
    """``{"_tensor_str.py": None (every function), "amp/grad_scaler.py":
    {"unscale_"}}``: torch's own Python code that takes another branch on MPS
    (``device.type == "mps"``), whose float64 a Mac never sees."""
    out: dict[str, set[str] | None] = {}
    for name, (verdict, _) in read_overrides().items():
        if verdict != BRANCH:
            continue
        path, _, function = name[len("torch/"):].rpartition(":")
        if function == "*":
            out[path] = None
        elif out.get(path, set()) is not None:
            out.setdefault(path, set()).add(function)
    return {k: (None if v is None else frozenset(v)) for k, v in out.items()}


_branches: dict[str, frozenset[str] | None] | None = None
_torch_dir = ""


def _excused() -> bool:
    """The native core asks this before refusing a float64/complex128: true
    when the Python code computing it is a torch branch listed in the
    override file (on a Mac that code computes in float32)."""
    from . import _devicebranches as branches

    if branches.excusing():
        return True
    if _branches is None:
        return False
    # The Python code that called into torch, or code it was called from: a
    # branch covers what it calls (torch.jit.trace's check converts, then
    # compares in torch.testing).
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.realpath(frame.f_code.co_filename)
        if filename.startswith(_torch_dir):
            functions = _branches.get(filename[len(_torch_dir):].replace(os.sep, "/"), False)
            if functions is None or (functions is not False and frame.f_code.co_name in functions):
                return True
        frame = frame.f_back
    return False


def operator_table() -> dict[str, Verdict]:
    """Every operator of the installed torch's table (and of the override
    file) with what MPS does with it: ``{"aten::name.overload": Verdict}``.
    Operators absent from it (other libraries' operators) are accepted."""
    global _table
    with _lock:
        if _table is None:
            from . import _optable

            entries = _optable.load()
            table = {f"aten::{name}": Verdict(f"aten::{name}", e.verdict, e.why, "table")
                     for name, e in entries.items()}
            # torch's own Python registers a few MPS kernels at import, on
            # every build (torch/_refs/linalg: linalg_lu_solve.out): a Mac
            # runs those operators though the table names no MPS kernel, and
            # their functional forms (structured delegates) through the
            # generated composite that calls them.
            from .._compat import python_mps_kernels

            lacking = [name for name, v in table.items() if v.verdict == NONE]
            registered = python_mps_kernels(lacking)
            for name, where in registered.items():
                table[name] = Verdict(name, MPS, f"MPS kernel registered from Python at {where}",
                                      "registered")
            for name, e in entries.items():
                target = f"aten::{e.delegate}" if e.delegate else None
                if target in registered and table[f"aten::{name}"].verdict == NONE:
                    table[f"aten::{name}"] = Verdict(
                        f"aten::{name}", MPS, f"structured_delegate: {e.delegate} (MPS kernel "
                        f"registered from Python at {registered[target]})", "registered")
            for name, (verdict, reason) in read_overrides().items():
                if verdict != BRANCH:
                    table[name] = Verdict(name, verdict, reason, "override")
            _table = table
        return _table


def shown_name(verdict: Verdict) -> str:
    """The operator MPS's error (or fallback warning) names for ``verdict``'s,
    or "" for its own. A structured operator's functional variant without an
    MPS kernel (``structured_delegate:`` in the table) runs, on a Mac, the
    CompositeExplicitAutogradNonFunctional kernel torch generates for it,
    which calls the out variant: MPS names that one
    (``aten::_linalg_svd.U`` for ``torch.linalg.matrix_rank``, as test_mps.py
    and common_mps say). mps_ext's fallback is the functional's kernel, so it
    reaches the functional itself."""
    prefix = "structured_delegate: "
    if verdict.source != "table" or not verdict.why.startswith(prefix):
        return ""
    delegate = verdict.why[len(prefix):].split(" ", 1)[0]
    from .._compat import has_kernel_for_dispatch_key

    if not has_kernel_for_dispatch_key(verdict.name, "CompositeExplicitAutogradNonFunctional"):
        return ""
    return f"aten::{delegate}"


def _push_table() -> None:
    global _pushed, _branches, _torch_dir
    if _pushed:
        return
    verdicts = [(name, _NATIVE_VERDICT[v.verdict], shown_name(v))
                for name, v in operator_table().items() if v.verdict in _NATIVE_VERDICT]
    _C._fidelity_set_verdicts(verdicts)
    from . import _commonmps

    _C._fidelity_set_dtype_refusals(_commonmps.refusals())
    import torch

    _torch_dir = os.path.realpath(os.path.dirname(torch.__file__)) + os.sep
    _branches = torch_branches()
    _C._fidelity_set_allowance(_excused)
    _pushed = True


def set_fidelity(mode: str) -> None:
    r"""Sets the fidelity mode: ``"mps"`` (behave like Apple's MPS backend:
    refuse float64 and operators MPS has no kernel for, with MPS's texts) or
    ``"off"`` (the default: accept everything a CPU accepts)."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"fidelity mode must be 'off' or 'mps', got {mode!r}")
    from . import _devicebranches as branches

    if mode == "mps":
        _push_table()
        branches.install()
    else:
        branches.uninstall()
    _C._fidelity_set_mode(mode == "mps")


def get_fidelity() -> str:
    r"""The current fidelity mode: ``"off"`` or ``"mps"``."""
    return "mps" if _C._fidelity_on() else "off"


def _configure_from_environment() -> None:
    """At import: TORCH_MPS_EXT_FIDELITY, PYTORCH_ENABLE_MPS_FALLBACK and, in
    processes started by ``python -m torch_mps_ext.fidelity``,
    TORCH_MPS_EXT_FIDELITY_REPORT (validated already by _settings)."""
    report_dir = _settings.get("TORCH_MPS_EXT_FIDELITY_REPORT")
    if report_dir:
        from . import _report

        _report.start(report_dir=report_dir)
        return
    _C._fidelity_set_options(
        cpu_fallback=bool(_settings.get("PYTORCH_ENABLE_MPS_FALLBACK", False)), record=False)
    if _settings.get("TORCH_MPS_EXT_FIDELITY", "off") == "mps":
        set_fidelity("mps")


__all__ = ["MODES", "Verdict", "get_fidelity", "operator_table", "read_overrides",
           "set_fidelity"]
