"""Timing helpers shared by the benchmark scripts.

Each workload is a pair of zero-argument callables (CPU, mps_ext) built by a
factory; both are timed in the same process, interleaved, after a warm-up.
Ratios are mps_ext / CPU (below 1.0 means mps_ext is faster): the median of
per-round ratios, each round timing both sides back to back.
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
    """Times make("cpu")() against make("mps_ext")() in rounds: each round
    times both, back to back, in alternating order. The ratio is the median
    of the rounds' ratios, so a slow spell of the machine that spans a round
    hits both sides of it; the times shown are each side's median."""
    fns = {d: make(d) for d in ("cpu", "mps_ext")}
    for d, fn in fns.items():
        for _ in range(warmup):
            fn()
        _sync(d)
    times = {"cpu": [], "mps_ext": []}
    ratios = []
    for r in range(repeats):
        for d in (("cpu", "mps_ext") if r % 2 == 0 else ("mps_ext", "cpu")):
            times[d].append(time_call(fns[d], d, inner=inner, repeats=1))
        ratios.append(times["mps_ext"][-1] / times["cpu"][-1])
    return {"name": name, "cpu": statistics.median(times["cpu"]),
            "mps_ext": statistics.median(times["mps_ext"]),
            "ratio": statistics.median(ratios)}


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
