"""Timing helpers shared by the benchmark scripts.

Each workload is a pair of zero-argument callables (CPU, mps_ext) built by a
factory; both are timed in the same process, interleaved, after a warm-up.
The reported number is the median over repeats; ratios are mps_ext / CPU
(below 1.0 means mps_ext is faster).
"""

import statistics
import time
from typing import Callable

import torch


def _sync(device: str) -> None:
    if device.startswith("mps_ext"):
        torch.mps_ext.synchronize()


def time_call(fn: Callable[[], object], device: str, *, inner: int,
              repeats: int) -> float:
    """Median seconds per call over `repeats` batches of `inner` calls."""
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def compare(name: str, make: Callable[[str], Callable[[], object]], *,
            inner: int = 10, repeats: int = 7, warmup: int = 3) -> dict:
    """Times make("cpu")() against make("mps_ext")(), interleaving rounds so
    that machine noise hits both alike."""
    fns = {d: make(d) for d in ("cpu", "mps_ext")}
    for d, fn in fns.items():
        for _ in range(warmup):
            fn()
        _sync(d)
    cpu, dev = [], []
    for _ in range(repeats):
        cpu.append(time_call(fns["cpu"], "cpu", inner=inner, repeats=1))
        dev.append(time_call(fns["mps_ext"], "mps_ext", inner=inner, repeats=1))
    t_cpu, t_dev = statistics.median(cpu), statistics.median(dev)
    return {"name": name, "cpu": t_cpu, "mps_ext": t_dev, "ratio": t_dev / t_cpu}


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:9.1f} us"
    if s < 1:
        return f"{s * 1e3:9.2f} ms"
    return f"{s:9.2f} s "


def report(rows: list[dict], targets: dict[str, float] | None = None) -> None:
    """Prints a table and one machine-readable `RATIO <name> <x>` line per row."""
    targets = targets or {}
    print(f"{'workload':<28} {'cpu':>12} {'mps_ext':>12} {'ratio':>7} {'target':>7}")
    for r in rows:
        t = targets.get(r["name"])
        mark = "" if t is None else ("  ok" if r["ratio"] <= t else "  OVER")
        print(f"{r['name']:<28} {fmt_time(r['cpu']):>12} {fmt_time(r['mps_ext']):>12} "
              f"{r['ratio']:7.3f} {'' if t is None else f'{t:7.2f}'}{mark}")
    for r in rows:
        print(f"RATIO {r['name']} {r['ratio']:.3f}")
