r"""Which ATen operators have a kernel on Apple's MPS backend, read from the
installed torch's own operator table.

torch ships ``torchgen/packaged/ATen/native/native_functions.yaml``: one
entry per operator (``- func: name.overload(schema) -> returns``) with the
backends its kernels are registered for (``dispatch:``), or the structured
operator it delegates to (``structured_delegate:``), or none of these (a
``CompositeImplicitAutograd`` decomposition, which runs on every backend).
The MPS build of the same torch registers exactly these kernels, so reading
this file answers "does a Mac's MPS backend have a kernel for this operator?"
for the torch that is installed; a newer torch brings its own table.

The file is YAML, but only a small regular subset of it matters here (and
PyYAML is not a dependency of torch): entries start with ``- func:``; their
keys are indented two spaces; the ``dispatch:`` block's lines are indented
four spaces, ``Key1, Key2: kernel``. That subset is parsed line by line.

Verdicts (:data:`MPS`, :data:`COMPOSITE`, :data:`NONE`):

* ``mps`` — the ``dispatch:`` block names the ``MPS`` key, or the structured
  delegate's does;
* ``composite`` — a composite kernel (``CompositeImplicitAutograd``, explicit
  ``CompositeExplicitAutograd[NonFunctional]``, or no ``dispatch:`` at all)
  runs for MPS too; it calls other operators, each judged on its own;
* ``none`` — kernels for other backends only: MPS has none.

Operators generated from an entry (``autogen:``) get composite kernels.
``mps_overrides.txt`` beside this file corrects the table where MPS's
registrations live outside it (see :func:`overrides`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MPS = "mps"
COMPOSITE = "composite"
NONE = "none"

_COMPOSITE_KEYS = frozenset({
    "CompositeImplicitAutograd",
    "CompositeExplicitAutograd",
    "CompositeExplicitAutogradNonFunctional",
})


@dataclass(frozen=True)
class Entry:
    name: str        # "add.Tensor", "linalg_eig" (no namespace)
    verdict: str     # MPS, COMPOSITE or NONE
    why: str         # what in the table gave the verdict
    delegate: str | None = None  # the structured_delegate's name, if any


def table_path() -> str:
    """The installed torch's native_functions.yaml."""
    from .._compat import native_functions_yaml

    return native_functions_yaml()


_FUNC = re.compile(r"^- func:\s*([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)\(")


def _parse(text: str) -> list[dict]:
    entries: list[dict] = []
    cur: dict | None = None
    block = None  # the current two-space key with a nested block
    for line in text.splitlines():
        if line.startswith("- func:"):
            m = _FUNC.match(line)
            cur = {"name": m.group(1) if m else None, "dispatch": None,
                   "delegate": None, "autogen": []}
            entries.append(cur)
            block = None
            continue
        if cur is None or not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("  ") and not line.startswith("   "):
            key, _, value = line.strip().partition(":")
            value = value.split("#", 1)[0].strip()
            block = key
            if key == "dispatch":
                cur["dispatch"] = []
            elif key == "structured_delegate":
                cur["delegate"] = value
            elif key == "autogen":
                cur["autogen"] = [v.strip() for v in value.split(",") if v.strip()]
            continue
        if block == "dispatch" and line.startswith("    "):
            keys, sep, _ = line.strip().partition(":")
            if sep:
                cur["dispatch"].extend(k.strip() for k in keys.split(","))
    return [e for e in entries if e["name"]]


def load(path: str | None = None) -> dict[str, Entry]:
    """{"add.Tensor": Entry, ...} for every operator of the table (names
    without the ``aten::`` namespace; an empty overload has no dot)."""
    with open(path or table_path(), encoding="utf-8") as f:
        raw = _parse(f.read())
    by_name = {e["name"]: e for e in raw}

    def judge(e: dict, depth: int = 0) -> tuple[str, str]:
        keys = e["dispatch"]
        if keys is not None:
            if "MPS" in keys:
                return MPS, "dispatch: MPS"
            composite = sorted(_COMPOSITE_KEYS.intersection(keys))
            if composite:
                return COMPOSITE, "dispatch: " + composite[0]
        if e["delegate"]:
            target = by_name.get(e["delegate"])
            if target is None or depth > 4:
                return NONE, f"structured_delegate: {e['delegate']} (not in the table)"
            verdict, why = judge(target, depth + 1)
            return verdict, f"structured_delegate: {e['delegate']} ({why})"
        if keys is not None:
            # Kernels for other backends (or layouts) only.
            dense = [k for k in keys if k in ("CPU", "CUDA", "XPU", "MTIA", "HPU")]
            return NONE, "dispatch: " + ", ".join(dense or keys) + " (no MPS)"
        return COMPOSITE, "no dispatch: CompositeImplicitAutograd"

    table: dict[str, Entry] = {}
    for e in raw:
        verdict, why = judge(e)
        table[e["name"]] = Entry(e["name"], verdict, why, e["delegate"])
    for e in raw:
        for gen in e["autogen"]:
            table.setdefault(gen, Entry(gen, COMPOSITE, f"autogen of {e['name']}"))
    return table
