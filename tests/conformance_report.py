"""Runs the full OpInfo and module_db sweeps in chunks and writes
docs/conformance.md.

    python tests/conformance_report.py --run          # sweep + report (make conformance)
    python tests/conformance_report.py                # report from existing results
    python tests/conformance_report.py --run --categories linalg,fft
    python tests/conformance_report.py --run --categories module_db

The OpInfo sweep is tests/test_opinfo.py with TORCH_MPS_EXT_OPINFO=full, one
pytest process per op category (results in build/conformance/<category>.xml,
JUnit XML); the category `module_db` is tests/test_module_db.py with
TORCH_MPS_EXT_MODULEDB=full (build/conformance/module_db.xml). They run one
after the other under `nice`. The report is generated from those files only:
never edit docs/conformance.md by hand, except what follows its KEPT_MARKER
(the test-mps runs' tables and "PyTorch's device-generic test files": results
of PyTorch's own test files from runs this script does not make);
regenerating the page carries that part over unchanged.
"""

import argparse
import collections
import datetime
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "build" / "conformance"
REPORT = ROOT / "docs" / "conformance.md"
CATEGORIES = ["binary", "unary", "reduction", "fft", "linalg", "special",
              "masked", "signal", "sparse", "random/uninitialized",
              "nn.functional", "other"]
KINDS = ["forward", "out", "inplace", "grad"]
NAME = re.compile(r"^test_(forward|out|inplace|grad)_(.+)_mps_ext_(\w+)$")
# The module_db sweep (tests/test_module_db.py): one more category.
MODULE_DB = "module_db"
MODULE_KINDS = ["forward", "backward"]
MODULE_NAME = re.compile(
    r"^test_(forward|backward)_(nn_\w+?)(?:_(train|eval)_mode)?_mps_ext_(\w+)$")
TEST_FILES = {MODULE_DB: "test_module_db.py"}
SWEEP_ENV = {MODULE_DB: {"TORCH_MPS_EXT_MODULEDB": "full"}}
# Skips that mean "CPU itself cannot run this case": not counted.
NOT_APPLICABLE = ("no sample input runs", "no sample input is differentiable")


def result_file(category):
    return RESULTS / (category.replace("/", "_").replace(".", "_") + ".xml")


