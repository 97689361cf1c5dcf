"""Checking on Linux that code will run on a Mac's MPS backend (docs/fidelity.md).

1. In-process: `torch.mps_ext.set_fidelity("mps")` makes mps_ext refuse what
   MPS refuses, with MPS's errors, and shows the usual fixes.
2. Whole program: `python -m torch_mps_ext.fidelity --report FILE.json
   SCRIPT.py` runs a (Mac-unfriendly) training script to the end and lists
   every incompatibility it met, with the line of the script that met it.

Run: .venv/bin/python examples/mac_compat_check.py
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import torch
import torch_mps_ext  # noqa: F401  (registers the mps_ext device)

device = "mps_ext"

# --- 1. mps mode in-process -------------------------------------------------
torch.mps_ext.set_fidelity("mps")
print(f"fidelity mode: {torch.mps_ext.get_fidelity()}")

x = torch.randn(256, 8, device=device)
try:
    x.double()
except TypeError as e:
    print(f"x.double() on the device   -> TypeError: {e}")
x64 = x.cpu().double()  # the fix: float64 math on the CPU (or stay in float32)
print(f"x.cpu().double()           -> works: {x64.dtype} on {x64.device}")

a = torch.randn(4, 4, device=device)
try:
    torch.linalg.eig(a)
except NotImplementedError as e:
    print(f"torch.linalg.eig(a)        -> NotImplementedError: {str(e)[:68]}...")
eigenvalues = torch.linalg.eig(a.cpu()).eigenvalues  # the fix: that op on the CPU
print(f"torch.linalg.eig(a.cpu())  -> works: {eigenvalues.shape[0]} eigenvalues")

# Undefined results a Mac gives otherwise than CPU: MPS's sort is not stable,
# so equal elements come out in another order (mps mode: reverse input order).
scores = torch.tensor([0.5, 0.9, 0.5, 0.1], device=device)
order = torch.argsort(scores).tolist()
assert order == [3, 2, 0, 1], order  # CPU's (and the default mode's): [3, 0, 2, 1]
print(f"torch.argsort(ties)        -> {order}: ties in another order than CPU's [3, 0, 2, 1]")
order = torch.argsort(scores, stable=True).tolist()  # the fix: ask for a stable sort
print(f"argsort(..., stable=True)  -> {order}: the same on every device")

# What MPS runs, mps mode runs as before: a float32 training loop.
torch.manual_seed(0)
y = (x[:, 0] > 0).long()
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
                            torch.nn.Linear(32, 2)).to(device)
opt = torch.optim.AdamW(model.parameters(), lr=0.05)
for step in range(50):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
accuracy = (model(x).argmax(1) == y).float().mean().item()
print(f"float32 MLP in mps mode    -> trains: loss {loss.item():.4f}, "
      f"accuracy {100 * accuracy:.1f}%")
torch.mps_ext.set_fidelity("off")

# --- 2. the compatibility report of a whole program -------------------------
SCRIPT = """\
import numpy as np
import torch
import torch_mps_ext

features = torch.from_numpy(np.random.rand(64, 4))       # numpy gives float64
x = features.to("mps_ext")                               # fails on a Mac
w = torch.randn(4, 1, device="mps_ext", requires_grad=True)
for _ in range(3):
    loss = ((x.float() @ w) ** 2).mean()
    loss.backward()
    torch.linalg.eigvals(w.detach() @ w.detach().T)      # no MPS kernel
print("script finished")
"""

with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, "train.py"), "w") as f:
        f.write(SCRIPT)
    report = os.path.join(tmp, "mac.json")
    proc = subprocess.run(
        [sys.executable, "-m", "torch_mps_ext.fidelity", "--report", report, "train.py"],
        cwd=tmp, capture_output=True, text=True)
    print(f"\n$ python -m torch_mps_ext.fidelity --report mac.json train.py")
    print(textwrap.indent(proc.stdout.strip(), "  stdout: "))
    print(textwrap.indent(proc.stderr.strip(), "  "))
    print(f"exit status {proc.returncode} (1: the script ran, and met incompatibilities)")
    with open(report) as f:
        data = json.load(f)
    assert proc.returncode == 1 and data["exit_status"] == 1
    found = {(r["kind"], r["operator"] or r["dtype"]): r["first"]
             for r in data["incompatibilities"]}
    assert found == {("dtype", "float64"): "train.py:6",
                     ("operator", "aten::_linalg_eigvals"): "train.py:11"}, found
    print("report rows (kind, what, first seen at):",
          ", ".join(f"{k} {w} @ {first}" for (k, w), first in sorted(found.items())))
