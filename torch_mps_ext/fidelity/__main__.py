r"""``python -m torch_mps_ext.fidelity [--report FILE.json] (SCRIPT.py | -m MODULE) [ARGS...]``

Runs a program on mps_ext in MPS fidelity mode, with the CPU fallback on so
that it runs to the end, and records every incompatibility with Apple's MPS
backend instead of stopping at the first: operators without an MPS kernel
and float64/complex128 tensors (recorded, not raised), each with a count and
the first place in the program's own code that met it. Operators MPS runs
on the CPU (with a warning) are listed apart. At exit it prints a table on
stderr and, with ``--report``, writes it as JSON.

Exit status: the program's own if it failed; else 1 if it met any
incompatibility; else 0. So ``python -m torch_mps_ext.fidelity -m pytest
tests/`` is a CI step. Processes the program starts are covered too (they
inherit ``TORCH_MPS_EXT_FIDELITY_REPORT``); see docs/fidelity.md.

``python -m torch_mps_ext.fidelity test-mps PATH/TO/test_mps.py`` runs a copy
of PyTorch's own MPS test file against mps_ext in this mode and prints, per
test class, what ran as on a Mac and every difference with its reason
(``_testmps.py``, docs/testing.md).
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sys
import tempfile
import traceback

USAGE = ("usage: python -m torch_mps_ext.fidelity [--report FILE.json] "
         "(SCRIPT.py | -m MODULE) [ARGS...]\n"
         "       python -m torch_mps_ext.fidelity test-mps [--macos X.Y] [--report FILE.json] "
         "PATH/TO/test_mps.py [PYTEST ARGS...]")


def _parse(argv: list[str]):
    report = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            print(USAGE)
            print(__doc__.split("\n", 2)[2].strip())
            raise SystemExit(0)
        if a == "--report":
            if i + 1 >= len(argv):
                _usage_error("--report needs a file name")
            report = argv[i + 1]
            i += 2
        elif a.startswith("--report="):
            report = a.split("=", 1)[1]
            i += 1
        elif a == "-m":
            if i + 1 >= len(argv):
                _usage_error("-m needs a module name")
            return report, None, argv[i + 1], argv[i + 2:]
        elif a.startswith("-"):
            _usage_error(f"unknown option {a}")
        else:
            return report, a, None, argv[i + 1:]
    _usage_error("no program given")


def _usage_error(message: str):
    print(f"{USAGE}\nerror: {message}", file=sys.stderr)
    raise SystemExit(2)


def _exit_code(e: SystemExit) -> int:
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run(script: str | None, module: str | None, args: list[str]) -> int:
    try:
        if module is not None:
            sys.argv = [module, *args]  # runpy puts the module's path in argv[0]
            if sys.path[0] != os.getcwd() and "" not in sys.path[:1]:
                sys.path.insert(0, os.getcwd())  # as `python -m MODULE` does
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [script, *args]
            sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT`
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        return _exit_code(e)
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130
    except BaseException:  # noqa: BLE001 - the program's failure is its status
        traceback.print_exc()
        return 1
    return 0


def _table(rows: list[dict], torch_version: str) -> str:
    from ._report import INCOMPATIBLE

    bad = [r for r in rows if r["kind"] in INCOMPATIBLE]
    cpu = [r for r in rows if r["kind"] not in INCOMPATIBLE]
    lines = [f"torch_mps_ext.fidelity: MPS compatibility report (torch {torch_version})"]
    if not bad:
        lines.append("No incompatibility with Apple's MPS backend found.")
    else:
        lines.append(f"{len(bad)} incompatibilit{'y' if len(bad) == 1 else 'ies'} with Apple's "
                     "MPS backend (each fails on a Mac):")

    def describe(r: dict) -> str:
        if r["kind"] == "dtype":
            ops = list(r["operators"])
            more = f", +{len(ops) - 3} more" if len(ops) > 3 else ""
            return f"{r['dtype']} ({', '.join(ops[:3])}{more})"
        return r["operator"]

    def block(title: str, part: list[dict]):
        if not part:
            return
        if title:
            lines.append(title)
        width = max(len(describe(r)) for r in part)
        lines.append(f"  {'kind':<9} {'what':<{width}} {'count':>6}  first seen at")
        for r in part:
            lines.append(f"  {r['kind']:<9} {describe(r):<{width}} {r['count']:>6}  {r['first']}")

    block("", bad)
    block("Run on the CPU by MPS (they work on a Mac, with a warning):", cpu)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["test-mps"]:
        from . import _testmps

        return _testmps.main(argv[1:])
    report_path, script, module, args = _parse(argv)
    import torch

    from . import _report

    command = ([sys.executable, "-m", "torch_mps_ext.fidelity"]
               + (["-m", module] if module else [script]) + list(args))
    children = tempfile.mkdtemp(prefix="torch_mps_ext-fidelity-")
    os.environ["TORCH_MPS_EXT_FIDELITY_REPORT"] = children  # processes it starts
    _report.start()
    try:
        status = _run(script, module, args)
    finally:
        for name in sorted(os.listdir(children)):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(children, name), encoding="utf-8") as f:
                        _report.merge(json.load(f))
                except (OSError, ValueError):
                    pass
        shutil.rmtree(children, ignore_errors=True)
        os.environ.pop("TORCH_MPS_EXT_FIDELITY_REPORT", None)
    rows = _report.rows()
    incompatible = _report.incompatible(rows)
    exit_status = status if status != 0 else (1 if incompatible else 0)
    sys.stdout.flush()
    print(_table(rows, torch.__version__), file=sys.stderr)
    if report_path:
        data = {
            "torch": torch.__version__,
            "command": command,
            "program_status": status,
            "exit_status": exit_status,
            "incompatibilities": incompatible,
            "cpu_fallbacks": [r for r in rows if r not in incompatible],
        }
        with open(report_path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        print(f"torch_mps_ext.fidelity: report written to {report_path}", file=sys.stderr)
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
