"""Throughput of the random generators: mps_ext vs CPU.

Run:  PYTHONPATH=. python bench/rng.py [--repeats N] [--size N]

Prints, for each op, the median time per call on each device and a
``RATIO <name> <mps_ext/cpu>`` line (below 1 = mps_ext faster). Every timed
call allocates its output, as user code does. mps_ext work is synchronous
(``synchronize`` is called anyway, as on a real accelerator).
"""

import argparse
import statistics
import time

import torch
import torch_mps_ext  # noqa: F401


def _time(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn(device)
    samples = []
    for _ in range(repeats):
        if device == "mps_ext":
            torch.mps_ext.synchronize()
        t0 = time.perf_counter()
        out = fn(device)
        if device == "mps_ext":
            torch.mps_ext.synchronize()
        samples.append(time.perf_counter() - t0)
        del out
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--size", type=int, default=16 * 1024 * 1024)
    args = parser.parse_args()
    n = args.size
    label = f"{n // (1024 * 1024)}M" if n % (1024 * 1024) == 0 else str(n)
    cases = {
        f"rand_{label}": lambda d: torch.rand(n, device=d),
        f"randn_{label}": lambda d: torch.randn(n, device=d),
    }
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats} after warm-up")
    for name, fn in cases.items():
        t_cpu = _time(fn, "cpu", args.repeats)
        t_dev = _time(fn, "mps_ext", args.repeats)
        print(f"{name}: cpu {t_cpu * 1e3:.2f} ms, mps_ext {t_dev * 1e3:.2f} ms")
        print(f"RATIO {name} {t_dev / t_cpu:.3f}")


if __name__ == "__main__":
    main()
