"""The device's first benchmark: per-op latency and throughput vs CPU.

    python bench/ops.py          (or: make bench)

Prints a table and `RATIO <name> <mps_ext/cpu>` lines.
"""

import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_mps_ext  # noqa: E402,F401
from bench.common import compare, report  # noqa: E402


def add_small(device):
    a = torch.randn(1000).to(device)
    b = torch.randn(1000).to(device)
    return lambda: a + b


def add_large_fresh(device):
    a = torch.randn(16 << 20).to(device)
    b = torch.randn(16 << 20).to(device)
    return lambda: a + b


def add_large_out(device):
    a = torch.randn(16 << 20).to(device)
    b = torch.randn(16 << 20).to(device)
    out = torch.empty(16 << 20, device=device)
    return lambda: torch.add(a, b, out=out)


def mm(device):
    a = torch.randn(1024, 1024).to(device)
    b = torch.randn(1024, 1024).to(device)
    return lambda: a @ b


def mlp_step(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 512).to(device)
    y = torch.randint(0, 10, (64,)).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss
    return step


WORKLOADS = [
    ("add_1k", add_small, dict(inner=2000)),
    ("add_16M_fresh", add_large_fresh, dict(inner=5)),
    ("add_16M_out", add_large_out, dict(inner=5)),
    ("mm_1024", mm, dict(inner=5)),
    ("mlp_step", mlp_step, dict(inner=20)),
]

TARGETS = {"add_1k": 1.3, "add_16M_fresh": 1.0, "add_16M_out": 1.05,
           "mm_1024": 1.05, "mlp_step": 1.0}


def main(names=None):
    rows = [compare(n, f, **kw) for n, f, kw in WORKLOADS if not names or n in names]
    report(rows, TARGETS)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
