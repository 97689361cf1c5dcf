"""compile_shader kernels on mps_ext vs torch's own CPU kernels (one run, ratios printed).

    PYTHONPATH=. python -m bench.shaders        (or: python bench/shaders.py)

Prints ``RATIO <name> <mps_ext time / cpu time>`` lines (lower is better; target <= 1.5).
"""

import time

import torch

import torch_mps_ext  # noqa: F401
from torch_mps_ext.shader import compile_shader

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


def bench_pair(dev_fn, cpu_fn, reps=21):
    """Median times of the two functions, measured interleaved (the machine may be shared)."""
    dev_fn()
    cpu_fn()
    td, tc = [], []
    for _ in range(reps):
        for fn, acc in ((dev_fn, td), (cpu_fn, tc)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    td.sort()
    tc.sort()
    return td[reps // 2], tc[reps // 2]


def main():
    lib = compile_shader(SRC)
    sync = torch.mps_ext.synchronize
    x, y = torch.randn(N), torch.randn(N)
    xd, yd = x.to("mps_ext"), y.to("mps_ext")
    out_d = torch.empty(N, device="mps_ext")
    out_c = torch.empty(N)

    def dev_axpy():
        lib.axpy(out_d, xd, yd, 0.5)
        sync()

    def cpu_axpy():
        torch.add(y, x, alpha=0.5, out=out_c)

    dev_axpy()
    torch.testing.assert_close(out_d.cpu(), torch.add(y, x, alpha=0.5))
    t_dev, t_cpu = bench_pair(dev_axpy, cpu_axpy)
    print(f"axpy 16M floats: mps_ext {t_dev * 1e3:.2f} ms, cpu torch.add {t_cpu * 1e3:.2f} ms")
    print(f"RATIO elementwise_axpy {t_dev / t_cpu:.3f}")

    threads_per_group, groups = 128, 64
    nthreads = threads_per_group * groups
    chunk4 = N // 4 // nthreads
    partial = torch.empty(groups, device="mps_ext")

    def dev_sum():
        lib.chunk_sum(partial, xd, chunk4, threads=nthreads, group_size=threads_per_group)
        sync()
        return partial.cpu().double().sum()

    def cpu_sum():
        return torch.sum(x)

    torch.testing.assert_close(dev_sum().float(), torch.sum(x), rtol=1e-4, atol=1e-2)
    t_dev, t_cpu = bench_pair(dev_sum, cpu_sum)
    print(f"sum 16M floats: mps_ext threadgroup reduction {t_dev * 1e3:.2f} ms, cpu torch.sum {t_cpu * 1e3:.2f} ms")
    print(f"RATIO threadgroup_reduction_sum {t_dev / t_cpu:.3f}")


if __name__ == "__main__":
    main()
