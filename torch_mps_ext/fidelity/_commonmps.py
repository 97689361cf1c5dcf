r"""Per-dtype refusals of mps mode, derived from
``torch.testing._internal.common_mps`` (shipped with torch; issue 23 item 1).

common_mps's ``UNIMPLEMENTED_XFAILLIST`` says, per OpInfo, for which dtypes
MPS has no kernel (``"nn.functional.avg_pool2d": [torch.int16, ...]``;
entries ``None`` are whole operators, which the operator table already
refuses). Its keys are OpInfo names; mps mode needs ATen operators. The
mapping is made once, by a maintainer, with the installed torch:
``python -m torch_mps_ext.fidelity._commonmps --write`` runs each listed
OpInfo's first sample input per listed dtype on the CPU under a dispatch mode
and takes the first ATen operator whose first tensor argument has that dtype
-- the operator whose MPS kernel refuses it -- kept only when it is the
OpInfo's own operator, has an MPS kernel, and the dtype is integral or bool
(``_kept``). The result is the reviewed data file
``common_mps_dtypes.txt`` beside this module (one line per operator:
``aten::op.overload  dtype,dtype  OpInfo key``), which mps mode loads.

The lists themselves are read from common_mps's source (its syntax tree):
importing it defines them only on a Mac (``if torch.backends.mps.is_available()``).
"""

from __future__ import annotations

import ast
import os
import sys
from collections import defaultdict

DATA_PATH = os.path.join(os.path.dirname(__file__), "common_mps_dtypes.txt")
LIST = "UNIMPLEMENTED_XFAILLIST"
# c10::ScalarType's codes (c10/core/ScalarType.h), which the native core takes.
SCALAR_TYPE_CODES = {"uint8": 0, "int8": 1, "int16": 2, "int32": 3, "int64": 4, "float16": 5,
                     "float32": 6, "float64": 7, "bool": 11, "bfloat16": 15}


def _dtype_names(node: ast.AST) -> list[str] | None:
    if isinstance(node, ast.Constant) and node.value is None:
        return None
    out = []
    for elt in getattr(node, "elts", []):
        if isinstance(elt, ast.Attribute) and isinstance(elt.value, ast.Name) \
                and elt.value.id == "torch":
            out.append(elt.attr)
    return out


def read_list(name: str = LIST, path: str | None = None) -> dict[str, list[str] | None]:
    """``{"median": ["bool"], "linalg.eig": None, ...}``: one of common_mps's
    dict literals (the first assignment of that name), dtypes by name."""
    if path is None:
        from .._compat import common_mps_path

        path = common_mps_path()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        target = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and target.id == name and isinstance(value, ast.Dict):
            return {k.value: _dtype_names(v) for k, v in zip(value.keys, value.values)
                    if isinstance(k, ast.Constant)}
    raise LookupError(f"{path}: no dict literal named {name}")


def read_data(path: str = DATA_PATH) -> dict[str, tuple[frozenset[str], str]]:
    """``{"aten::avg_pool2d": (frozenset({"int16", ...}), "nn.functional.avg_pool2d")}``."""
    out: dict[str, tuple[frozenset[str], str]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 2)
            if len(parts) != 3 or not parts[0].startswith("aten::"):
                raise ValueError(f"{path}:{number}: expected '<aten::op> <dtype,...> <OpInfo "
                                 f"keys>', got {line!r}")
            out[parts[0]] = (frozenset(parts[1].split(",")), parts[2])
    return out


def derive() -> dict[str, tuple[set[str], set[str]]]:
    """Traces common_mps's per-dtype entries to ATen operators (slow: imports
    op_db and runs samples on the CPU)."""
    import torch

    from .._compat import op_db, torch_dispatch_mode, tree_leaves

    TorchDispatchMode = torch_dispatch_mode()

    class First(TorchDispatchMode):
        def __init__(self, dtype):
            super().__init__()
            self.dtype, self.found = dtype, None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.found is None:
                # the operator's first tensor argument (its `self`/input):
                # what mps mode checks, not indices or targets
                leaves = tree_leaves((args, kwargs or {}))
                first = next((t for t in leaves if isinstance(t, torch.Tensor)), None)
                if first is not None and first.dtype == self.dtype:
                    self.found = func
            return func(*args, **(kwargs or {}))

    from . import operator_table

    table = operator_table()
    ops = defaultdict(list)
    for op in op_db():
        ops[op.name + op.variant_test_name].append(op)
    out: dict[str, tuple[set[str], set[str]]] = {}
    for key, dtypes in sorted(read_list().items()):
        if not dtypes:
            continue
        for op in ops.get(key, []):
            for name in dtypes:
                dtype = getattr(torch, name)
                try:
                    sample = next(iter(op.sample_inputs("cpu", dtype)))
                except Exception:  # noqa: BLE001 - no sample for this dtype: nothing to map
                    continue
                mode = First(dtype)
                try:
                    with mode:
                        op(sample.input, *sample.args, **sample.kwargs)
                except Exception:  # noqa: BLE001 - CPU may refuse too; the operator is known
                    pass
                if mode.found is None:
                    continue
                full = mode.found.name()  # "aten::relu", "aten::add.Tensor"
                if not _kept(full, key, name, table):
                    continue
                entry = out.setdefault(full, (set(), set()))
                entry[0].add(name)
                entry[1].add(key)
    return out


_INTEGRAL = frozenset({"bool", "uint8", "int8", "int16", "int32", "int64"})


def _norm_op(full: str) -> str:
    base = full[len("aten::"):].split(".")[0]
    for suffix in ("_forward", "_with_indices"):
        base = base.removesuffix(suffix)
    return base.replace("_", "")


def _norm_key(key: str) -> str:
    return key.removeprefix("nn.functional.").replace(".", "").replace("_", "")


def _kept(full: str, key: str, dtype: str, table) -> bool:
    """A traced (operator, dtype) is a refusal of that operator's MPS kernel
    only when: the operator is the OpInfo's own (same name: not a view, a
    copy or an arithmetic helper it called first), MPS has a kernel for it
    (the table), and the dtype is integral or bool (common_mps's float
    entries are other failures: precision, a missing backward)."""
    v = table.get(full) or table.get(full.split(".")[0])
    return (dtype in _INTEGRAL and v is not None and v.verdict == "mps"
            and _norm_op(full) == _norm_key(key))


def write(path: str = DATA_PATH) -> None:
    import torch

    rows = derive()
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# Generated by `python -m torch_mps_ext.fidelity._commonmps --write` from torch "
                f"{torch.__version__}'s\n# common_mps.{LIST} (per-dtype entries): the ATen "
                "operator each listed OpInfo\n# reaches first with its first tensor of the listed dtype. "
                "Reviewed; see docs/fidelity.md.\n")
        for name in sorted(rows):
            dtypes, keys = rows[name]
            f.write(f"{name:<48} {','.join(sorted(dtypes)):<40} {' '.join(sorted(keys))}\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        for name, (dtypes, keys) in sorted(derive().items()):
            print(name, sorted(dtypes), sorted(keys))
