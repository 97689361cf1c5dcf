"""What MPS fidelity mode costs per operator (docs/fidelity.md).

    python bench/fidelity.py

Small ops (1024 float32 elements) on mps_ext: the hot path (``add``, ``relu``:
csrc/aten/HotOps.cpp) and the boxed fallback (``sin``, ``mean``), with the mode
off and on, alternating round by round in one process. Each round times
20,000 calls by the calling thread's CPU time (other threads and the
machine's load do not count); the table gives the median per-call time per
mode and the median of the per-round differences (on - off). One intra-op
thread, so that small kernels stay on the calling thread.
"""

import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_mps_ext  # noqa: E402,F401

N, ROUNDS = 20000, 15


def main():
    torch.set_num_threads(1)
    a = torch.randn(1024, device="mps_ext")
    b = torch.randn(1024, device="mps_ext")
    ops = {"add": lambda: a + b, "relu": lambda: a.relu(), "sin": lambda: a.sin(),
           "mean": lambda: a.mean()}

    def per_call(f):
        t = time.thread_time_ns()
        for _ in range(N):
            f()
        return (time.thread_time_ns() - t) / N

    for f in ops.values():
        for _ in range(3000):
            f()
    times = {(m, o): [] for m in ("off", "mps") for o in ops}
    for r in range(ROUNDS):
        for o, f in ops.items():
            for m in (("off", "mps") if r % 2 == 0 else ("mps", "off")):
                torch.mps_ext.set_fidelity(m)
                times[(m, o)].append(per_call(f))
    torch.mps_ext.set_fidelity("off")
    print(f"{'op':6s} {'off':>9s} {'mps':>9s} {'mps - off':>10s}")
    for o in ops:
        diff = statistics.median(y - x for x, y in zip(times[("off", o)], times[("mps", o)]))
        print(f"{o:6s} {statistics.median(times[('off', o)]):6.0f} ns "
              f"{statistics.median(times[('mps', o)]):6.0f} ns {diff:+7.0f} ns")


if __name__ == "__main__":
    main()
