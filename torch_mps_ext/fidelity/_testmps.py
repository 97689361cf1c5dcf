r"""Runs a user's copy of PyTorch's ``test/test_mps.py`` against mps_ext in
MPS fidelity mode (``python -m torch_mps_ext.fidelity test-mps FILE``).

Nothing of PyTorch's file is kept in this package: the user points at their
own copy, and the device is rewritten mechanically when pytest imports it
(an import hook compiles a rewritten syntax tree; the file on disk and its
``__pycache__`` are untouched):

* the strings ``"mps"`` and ``"mps:N"`` (also inside f-strings, and quoted
  inside strings of code the tests run in a child ``python -c``) become
  ``"mps_ext"`` / ``"mps_ext:N"`` -- except where they name the *test
  framework's* device type, which stays ``"mps"`` so that every expectation
  keyed on it applies as on a Mac: ``only_for=`` / ``except_for=``,
  ``device_type=`` given to ``DecorateInfo`` or a ``*_modifier`` (common_mps's
  ``mps_ops_modifier``), and comparisons with ``….device_type``;
* ``torch.mps`` becomes ``torch.mps_ext`` (also in imports), ``t.is_mps``
  ``t.is_mps_ext`` and ``t.mps()`` ``t.mps_ext()``;
* ``torch.backends.mps.is_available()`` / ``is_built()`` answer True and
  ``is_macos_or_newer`` answers for the macOS version chosen with
  ``--macos`` (common_utils.MACOS_VERSION likewise), so that
  ``torch.testing._internal.common_mps`` defines its lists and test_mps.py
  applies them to itself as it does on a Mac;
* the framework's MPS test base keeps its device type ``"mps"`` and hands
  the tests the device ``"mps_ext:0"``;
* processes the tests start inherit ``TORCH_MPS_EXT_FIDELITY=mps`` (they
  import torch, which autoloads mps_ext when it is installed).

Each test's outcome is judged against what a Mac does (the file's own
expectations: ``expectedFailure`` and skips from common_mps, op_db and the
file itself): *as on a Mac* (passed, or skipped where a Mac skips), *MPS
failure reproduced* (an expected failure that fails here too), or a
*difference*: failed where a Mac passes, or passed where a Mac fails. A
difference gets the reason of the first matching line of
``test_mps_expectations.txt`` (Metal-only tests, host limits, MPS numerics,
...), else the exception it raised.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from ._datafile import records

EXPECTATIONS_PATH = os.path.join(os.path.dirname(__file__), "test_mps_expectations.txt")

# Outcomes of one test, judged against a Mac.
AS_ON_MAC = "as on a Mac"
REPRODUCED = "MPS failure reproduced"
FAILS_HERE = "fails where a Mac passes"
PASSES_HERE = "passes where a Mac fails"
# The copy of test_mps.py is not the installed torch's: the test uses a torch
# API this torch lacks (it fails on a Mac with this torch too), or a reviewed
# expectation says the copy tests another torch's behaviour ("version").
OTHER_TORCH = "needs another torch"

# "module 'torch._C' has no attribute 'X'", "cannot import name 'X' from 'torch...'"
# (torch.mps_ext's own gaps are ours: not matched)
_TORCH_LACKS = re.compile(r"(AttributeError: module 'torch(\.(?!mps_ext\b)[\w.]+)?' has no attribute"
                          r"|ImportError: cannot import name '\w+' from 'torch[\w.]*')")

# The mode models a current Mac (macOS 26, Tahoe): version-gated expectations in
# test_mps.py (`xfailIf(MACOS_VERSION < 15.1)`, ...) take their current-macOS side.
DEFAULT_MACOS = 26.0

# ---------------------------------------------------------------------------
# The rewrite


_MPS_STR = re.compile(r"^mps(:\d+)?$")
# Code inside strings (the snippets test_mps.py runs with `python -c`):
# a quoted 'mps' / "mps:0" in it.
_QUOTED_MPS = re.compile(r"""(?<=['"])mps(?=(?::\d+)?['"])""")
_FRAMEWORK_KEYWORDS = ("only_for", "except_for")


def _rewrite_str(s: str) -> str:
    m = _MPS_STR.match(s)
    if m:
        return "mps_ext" + (m.group(1) or "")
    return _QUOTED_MPS.sub("mps_ext", s)


def _call_name(node: ast.AST) -> str:
    f = node.func if isinstance(node, ast.Call) else node
    if isinstance(f, ast.Attribute):
        return f.attr
    if isinstance(f, ast.Name):
        return f.id
    return ""


def _is_torch(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "torch"


def _is_torch_backends(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "backends"
            and _is_torch(node.value))


class _Rewriter(ast.NodeTransformer):
    """The device rewrite (module docstring). ``count`` says how many
    places were rewritten, by kind."""

    def __init__(self):
        self.count: Counter = Counter()
        self._keep: set[int] = set()  # ids of string nodes naming the framework's device type

    def _keep_strings(self, node: ast.AST) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                self._keep.add(id(sub))

    def visit_Call(self, node: ast.Call):
        name = _call_name(node)
        for kw in node.keywords:
            if kw.arg in _FRAMEWORK_KEYWORDS or (
                    kw.arg == "device_type"
                    and (name == "DecorateInfo" or name.endswith("_modifier"))):
                self._keep_strings(kw.value)
        # t.mps() -> t.mps_ext() (not torch.backends.mps, not torch.mps)
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr == "mps" and not _is_torch(f.value)
                and not _is_torch_backends(f.value)):
            f.attr = "mps_ext"
            self.count["t.mps()"] += 1
        self.generic_visit(node)
        return node

    def visit_Compare(self, node: ast.Compare):
        sides = [node.left, *node.comparators]
        if any(isinstance(s, ast.Attribute) and s.attr == "device_type" for s in sides):
            for s in sides:
                self._keep_strings(s)
        self.generic_visit(node)
        return node

    def visit_Attribute(self, node: ast.Attribute):
        self.generic_visit(node)
        if node.attr == "mps" and _is_torch(node.value):
            node.attr = "mps_ext"
            self.count["torch.mps"] += 1
        elif node.attr == "is_mps":
            node.attr = "is_mps_ext"
            self.count["is_mps"] += 1
        return node

    def visit_Constant(self, node: ast.Constant):
        if isinstance(node.value, str) and id(node) not in self._keep:
            new = _rewrite_str(node.value)
            if new != node.value:
                self.count["'mps'"] += 1
                return ast.copy_location(ast.Constant(new), node)
        return node

    def visit_JoinedStr(self, node: ast.JoinedStr):
        # f"mps:{i}" -> f"mps_ext:{i}"
        for part in node.values:
            if (isinstance(part, ast.Constant) and isinstance(part.value, str)
                    and id(part) not in self._keep and part.value.startswith("mps:")):
                part.value = "mps_ext:" + part.value[4:]
                self.count["'mps'"] += 1
        self.generic_visit(node)
        return node

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level == 0 and node.module and (
                node.module == "torch.mps" or node.module.startswith("torch.mps.")):
            node.module = "torch_mps_ext" + node.module[len("torch.mps"):]
            self.count["import torch.mps"] += 1
        return node

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            if alias.name == "torch.mps" or alias.name.startswith("torch.mps."):
                # `import torch.mps` binds `torch`; torch.mps is then rewritten.
                alias.name = "torch_mps_ext" + alias.name[len("torch.mps"):]
                if alias.asname is None:
                    alias.asname = "_torch_mps_ext_unused"
                self.count["import torch.mps"] += 1
        return node


def rewrite(source: str, filename: str = "<test_mps>") -> tuple[ast.Module, Counter]:
    """The rewritten syntax tree of a test_mps.py source and what was
    rewritten: ``(tree, Counter({"'mps'": 1234, "torch.mps": 56, ...}))``."""
    tree = ast.parse(source, filename)
    r = _Rewriter()
    # Compare/Call exclusions must be known before their strings are met:
    # ast.NodeTransformer visits parents before children, so they are.
    tree = r.visit(tree)
    ast.fix_missing_locations(tree)
    return tree, r.count


class _Loader(importlib.abc.Loader):
    def __init__(self, path: str):
        self.path = path
        self.count: Counter = Counter()

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        with open(self.path, encoding="utf-8") as f:
            source = f.read()
        tree, self.count = rewrite(source, self.path)
        module.__file__ = self.path
        exec(compile(tree, self.path, "exec"), module.__dict__)  # noqa: S102 - the user's test file


class _Finder(importlib.abc.MetaPathFinder):
    """Hands the rewritten module to whoever imports the user's file (pytest,
    in any import mode), leaving every other import alone."""

    def __init__(self, path: str):
        self.path = os.path.realpath(path)
        self.loader = _Loader(self.path)

    def find_spec(self, fullname, path=None, target=None):
        stem = os.path.splitext(os.path.basename(self.path))[0]
        if fullname.rpartition(".")[2] != stem:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        origin = spec.origin if spec is not None else None
        if origin is None or os.path.realpath(origin) != self.path:
            if path is not None or fullname != stem:
                return None
            # pytest's importlib mode asks with the file's own directory
        return importlib.machinery.ModuleSpec(fullname, self.loader, origin=self.path)


# ---------------------------------------------------------------------------
# torch's testing internals: sample inputs that branch on the device type

# Sample functions of op_db and the dtype helpers pick float32/float16 where
# the device is MPS (`torch.device(device).type == "mps"`: no float64 there).
# They get device "mps_ext:0", so the branches are widened to take mps_ext
# as MPS: in memory, when the runner prepares, the installed files untouched.
def _sample_branch_modules() -> tuple[str, ...]:
    from .. import _compat

    return _compat.SAMPLE_BRANCH_MODULES
_MPS_TYPE_TEST = re.compile(r"torch\.device\((\w+)\)\.type == (['\"])mps\2")
# The same question asked of the device string (block_diag's mixed-dtype
# sample, _unsafe_masked_index_put_accumulate's normalized half values).
_MPS_STRING_TEST = re.compile(r"\bdevice == (['\"])mps:0\1")


def widen_sample_branches(source: str) -> tuple[str, int]:
    """``torch.device(d).type == "mps"`` -> ``... in ("mps", "mps_ext")``;
    ``device == "mps:0"`` -> ``device in ("mps:0", "mps_ext:0")``."""
    source, n = _MPS_TYPE_TEST.subn(r'torch.device(\1).type in ("mps", "mps_ext")', source)
    source, m = _MPS_STRING_TEST.subn(r'device in ("mps:0", "mps_ext:0")', source)
    return source, n + m


class _BranchLoader(importlib.abc.Loader):
    def __init__(self, spec):
        self.spec = spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        _exec_widened(module, self.spec.origin)


class _BranchFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _sample_branch_modules():
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None:
            return None
        return importlib.util.spec_from_file_location(fullname, spec.origin,
                                                      loader=_BranchLoader(spec))


def _exec_widened(module, origin: str) -> None:
    with open(origin, encoding="utf-8") as f:
        source, _ = widen_sample_branches(f.read())
    module.__file__ = origin
    exec(compile(source, origin, "exec"), module.__dict__)  # noqa: S102 - torch's own file, one branch widened


def _redefine_widened_functions(module) -> None:
    """For a module imported before the runner could rewrite it (common_dtype
    comes with ``import torch``): its top-level functions with the branch are
    redefined in place; everything else in it (classes, tables) is kept."""
    with open(module.__file__, encoding="utf-8") as f:
        source = f.read()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and not node.decorator_list:
            segment = ast.get_source_segment(source, node) or ""
            widened, n = widen_sample_branches(segment)
            if n:
                exec(compile(widened, module.__file__, "exec"), module.__dict__)  # noqa: S102


def _widen_torch_sample_branches() -> None:
    """Modules not yet imported are rewritten when imported (before op_db is
    built from them); already imported ones get their functions redefined."""
    if not any(isinstance(f, _BranchFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _BranchFinder())
    for name in _sample_branch_modules():
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            _redefine_widened_functions(module)


# ---------------------------------------------------------------------------
# The Mac the tests believe they run on


def prepare(macos: float = DEFAULT_MACOS) -> None:
    """Makes this process look like a Mac with MPS to PyTorch's test
    framework, with mps_ext in fidelity mode behind it. Call before the test
    file (or torch.testing's internals) is imported."""
    import torch
    import torch.backends.mps as backends_mps

    import torch_mps_ext

    from .. import _compat

    _widen_torch_sample_branches()  # before the framework imports op_db's modules
    torch_mps_ext.set_fidelity("mps")
    # Processes the tests start (test_mps.py runs `python -c` snippets that
    # import torch, which autoloads mps_ext) run in mps mode too.
    os.environ["TORCH_MPS_EXT_FIDELITY"] = "mps"
    major_minor = (int(macos), int(round((macos - int(macos)) * 10)))
    backends_mps.is_available = lambda: True
    backends_mps.is_built = lambda: True
    backends_mps.is_macos_or_newer = lambda major, minor: (major, minor) <= major_minor
    backends_mps.is_macos13_or_newer = lambda minor=0: (13, minor) <= major_minor
    t = _compat.testing_internals(macos_version=macos)

    def set_up_class(cls):
        cls.primary_device = "mps_ext:0"

    t.MPSTestBase.setUpClass = classmethod(set_up_class)
    _sysctl_on_path()
    del torch  # imported for its side effects on torch.backends


# macOS's sysctl keys test_mps.py reads (`sysctl -n hw.memsize` at import),
# answered for this host; other keys go to the system's sysctl.
_SYSCTL = """#!/bin/sh
if [ "$1" = "-n" ]; then
  case "$2" in
    hw.memsize) kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo); echo $((kb * 1024)); exit 0 ;;
    hw.ncpu|hw.logicalcpu|hw.physicalcpu) getconf _NPROCESSORS_ONLN; exit 0 ;;
  esac
fi
PATH="$MPSX_REAL_PATH" exec sysctl "$@"
"""


def _sysctl_on_path() -> None:
    import atexit
    import shutil
    import tempfile

    if os.environ.get("MPSX_REAL_PATH") is not None:
        return  # a child of a prepared process: PATH has the shim already
    d = tempfile.mkdtemp(prefix="mps_ext_test_mps_")
    atexit.register(shutil.rmtree, d, True)
    path = os.path.join(d, "sysctl")
    with open(path, "w") as f:
        f.write(_SYSCTL)
    os.chmod(path, 0o755)
    os.environ["MPSX_REAL_PATH"] = os.environ.get("PATH", "")
    os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")


# ---------------------------------------------------------------------------
# Expectations for differences


@dataclass(frozen=True)
class Expectation:
    pattern: str   # fnmatch pattern over "Class::test" (the nodeid's tail)
    category: str  # metal-only, host-limit, numerics, torch-branch, not-reproduced, defect, version
    reason: str


CATEGORIES = ("metal-only", "host-limit", "numerics", "torch-branch", "not-reproduced", "defect",
              "version")


def read_expectations(path: str = EXPECTATIONS_PATH) -> list[Expectation]:
    """The reviewed list of known differences: ``<pattern> <category> <reason>``
    a line (``#`` comments)."""
    out = []
    for number, line, parts in records(path, 3):
        if len(parts) != 3 or parts[1] not in CATEGORIES:
            raise ValueError(f"{path}:{number}: expected '<pattern> <{'|'.join(CATEGORIES)}> "
                             f"<reason>', got {line!r}")
        out.append(Expectation(*parts))
    return out


# ---------------------------------------------------------------------------
# The pytest plugin


@dataclass
class ClassTally:
    counts: Counter = field(default_factory=Counter)
    differences: list = field(default_factory=list)  # (test, outcome, reason)


def _first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("E "):
            return line[2:].strip()[:160]
    return (text.strip().splitlines() or [""])[-1][:160]


class Collector:
    """A pytest plugin: installs the import hook, judges every test."""

    # The report is rewritten every this many tests, so that a run of
    # thousands (hours on a small host) leaves its results if stopped.
    DUMP_EVERY = 100

    def __init__(self, path: str, expectations: list[Expectation] | None = None,
                 report: str | None = None, meta: dict | None = None):
        self.path = os.path.realpath(path)
        self.report = report
        self.meta = dict(meta or {})
        self._seen = 0
        self.finder = _Finder(self.path)
        self.expectations = read_expectations() if expectations is None else expectations
        self.classes: dict[str, ClassTally] = defaultdict(ClassTally)
        self.errors: list[str] = []

    # pytest hooks
    def pytest_configure(self, config):
        sys.meta_path.insert(0, self.finder)

    def pytest_unconfigure(self, config):
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)

    def pytest_collectreport(self, report):
        if report.failed:
            self.errors.append(f"{report.nodeid}: {_first_line(str(report.longrepr))}")

    def _expectation(self, test: str) -> Expectation | None:
        for e in self.expectations:
            if fnmatch.fnmatchcase(test, e.pattern):
                return e
        return None

    def _reason(self, test: str, fallback: str) -> str:
        e = self._expectation(test)
        return f"[{e.category}] {e.reason}" if e is not None else fallback

    def pytest_runtest_logreport(self, report):
        parts = report.nodeid.split("::")
        cls = parts[1] if len(parts) > 2 else "(module)"
        test = "::".join(parts[1:])
        tally = self.classes[cls]
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if report.skipped and hasattr(report, "wasxfail"):
                tally.counts[REPRODUCED] += 1
            elif report.skipped or report.passed:
                tally.counts[AS_ON_MAC] += 1
                if report.skipped:
                    tally.counts["skipped"] += 1
            elif report.failed:
                text = str(report.longrepr)
                if "Unexpected success" in text or getattr(report, "wasxfail", None) is not None:
                    outcome, why = PASSES_HERE, "unexpected success"
                else:
                    outcome, why = FAILS_HERE, _first_line(text)
                    e = self._expectation(test)
                    if _TORCH_LACKS.search(text) or (e is not None and e.category == "version"):
                        outcome = OTHER_TORCH
                tally.counts[outcome] += 1
                tally.differences.append((test, outcome, self._reason(test, why)))
            self._seen += 1
            if self.report and self._seen % self.DUMP_EVERY == 0:
                self.dump(finished=False)

    def dump(self, finished: bool = True, **extra) -> None:
        """Writes the JSON report (atomically: a reader never sees half)."""
        data = {**self.meta, **extra, "finished": finished, **self.as_json()}
        tmp = f"{self.report}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, self.report)

    # results
    def totals(self) -> Counter:
        total = Counter()
        for t in self.classes.values():
            total.update(t.counts)
        return total

    def table(self) -> str:
        cols = (AS_ON_MAC, REPRODUCED, FAILS_HERE, PASSES_HERE, OTHER_TORCH)
        width = max([len("class")] + [len(c) for c in self.classes])
        head = f"{'class':<{width}}  " + "  ".join(f"{c:>{len(c)}}" for c in cols)
        lines = ["torch_mps_ext.fidelity test-mps: outcomes judged against a Mac", head]
        for name in sorted(self.classes):
            counts = self.classes[name].counts
            lines.append(f"{name:<{width}}  " + "  ".join(f"{counts[c]:>{len(c)}}" for c in cols))
        total = self.totals()
        lines.append(f"{'total':<{width}}  " + "  ".join(f"{total[c]:>{len(c)}}" for c in cols))
        diffs = [(c, *d) for c, t in sorted(self.classes.items()) for d in t.differences]
        if diffs:
            lines.append("")
            lines.append("Differences, by reason:")
            by_reason: dict[str, list] = defaultdict(list)
            for cls, test, outcome, reason in diffs:
                by_reason[f"{outcome}: {reason}"].append(test)
            for reason, tests in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
                more = f" (+{len(tests) - 2} more)" if len(tests) > 2 else ""
                lines.append(f"  {len(tests):>5}  {reason}")
                lines.append(f"         e.g. {', '.join(tests[:2])}{more}")
        for e in self.errors:
            lines.append(f"collection error: {e}")
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {
            "file": self.path,
            "rewritten": dict(self.finder.loader.count),
            "classes": {name: {"counts": dict(t.counts),
                               "differences": [{"test": d[0], "outcome": d[1], "reason": d[2]}
                                               for d in t.differences]}
                        for name, t in sorted(self.classes.items())},
            "totals": dict(self.totals()),
            "collection_errors": self.errors,
        }


USAGE = ("usage: python -m torch_mps_ext.fidelity test-mps PATH/TO/test_mps.py "
         "[--macos X.Y] [--report FILE.json] [PYTEST ARGS...]")


def main(argv: list[str]) -> int:
    """``test-mps FILE [--macos X.Y] [--report F.json] [pytest args]``: exit
    status 0 when every test ran as on a Mac, 1 on any difference, pytest's
    own status (>1) when it could not run."""
    macos, report, path = DEFAULT_MACOS, None, None
    i = 0
    while i < len(argv) and path is None:  # our options come before the file
        a = argv[i]
        if a in ("-h", "--help"):
            print(USAGE)
            print(__doc__.strip())
            return 0
        if a in ("--macos", "--report"):
            if i + 1 >= len(argv):
                print(f"{USAGE}\nerror: {a} needs a value", file=sys.stderr)
                return 2
            if a == "--macos":
                try:
                    macos = float(argv[i + 1])
                except ValueError:
                    print(f"{USAGE}\nerror: --macos must be a version like 15.0, got "
                          f"{argv[i + 1]!r}", file=sys.stderr)
                    return 2
            else:
                report = argv[i + 1]
            i += 2
        elif a.startswith("-"):
            print(f"{USAGE}\nerror: unknown option {a} (pytest's options go after the file)",
                  file=sys.stderr)
            return 2
        else:
            path = a
            i += 1
    rest = argv[i:]
    if path is None:
        print(f"{USAGE}\nerror: no test file given", file=sys.stderr)
        return 2
    if not os.path.isfile(path):
        print(f"{USAGE}\nerror: {path}: no such file", file=sys.stderr)
        return 2
    import pytest

    prepare(macos)
    collector = Collector(path, report=report, meta={"macos": macos})
    status = pytest.main([path, "--assert=plain", "-p", "no:cacheprovider", *rest],
                         plugins=[collector])
    sys.stdout.flush()
    print(collector.table(), file=sys.stderr)
    if report:
        collector.dump(finished=True, pytest_status=int(status))
        print(f"torch_mps_ext.fidelity test-mps: report written to {report}", file=sys.stderr)
    total = collector.totals()
    if int(status) not in (0, 1):  # interrupted, internal or usage error, nothing collected
        return int(status)
    return 1 if (total[FAILS_HERE] or total[PASSES_HERE] or collector.errors) else 0
