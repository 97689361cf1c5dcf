"""CPU-only programs with the package installed: autoload on vs off.

Installing torch_mps_ext makes every `import torch` load it (the
torch.backends entry point). A program that never touches the device must
behave and perform as without it: these rows run the same CPU-only program in
fresh interpreters with TORCH_DEVICE_BACKEND_AUTOLOAD=1 ("mps_ext" column)
and =0 ("cpu" column), alternating, and report the median of the pairs'
ratios. `cpu_only` times a loop of small CPU ops (allocation-heavy, as the
package used to replace the CPU allocator at import); `import_torch` times
`import torch` itself.
"""

import os
import statistics
import subprocess
import sys

_PROGRAM = r"""
import time
t0 = time.perf_counter()
import torch
t_import = time.perf_counter() - t0
torch.set_num_threads(1)
x = torch.randn(64, 64)
w = torch.randn(64, 64, requires_grad=True)
def step():
    y = (x @ w).relu().add(1.0)
    z = torch.cat([y, torch.empty(256, 64).fill_(0.5)])
    loss = z.sum()
    loss.backward()
    w.grad = None
for _ in range(200):
    step()
t0 = time.perf_counter()
for _ in range(3000):
    step()
print(t_import, time.perf_counter() - t0)
"""


def _run(autoload: bool) -> tuple[float, float]:
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="1" if autoload else "0")
    out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def rows(pairs: int = 7) -> list[dict]:
    samples = {True: [], False: []}
    for i in range(pairs):
        for autoload in ((True, False) if i % 2 == 0 else (False, True)):
            samples[autoload].append(_run(autoload))
    out = []
    for idx, name in ((1, "cpu_only"), (0, "import_torch")):
        on = [s[idx] for s in samples[True]]
        off = [s[idx] for s in samples[False]]
        out.append({"name": name, "cpu": statistics.median(off), "mps_ext": statistics.median(on),
                    "ratio": statistics.median(a / b for a, b in zip(on, off))})
    return out
