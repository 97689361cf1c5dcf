"""Throughput of the random generators: mps_ext vs CPU.

    python bench/rng.py

Times ``torch.rand(16M)`` and ``torch.randn(16M)`` (float32, a fresh output
each call, as user code does) on CPU and on mps_ext, interleaved, median of
several repeats after warm-up (bench/common.py). Prints a table and
``RATIO <name> <mps_ext/cpu>`` lines (below 1 = mps_ext faster); target 1.0.
"""

import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_mps_ext  # noqa: E402,F401
from bench.common import compare, report  # noqa: E402

N = 16 << 20


def rand(device):
    return lambda: torch.rand(N, device=device)


def randn(device):
    return lambda: torch.randn(N, device=device)


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [compare("rand_16M", rand, inner=3, repeats=7),
            compare("randn_16M", randn, inner=3, repeats=7)]
    report(rows, {"rand_16M": 1.0, "randn_16M": 1.0})


if __name__ == "__main__":
    main()
