"""compile_shader kernels on mps_ext vs torch's own CPU kernels (one run, ratios printed).

    PYTHONPATH=. python -m bench.shaders        (or: python bench/shaders.py)

Prints a table and ``RATIO <name> <mps_ext time / cpu time>`` lines (lower is better;
target <= 1.5). `python -m bench` runs these with the other workloads.
"""

import os
import sys

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_mps_ext  # noqa: E402,F401
from bench.common import compare, report  # noqa: E402
from torch_mps_ext.shader import compile_shader  # noqa: E402

N = 16 * 1024 * 1024

SRC = r"""
#include <metal_stdlib>
using namespace metal;

kernel void axpy(device float* out [[buffer(0)]], constant float* x [[buffer(1)]], constant float* y [[buffer(2)]],
                 constant float& a [[buffer(3)]], uint i [[thread_position_in_grid]]) {
  out[i] = a * x[i] + y[i];
}

// Each thread sums a contiguous chunk with float4 loads, then the threadgroup combines the
// partial sums with simd_sum and threadgroup memory.
kernel void chunk_sum(device float* partial [[buffer(0)]], constant float4* x [[buffer(1)]],
                      constant uint& chunk4 [[buffer(2)]], uint i [[thread_position_in_grid]],
                      uint gid [[threadgroup_position_in_grid]], uint lane [[thread_index_in_simdgroup]],
                      uint sg [[simdgroup_index_in_threadgroup]], uint nsg [[simdgroups_per_threadgroup]]) {
  threadgroup float shared[32];
  float4 acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
  constant float4* p = x + size_t(i) * chunk4;
  for (uint k = 0; k < chunk4; k += 4) {
    acc0 += p[k];
    acc1 += p[k + 1];
    acc2 += p[k + 2];
    acc3 += p[k + 3];
  }
  float4 acc = (acc0 + acc1) + (acc2 + acc3);
  float v = simd_sum(acc.x + acc.y + acc.z + acc.w);
  if (lane == 0) shared[sg] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float w = simd_sum(lane < nsg ? shared[lane] : 0.0f);
    if (lane == 0) partial[gid] = w;
  }
}
"""


_LIBS = {}


def _library(checked=False):
    """The kernels above, compiled plain or in checked mode (TORCH_MPS_EXT_SHADER_CHECKED=1,
    read at compile time: every device-pointer access bounds-checked)."""
    if checked not in _LIBS:
        old = os.environ.get("TORCH_MPS_EXT_SHADER_CHECKED")
        os.environ["TORCH_MPS_EXT_SHADER_CHECKED"] = "1" if checked else "0"
        try:
            _LIBS[checked] = compile_shader(SRC)
        finally:
            if old is None:
                os.environ.pop("TORCH_MPS_EXT_SHADER_CHECKED")
            else:
                os.environ["TORCH_MPS_EXT_SHADER_CHECKED"] = old
    return _LIBS[checked]


def axpy(device, checked=False):
    """`out = 0.5 * x + y` over 16M floats: the axpy kernel on mps_ext,
    torch.add(out=) on CPU."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, generator=g), torch.randn(N, generator=g)
    if device == "cpu":
        out_c = torch.empty(N)
        return lambda: torch.add(y, x, alpha=0.5, out=out_c)
    lib = _library(checked)
    xd, yd = x.to(device), y.to(device)
    out = torch.empty(N, device=device)
    lib.axpy(out, xd, yd, 0.5)
    torch.testing.assert_close(out.cpu(), torch.add(y, x, alpha=0.5))
    return lambda: lib.axpy(out, xd, yd, 0.5)


def reduction_sum(device, checked=False):
    """Sum of 16M floats: a threadgroup reduction kernel (simd_sum and
    threadgroup memory, 64 partial sums added by torch) on mps_ext,
    torch.sum on CPU."""
    x = torch.randn(N, generator=torch.Generator().manual_seed(0))
    if device == "cpu":
        return lambda: torch.sum(x)
    lib = _library(checked)
    threads_per_group, groups = 128, 64
    nthreads = threads_per_group * groups
    chunk4 = N // 4 // nthreads
    xd = x.to(device)
    partial = torch.empty(groups, device=device)

    def run():
        lib.chunk_sum(partial, xd, chunk4, threads=nthreads, group_size=threads_per_group)
        return partial.sum()
    torch.testing.assert_close(run().cpu(), torch.sum(x), rtol=1e-4, atol=1e-2)
    return run


def axpy_checked(device):
    """axpy compiled in checked mode (docs/shaders.md, "Checked mode"): the cost of the checks."""
    return axpy(device, checked=True)


def reduction_sum_checked(device):
    """reduction_sum compiled in checked mode."""
    return reduction_sum(device, checked=True)


WORKLOADS = [
    ("shader_axpy_16M", axpy, dict(inner=5)),
    ("shader_reduction_sum_16M", reduction_sum, dict(inner=5)),
    ("shader_axpy_16M_checked", axpy_checked, dict(inner=5)),
    ("shader_reduction_sum_16M_checked", reduction_sum_checked, dict(inner=5)),
]

# checked mode is a debugging mode: its rows have no target
TARGETS = {"shader_axpy_16M": 1.5, "shader_reduction_sum_16M": 1.5}


def main():
    rows = [compare(n, f, **kw) for n, f, kw in WORKLOADS]
    report(rows, TARGETS)


if __name__ == "__main__":
    main()