def run(categories):
    """One pytest process per category. A test that kills the process
    (segfault, abort) is recorded as crashed in <category>.crashed and
    deselected, and the category is run again."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Each category runs on a fresh copy of the built package, so rebuilding
    # in place while the sweep runs cannot pull a shared object from under a
    # running process; each category picks up the latest build.
    snap = RESULTS / "pkg"
    base_env = dict(os.environ, TORCH_MPS_EXT_OPINFO="full",
                    PYTHONPATH=os.pathsep.join(filter(None, [str(snap), str(ROOT),
                                                             os.environ.get("PYTHONPATH")])))
    for c in categories:
        shutil.rmtree(snap, ignore_errors=True)
        shutil.copytree(ROOT / "torch_mps_ext", snap / "torch_mps_ext")
        env = dict(base_env, **SWEEP_ENV.get(c, {}))
        if c != MODULE_DB:
            env["TORCH_MPS_EXT_OPINFO_CATEGORIES"] = c
        test_file = "tests/" + TEST_FILES.get(c, "test_opinfo.py")
        xml, crashed_file = result_file(c), result_file(c).with_suffix(".crashed")
        crashed = []
        xml.unlink(missing_ok=True)
        crashed_file.unlink(missing_ok=True)
        while True:
            print(f"== {c} ({datetime.datetime.now():%H:%M:%S})", flush=True)
            cmd = ["nice", sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                   str(ROOT / test_file), f"--junitxml={xml}"]
            for t in crashed:
                cmd.append(f"--deselect={test_file}::{t}")
            proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
            tail = proc.stdout.strip().splitlines()[-1:] or [""]
            print(tail[0], flush=True)
            if xml.exists():
                break
            started = re.findall(rf"^{re.escape(test_file)}::(\S+) ", proc.stdout, re.M)
            finished = set(re.findall(rf"^{re.escape(test_file)}::(\S+) "
                                      r"(?:PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR)",
                                      proc.stdout, re.M))
            victims = [t for t in started if t not in finished]
            if not victims:
                print(proc.stdout[-3000:])
                break
            crashed.append(victims[-1])
            print(f"   crashed in {victims[-1]}; running the rest again", flush=True)
            crashed_file.write_text("\n".join(crashed) + "\n")


def outcome(case):
    """passed / failed / xfailed / skipped-expectation / skipped-opinfo / n/a"""
    for child in case:
        tag = child.tag
        msg = child.get("message", "") or ""
        if tag in ("failure", "error"):
            return "failed", msg
        if tag == "skipped":
            if child.get("type") == "pytest.xfail" or "expected failure" in msg.lower():
                return "xfailed", msg
            if any(m in msg for m in NOT_APPLICABLE):
                return "n/a", msg
            if "expectation:" in msg:
                return "skipped", msg
            return "skipped-opinfo", msg
    return "passed", ""


def load():
    """{category: {kind: Counter(outcome)}}, per-(kind, op, dtype) outcomes."""
    table = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
    cases = []
    seen = []
    for c in CATEGORIES:
        f = result_file(c)
        if not f.exists():
            continue
        seen.append(c)
        # <category>.rerun.xml (tests run again after a fix) overrides.
        rerun = {}
        if f.with_suffix(".rerun.xml").exists():
            for case in ET.parse(f.with_suffix(".rerun.xml")).getroot().iter("testcase"):
                rerun[case.get("name")] = case
        for case in ET.parse(f).getroot().iter("testcase"):
            case = rerun.get(case.get("name"), case)
            m = NAME.match(case.get("name", ""))
            if not m:
                continue
            kind, op, dtype = m.groups()
            o, msg = outcome(case)
            table[c][kind][o] += 1
            cases.append((c, kind, op, dtype, o, msg))
        crashed = f.with_suffix(".crashed")
        if crashed.exists():
            for line in crashed.read_text().split():
                m = NAME.match(line.split("::")[-1])
                if m:
                    kind, op, dtype = m.groups()
                    table[c][kind]["failed"] += 1
                    cases.append((c, kind, op, dtype, "failed", "crashed the process"))
    return seen, table, cases


# module_db: the family of a module (ModuleInfo.name), for the per-family table.
MODULE_FAMILIES = [
    ("recurrent", re.compile(r"^nn\.(RNN|GRU|LSTM)(Cell)?$")),
    ("attention/transformer", re.compile(r"^nn\.(Transformer\w*|MultiheadAttention)$")),
    ("convolution", re.compile(r"^nn\.(Lazy)?Conv")),
    ("pooling", re.compile(r"Pool")),
    ("normalization", re.compile(r"Norm")),
    ("loss", re.compile(r"Loss$")),
    ("padding", re.compile(r"Pad\dd$")),
    ("linear/embedding", re.compile(r"^nn\.(Linear|Bilinear|Embedding)$")),
    ("random (added)", re.compile(r"^nn\.(\w*Dropout\w*|RReLU)$")),
    ("activation", re.compile(r".")),
]


def module_family(name):
    return next(f for f, pat in MODULE_FAMILIES if pat.search(name))


def load_module_db():
    """None when module_db did not run; else (Counter per kind, per-family
    {family: {kind: Counter}}, cases [(kind, module, mode, dtype, outcome, msg)])."""
    f = result_file(MODULE_DB)
    if not f.exists():
        return None
    total = {k: collections.Counter() for k in MODULE_KINDS}
    families = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
    cases = []

    def add(kind, module, mode, dtype, o, msg):
        name = module.replace("nn_", "nn.", 1)
        total[kind][o] += 1
        families[module_family(name)][kind][o] += 1
        cases.append((kind, name, mode, dtype, o, msg))

    rerun = {}
    if f.with_suffix(".rerun.xml").exists():
        for case in ET.parse(f.with_suffix(".rerun.xml")).getroot().iter("testcase"):
            rerun[case.get("name")] = case
    for case in ET.parse(f).getroot().iter("testcase"):
        case = rerun.get(case.get("name"), case)
        m = MODULE_NAME.match(case.get("name", ""))
        if m:
            add(*m.groups(), *outcome(case))
    crashed = f.with_suffix(".crashed")
    if crashed.exists():
        for line in crashed.read_text().split():
            m = MODULE_NAME.match(line.split("::")[-1])
            if m:
                add(*m.groups(), "failed", "crashed the process")
    return total, families, cases


def module_db_section(w, results):
    from module_db_expectations import EXPECTATIONS, RANDOM_MODULES
    from torch.testing._internal.common_modules import module_db

    w("## module_db: nn modules vs CPU\n")
    if results is None:
        w(f"**Not run in this report** (`CONFORMANCE_CATEGORIES={MODULE_DB}` runs it).\n")
        return
    total, families, cases = results
    w(f"Every ModuleInfo of `torch.testing._internal.common_modules.module_db` "
      f"({len(module_db)} modules) plus {len(RANDOM_MODULES)} random modules it lacks "
      "(the dropout family and RReLU), through `instantiate_device_type_tests` and "
      "torch's `@modules` (`tests/test_module_db.py`, `TORCH_MPS_EXT_MODULEDB=full`). "
      "A case is one (test, module, dtype, mode): float32 and float64, train and eval "
      "mode for modules whose ModuleInfo says they differ. Each sample input builds the "
      "module on CPU and a deep copy moved with `.to(\"mps_ext\")` (lazy modules: "
      "materialized on each side, then CPU's state_dict loaded), forward inputs copied "
      "with the same strides; up to 40 samples per case plus a channels_last run of the "
      "first 4-D/5-D one. `forward`: outputs (value, dtype, shape, strides, device, "
      "aliasing of inputs), inputs and buffers after the forward vs CPU; `backward`: "
      "`autograd.backward` with the same random cotangent, every parameter's and input's "
      "`.grad` vs CPU. Random modules in training mode are checked by statistics and "
      "self-consistency (list below), not by value.\n")
    w("| test | passed | failed | xfail | skip (list) | n/a | pass rate |")
    w("|---|---|---|---|---|---|---|")
    for k in MODULE_KINDS:
        t = total[k]
        p, n = rate(t)
        w(f"| {k} | {t['passed']} | {t['failed']} | {t['xfailed']} | {t['skipped']} | "
          f"{t['n/a']} | **{pct(p, n)}** |")
    both = total["forward"] + total["backward"]
    p, n = rate(both)
    w(f"| all | {both['passed']} | {both['failed']} | {both['xfailed']} | "
      f"{both['skipped']} | {both['n/a']} | **{pct(p, n)}** |")
    w("")
    w("Per family (passed / cases that run on CPU, xfail + skip from the list):\n")
    w("| family | modules | " + " | ".join(MODULE_KINDS) + " |")
    w("|---|---|" + "---|" * len(MODULE_KINDS))
    members = collections.defaultdict(set)
    for _, name, *_ in cases:
        members[module_family(name)].add(name)
    for fam, _ in MODULE_FAMILIES:
        if fam not in families:
            continue
        cells = []
        for k in MODULE_KINDS:
            t = families[fam][k]
            p, n = rate(t)
            extra = t["xfailed"] + t["skipped"]
            cells.append(f"{p}/{n}" + (f" ({extra})" if extra else "") if n else "-")
        w(f"| {fam} | {len(members[fam])} | " + " | ".join(cells) + " |")
    w("")
    failed = sorted(x for x in cases if x[4] == "failed")
    w("### module_db failures not in the expectation list\n")
    if failed:
        for kind, name, mode, dtype, _, msg in failed:
            first = msg.splitlines()[0][:200] if msg else ""
            w(f"- `{kind}` {name}{f' ({mode} mode)' if mode else ''} {dtype}: {first}")
    else:
        w("None.")
    w("")
    w("### module_db expectation list (tests/module_db_expectations.py)\n")
    rows = [(name, e) for name, entries in EXPECTATIONS.items() for e in entries]
    if rows:
        w("| module | tests | dtypes | mode | action | reason |")
        w("|---|---|---|---|---|---|")
        for name, e in rows:
            d = ", ".join(str(x).replace("torch.", "") for x in e.dtypes) if e.dtypes else "all"
            mode = "both" if e.training is None else ("train" if e.training else "eval")
            w(f"| {name} | {', '.join(e.kinds)} | {d} | {mode} | {e.action} | {e.reason} |")
    else:
        w("Empty: no module_db case is listed as xfail or skip.")
    w("")
    w("### Random modules (compared by statistics in training mode)\n")
    w("| module | check |")
    w("|---|---|")
    for name, why in RANDOM_MODULES.items():
        w(f"| {name} | {why} |")
    w("")


def rate(counter):
    ran = sum(counter[k] for k in ("passed", "failed", "xfailed", "skipped"))
    return counter["passed"], ran


def pct(p, n):
    return f"{100.0 * p / n:.2f}%" if n else "-"


# docs/conformance.md from this line on is kept as it is when the page is
# regenerated: the test_mps.py section (python -m torch_mps_ext.fidelity test-mps).
KEPT_MARKER = "<!-- Kept on regeneration: the sections below are written by hand or by other tools (test-mps runs, the device-generic files' counts). -->"


def report():
    sys.path.insert(0, str(ROOT / "tests"))
    from opinfo_expectations import EXPECTATIONS, NONDETERMINISTIC_OPS

    seen, table, cases = load()
    missing = [c for c in CATEGORIES if c not in seen]
    modules = load_module_db()
    total = {k: collections.Counter() for k in KINDS}
    for c in seen:
        for k in KINDS:
            total[k].update(table[c][k])

    out = []
    w = out.append
    w("# OpInfo and module_db conformance of mps_ext\n")
    w("<!-- Generated by `make conformance` (tests/conformance_report.py) from "
      "build/conformance/*.xml. Do not edit by hand. -->\n")
    w(f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M} with torch "
      f"{_torch_version()} by `make conformance` (= `python "
      "tests/conformance_report.py --run`; `CONFORMANCE_CATEGORIES=linalg,fft` "
      "for some categories; `python tests/conformance_report.py` regenerates "
      "this page from the results in build/conformance/). OpInfo first, "
      "then [module_db](#module_db-nn-modules-vs-cpu).\n")
    w("Every OpInfo of `torch.testing._internal.common_methods_invocations.op_db` "
      "runs on mps_ext and on an exact CPU copy of its sample inputs "
      "(`tests/test_opinfo.py`, instantiated by torch's "
      "`instantiate_device_type_tests` through `PrivateUse1TestBase`). A case is "
      "one (test kind, op, dtype); dtypes are those the OpInfo lists for CPU "
      "(gradients: float32 and complex64 where the op supports them). "
      "`forward`: results, strides, devices and untouched inputs vs CPU; `out`: "
      "the `out=` overload with exact-size and empty (resized) outputs; "
      "`inplace`: the in-place variant returns `self` and matches CPU; `grad`: "
      "`autograd.grad` with the same cotangents vs CPU. Random and "
      f"uninitialized-memory ops ({len(NONDETERMINISTIC_OPS)} OpInfos) compare "
      "shape, dtype and device only. Up to 40 sample inputs per case, evenly "
      "spread over the OpInfo's list, plus non-contiguous copies of the first "
      "two.\n")
    w("Pass rate = passed / (cases that run on CPU): cases where CPU itself "
      "raises on every sample are not counted (`n/a`); `skip (OpInfo)` are "
      "skips that op_db itself declares for every device.\n")
    if missing:
        w(f"**Not run in this report:** {', '.join(missing)}.\n")

    w("## Summary\n")
    w("| test | passed | failed | xfail | skip (list) | skip (OpInfo) | n/a | pass rate |")
    w("|---|---|---|---|---|---|---|---|")
    for k in KINDS:
        t = total[k]
        p, n = rate(t)
        w(f"| {k} | {t['passed']} | {t['failed']} | {t['xfailed']} | {t['skipped']} | "
          f"{t['skipped-opinfo']} | {t['n/a']} | **{pct(p, n)}** |")
    w("")

    w("## Per category\n")
    w("Each cell: passed / cases that run on CPU (xfail + skip from the list).\n")
    w("| category | " + " | ".join(KINDS) + " |")
    w("|---|" + "---|" * len(KINDS))
    for c in seen:
        cells = []
        for k in KINDS:
            t = table[c][k]
            p, n = rate(t)
            extra = t["xfailed"] + t["skipped"]
            cells.append(f"{p}/{n}" + (f" ({extra})" if extra else "") if n else "-")
        w(f"| {c} | " + " | ".join(cells) + " |")
    w("")

    failed = [x for x in cases if x[4] == "failed"]
    w("## Failures not in the expectation list\n")
    if failed:
        for c, kind, op, dtype, _, msg in sorted(failed):
            w(f"- `{kind}` {op} {dtype}: {msg.splitlines()[0][:160] if msg else ''}")
    else:
        w("None.")
    w("")

    w("## Expectation list (tests/opinfo_expectations.py)\n")
    if EXPECTATIONS:
        w("| test | op | dtypes | action | reason |")
        w("|---|---|---|---|---|")
        for e in EXPECTATIONS:
            d = ", ".join(str(x).replace("torch.", "") for x in e.dtypes) if e.dtypes else "all"
            w(f"| {e.kind} | {e.op} | {d} | {e.action} | {e.reason} |")
    else:
        w("Empty.")
    w("")

    module_db_section(w, modules)

    w("## Running PyTorch's own test files against mps_ext\n")
    w(RUN_UPSTREAM)
    # Sections written by other tools (from KEPT_MARKER on) survive regeneration.
    if REPORT.exists() and KEPT_MARKER in REPORT.read_text():
        w(KEPT_MARKER + REPORT.read_text().split(KEPT_MARKER, 1)[1].rstrip("\n"))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(out) + "\n")
    print(f"wrote {REPORT}")
    for k in KINDS:
        p, n = rate(total[k])
        print(f"{k}: {p}/{n} = {pct(p, n)}")
    if modules is not None:
        for k in MODULE_KINDS:
            p, n = rate(modules[0][k])
            print(f"module_db {k}: {p}/{n} = {pct(p, n)}")


RUN_UPSTREAM = """torch's device-generic test files instantiate `PrivateUse1TestBase`
classes (tests named `..._mps_ext`) once mps_ext is registered before
`torch.testing._internal.common_device_type` is imported. From a PyTorch
source checkout at the installed version (details, and a checked run of
upstream's test_view_ops.py, in docs/testing.md):

```sh
git clone --depth 1 --branch v2.13.0 https://github.com/pytorch/pytorch /tmp/pytorch
cd /tmp/pytorch/test
export PYTHONPATH=/path/to/torch_mps_ext          # not needed after `make build`
export TORCH_TEST_DEVICES=/path/to/torch_mps_ext/tests/mps_ext_test_base.py
export PYTORCH_TESTING_DEVICE_ONLY_FOR=privateuse1
python -m pytest test_view_ops.py -q -rfEs
python -m pytest test_ops.py -k "TestCommon and test_compare_cpu and mps_ext" -q
python -m pytest test_torch.py test_nn.py -k mps_ext -q
```
"""


def _torch_version():
    try:
        import torch
        return torch.__version__
    except Exception:  # noqa: BLE001
        return "?"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="store_true", help="run the sweep first")
    ap.add_argument("--categories", default=",".join(CATEGORIES + [MODULE_DB]))
    args = ap.parse_args()
    if args.run:
        run([c for c in args.categories.split(",") if c])
    report()


if __name__ == "__main__":
    main()
