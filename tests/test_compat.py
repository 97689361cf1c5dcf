"""The compatibility module names every private torch API the package uses
(torch_mps_ext/_compat.py): each must resolve in the installed torch."""

import ast
import os

import torch

from conftest import ROOT
from torch_mps_ext import _compat


def test_private_apis_resolve():
    assert torch.__version__.split("+")[0] == _compat.CHECKED_AGAINST
    assert callable(_compat.register_device_module)
    assert isinstance(_compat.distributed_backend_plugins(), dict)
    assert _compat.gloo().ProcessGroupGloo is not None
    assert callable(_compat.augment_memory_snapshot_stack_traces())
    assert _compat.has_kernel_for_dispatch_key(
        "aten::_linalg_svd", "CompositeExplicitAutogradNonFunctional")
    assert not _compat.has_kernel_for_dispatch_key("aten::_linalg_svd", "CompositeImplicitAutograd")
    ns = _compat.inductor()
    assert all(v is not None for v in vars(ns).values())


def test_no_other_module_imports_torch_privates():
    # Only _compat.py imports from torch's private modules.
    offenders = []
    pkg = os.path.join(ROOT, "torch_mps_ext")
    for dirpath, _, files in os.walk(pkg):
        for f in files:
            if not f.endswith(".py") or f == "_compat.py":
                continue
            path = os.path.join(dirpath, f)
            for node in ast.walk(ast.parse(open(path).read())):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                for n in names:
                    if n.startswith("torch") and any(p.startswith("_") for p in n.split(".")[1:]):
                        offenders.append(f"{os.path.relpath(path, ROOT)}: {n}")
    assert not offenders, offenders
