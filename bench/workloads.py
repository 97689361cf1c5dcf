"""The workloads of the performance issue, each a factory: device -> callable."""

import torch

import torch_mps_ext  # noqa: F401
from bench import compile as compiled
from bench import shaders
from bench.ops import add_large_fresh, add_large_out, add_small, mlp_step, mm


def conv2d(device):
    x = torch.randn(8, 64, 56, 56).to(device)
    w = torch.randn(64, 64, 3, 3).to(device)
    return lambda: torch.nn.functional.conv2d(x, w, padding=1)


def softmax(device):
    x = torch.randn(4096, 4096).to(device)
    return lambda: torch.softmax(x, dim=1)


def cnn_step(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(32, 3, 32, 32).to(device)
    y = torch.randint(0, 10, (32,)).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss
    return step


def mlp_step_memory_history(device):
    """mlp_step with the allocator's history recorded on mps_ext (torch.cuda's
    defaults: every event, Python and C++ stacks), turned on before and off
    (dropping what it recorded) after each step."""
    step = mlp_step(device)
    if device == "cpu":
        return step
    memory = torch.mps_ext.memory

    def recorded():
        memory._record_memory_history(max_entries=100_000)
        try:
            return step()
        finally:
            memory._record_memory_history(enabled=None)
    return recorded


def alloc_fill(device):
    n = 64 << 20
    return lambda: torch.empty(n, dtype=torch.uint8, device=device).fill_(1)


def rand(device):
    return lambda: torch.rand(16 << 20, device=device)


WORKLOADS = [
    ("add_1k", add_small, dict(inner=2000)),
    ("add_16M_fresh", add_large_fresh, dict(inner=5)),
    ("add_16M_out", add_large_out, dict(inner=5)),
    ("mm_1024", mm, dict(inner=5)),
    ("conv2d_8x64x56x56", conv2d, dict(inner=3)),
    ("softmax_4096", softmax, dict(inner=3)),
    ("mlp_step", mlp_step, dict(inner=10, repeats=31, warmup=10)),
    ("mlp_step_memory_history", mlp_step_memory_history, dict(inner=10, repeats=31, warmup=10)),
    ("cnn_step", cnn_step, dict(inner=3, repeats=31, warmup=10)),
    ("alloc_fill_64MB", alloc_fill, dict(inner=5)),
    ("rand_16M", rand, dict(inner=3)),
    *shaders.WORKLOADS,
    *compiled.WORKLOADS,
]

TARGETS = {"add_1k": 1.3, "add_16M_fresh": 0.35, "add_16M_out": 1.05, "mm_1024": 1.05,
           "conv2d_8x64x56x56": 1.05, "softmax_4096": 1.05, "mlp_step": 1.0,
           "cnn_step": 1.0, "alloc_fill_64MB": 0.4, "rand_16M": 1.0, **shaders.TARGETS,
           "cpu_only": 1.05, "import_torch": 1.05}


def memory_overheads(names=()):
    """Peak reserved / peak allocated bytes over a few steps of each training workload."""
    out = []
    for name, make in (("mlp_step", mlp_step), ("cnn_step", cnn_step)):
        if names and name not in names:
            continue
        torch.mps_ext.empty_cache()
        torch.mps_ext.reset_peak_memory_stats()
        step = make("mps_ext")
        for _ in range(5):
            step()
        torch.mps_ext.synchronize()
        out.append((name, torch.mps_ext.max_memory_reserved() /
                    max(1, torch.mps_ext.max_memory_allocated())))
        del step
    return out
