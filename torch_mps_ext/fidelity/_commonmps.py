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

from ._datafile import records

DATA_PATH = os.path.join(os.path.dirname(__file__), "common_mps_dtypes.txt")
LIST = "UNIMPLEMENTED_XFAILLIST"
COMPLEX_SET = "SUPPORTED_COMPLEX_OPS"
# c10::ScalarType's codes (c10/core/ScalarType.h), which the native core takes.
SCALAR_TYPE_CODES = {"uint8": 0, "int8": 1, "int16": 2, "int32": 3, "int64": 4, "float16": 5,
                     "float32": 6, "float64": 7, "complex32": 8, "complex64": 9, "bool": 11,
                     "bfloat16": 15}


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


def read_set(name: str = "SUPPORTED_COMPLEX_OPS", path: str | None = None) -> set[str]:
    """One of common_mps's set literals of OpInfo keys."""
    if path is None:
        from .._compat import common_mps_path

        path = common_mps_path()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == name
                and isinstance(node.value, ast.Set)):
            return {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
    raise LookupError(f"{path}: no set literal named {name}")


def reason(source: str, keys: str) -> str:
    """The refusal's reason as the native core prints it."""
    if source == COMPLEX_SET:
        return f"{keys!r} is not in {COMPLEX_SET}"
    return f"{source}[{keys!r}]"


def read_data(path: str = DATA_PATH) -> dict[str, tuple[frozenset[str], str, str]]:
    """``{"aten::avg_pool2d": (frozenset({"int16", ...}), "UNIMPLEMENTED_XFAILLIST",
    "nn.functional.avg_pool2d")}``."""
    out: dict[str, tuple[frozenset[str], str, str]] = {}
    for number, line, parts in records(path, 4):
        if (len(parts) != 4 or not parts[0].startswith("aten::")
                or parts[2] not in (LIST, COMPLEX_SET)):
            raise ValueError(f"{path}:{number}: expected '<aten::op> <dtype,...> "
                             f"<{LIST}|{COMPLEX_SET}> <OpInfo keys>', got {line!r}")
        out[parts[0]] = (frozenset(parts[1].split(",")), parts[2], parts[3])
    return out


KERNEL_DATA_PATH = os.path.join(os.path.dirname(__file__), "mps_kernel_dtypes.txt")


def read_kernel_data(path: str = KERNEL_DATA_PATH) -> dict[str, tuple[frozenset[str], str, str]]:
    """``{"aten::addr": (frozenset({"int32", ...}), "aten/src/ATen/native/mps/
    operations/LinearAlgebra.mm", "MPS device does not support addr for
    non-float input")}``: the dtypes MPS's own kernels refuse, with their text
    (the hand-reviewed ``mps_kernel_dtypes.txt``)."""
    out: dict[str, tuple[frozenset[str], str, str]] = {}
    for number, line, parts in records(path, 4):
        if (len(parts) != 4 or not parts[0].startswith("aten::")
                or not parts[2].startswith("aten/src/ATen/") or parts[0] in out
                or not set(parts[1].split(",")) <= set(SCALAR_TYPE_CODES)):
            raise ValueError(f"{path}:{number}: expected '<aten::op> <dtype,...> "
                             f"<aten/src/ATen/... source> <MPS's message>' (each operator once), "
                             f"got {line!r}")
        out[parts[0]] = (frozenset(parts[1].split(",")), parts[2], parts[3])
    return out


def refusals() -> list[tuple[str, list[int], str, bool]]:
    """What the native core checks: MPS's own refusals (verbatim texts)
    first, then common_mps's per-dtype entries (our text naming the list)."""
    out = [(name, [SCALAR_TYPE_CODES[d] for d in sorted(dtypes)], text, True)
           for name, (dtypes, _, text) in read_kernel_data().items()]
    out += [(name, [SCALAR_TYPE_CODES[d] for d in sorted(dtypes)], reason(source, keys), False)
            for name, (dtypes, source, keys) in read_data().items()]
    return out


def derive() -> dict[str, tuple[set[str], str, set[str]]]:
    """Traces common_mps's per-dtype entries to ATen operators (slow: imports
    op_db and runs samples on the CPU)."""
    import torch

    from .._compat import op_db, torch_dispatch_mode, tree_leaves

    TorchDispatchMode = torch_dispatch_mode()

    class First(TorchDispatchMode):
        def __init__(self, dtype):
            super().__init__()
            self.dtype, self.found, self.every = dtype, None, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # the operator's first tensor argument (its `self`/input): what
            # mps mode checks, not indices or targets
            leaves = tree_leaves((args, kwargs or {}))
            first = next((t for t in leaves if isinstance(t, torch.Tensor)), None)
            if first is not None and first.dtype == self.dtype:
                if self.found is None:
                    self.found = func
                self.every.add(func.name())
            return func(*args, **(kwargs or {}))

    from . import operator_table

    table = operator_table()
    ops = defaultdict(list)
    for op in op_db():
        ops[op.name + op.variant_test_name].append(op)
    def first_op(op, dtype, every=None):
        try:
            sample = next(iter(op.sample_inputs("cpu", dtype)))
        except Exception:  # noqa: BLE001 - no sample for this dtype: nothing to map
            return None
        mode = First(dtype)
        try:
            with mode:
                op(sample.input, *sample.args, **sample.kwargs)
        except Exception:  # noqa: BLE001 - CPU may refuse too; the operator is known
            pass
        if every is not None:
            every.update(mode.every)
        return mode.found.name() if mode.found is not None else None  # "aten::add.Tensor"

    out: dict[str, tuple[set[str], str, set[str]]] = {}
    for key, dtypes in sorted(read_list().items()):
        if not dtypes:
            continue
        for op in ops.get(key, []):
            for name in dtypes:
                full = _mps_composite(first_op(op, getattr(torch, name)), table)
                if full is None or not _kept(full, key, name, table):
                    continue
                entry = out.setdefault(full, (set(), LIST, set()))
                entry[0].add(name)
                entry[2].add(key)
    # Complex: an OpInfo not in SUPPORTED_COMPLEX_OPS is expected to fail for
    # complex32/complex64 on MPS. Refused where its own operator has an MPS
    # kernel and no OpInfo MPS supports reaches that operator with a complex
    # input (nn.functional.linear reaches addmm here: not refused).
    supported = read_set(COMPLEX_SET)
    owners: dict[str, set[str]] = defaultdict(set)
    used_by_supported: set[str] = set()  # reached with complex by an OpInfo MPS supports
    for key, oplist in sorted(ops.items()):
        for op in oplist:
            if torch.complex64 not in op.supported_dtypes("cpu"):
                continue
            full = first_op(op, torch.complex64,
                            every=used_by_supported if key in supported else None)
            if full is not None and _norm_op(full) == _norm_key(key):
                v = table.get(full) or table.get(full.split(".")[0])
                if v is not None and v.verdict == "mps":
                    owners[full].add(key)
    for full, keys in owners.items():
        if full in out or keys & supported or full in used_by_supported:
            continue
        out[full] = ({"complex32", "complex64"}, COMPLEX_SET, keys)
    for full in NOT_REFUSED:
        out.pop(full, None)
    return out


_INTEGRAL = frozenset({"bool", "uint8", "int8", "int16", "int32", "int64"})

# Traced, but not refusals of the operator's MPS kernel (reviewed):
NOT_REFUSED = {
    # common_mps lists bincount for CPU's float64 output, not a missing kernel
    "aten::bincount": "UNIMPLEMENTED_XFAILLIST['bincount']: CPU's float64 output",
    # ldexp, which MPS supports in complex64, reaches it with a complex input:
    # pow.Scalar's kernels (CPU's and MPS's pow_Scalar_out_mps) redispatch
    # to pow.Tensor_Tensor with the base wrapped, below the trace's reach
    "aten::pow.Tensor_Tensor": "ldexp reaches it in complex64 through pow.Scalar",
}


def _norm_op(full: str) -> str:
    base = full[len("aten::"):].split(".")[0]
    for suffix in ("_forward", "_with_indices"):
        base = base.removesuffix(suffix)
    return base.replace("_", "")


def _norm_key(key: str) -> str:
    return key.removeprefix("nn.functional.").replace(".", "").replace("_", "")


def _mps_composite(full: str | None, table) -> str | None:
    """The composite whose own MPS kernel refuses: max_pool2d's composite
    reaches max_pool2d_with_indices (all a trace below autograd sees), but
    MPS registers a kernel of its own for aten::max_pool2d (mps_max_pool2d),
    where the refusal sits; a Mac runs max_pool2d_with_indices for bool."""
    if full is None:
        return None
    import torch

    base = full.split(".")[0]
    own = base.removesuffix("_with_indices")
    v = table.get(own)
    if own != base and v is not None and v.verdict == "mps" and \
            torch._C._dispatch_has_kernel_for_dispatch_key(own, "CompositeImplicitAutograd"):
        return own
    return full


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
                f"{torch.__version__}'s common_mps:\n# {LIST}'s per-dtype entries and the "
                f"OpInfos not in {COMPLEX_SET}, each mapped to\n# the ATen operator it reaches "
                "first with its first tensor of that dtype. Reviewed; see docs/fidelity.md.\n")
        for name in sorted(rows):
            dtypes, source, keys = rows[name]
            f.write(f"{name:<40} {','.join(sorted(dtypes)):<34} {source:<24} "
                    f"{' '.join(sorted(keys))}\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        for name, (dtypes, source, keys) in sorted(derive().items()):
            print(name, sorted(dtypes), source, sorted(keys))
