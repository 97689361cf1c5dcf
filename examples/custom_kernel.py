"""Tutorial: custom Metal kernels on the mps_ext device.

Code written for ``torch.mps.compile_shader`` runs unchanged through
``torch.mps_ext.compile_shader``: the Metal Shading Language source is compiled for the host
CPU (see docs/shaders.md). This example writes two kernels, runs them on mps_ext and checks
them against torch:

1. a fused activation, ``gelu(x) * y`` with the tanh approximation, in one pass over memory;
2. a threadgroup reduction (sum of squares per row) with ``simd_sum``, threadgroup memory
   and ``threadgroup_barrier``.

Run:  python examples/custom_kernel.py
"""

import torch

import torch_mps_ext  # noqa: F401  (registers the mps_ext device and torch.mps_ext)


def compile_shader(source):
    # torch.mps_ext.compile_shader once the package exports it; the module function otherwise
    fn = getattr(torch.mps_ext, "compile_shader", None)
    if fn is None:
        from torch_mps_ext.shader import compile_shader as fn
    return fn(source)


SOURCE = r"""
#include <metal_stdlib>
using namespace metal;

// 1. Fused activation: one read of x and y, one write of out.  Templated over the element
//    type; each [[host_name]] instantiation becomes a kernel of the library.
template <typename T>
kernel void gelu_mul(device T* out [[buffer(0)]],
                     constant T* x [[buffer(1)]],
                     constant T* y [[buffer(2)]],
                     uint i [[thread_position_in_grid]]) {
  const float v = float(x[i]);
  const float inner = 0.7978845608f * (v + 0.044715f * v * v * v);
  out[i] = T(0.5f * v * (1.0f + precise::tanh(inner)) * float(y[i]));
}
template [[host_name("gelu_mul_float")]] kernel void gelu_mul<float>(device float*, constant float*, constant float*, uint);
template [[host_name("gelu_mul_half")]] kernel void gelu_mul<half>(device half*, constant half*, constant half*, uint);

// 2. Row-wise sum of squares: one threadgroup per row.  Each thread accumulates a strided
//    part of the row, simd_sum combines the 32 lanes of a simdgroup, threadgroup memory and
//    a barrier combine the simdgroups.
kernel void row_sumsq(device float* out [[buffer(0)]],
                      constant float* x [[buffer(1)]],
                      constant uint& ncols [[buffer(2)]],
                      uint row [[threadgroup_position_in_grid]],
                      uint tid [[thread_index_in_threadgroup]],
                      uint tptg [[threads_per_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]],
                      uint sg [[simdgroup_index_in_threadgroup]],
                      uint nsg [[simdgroups_per_threadgroup]]) {
  threadgroup float partial[32];
  float acc = 0.0f;
  for (uint c = tid; c < ncols; c += tptg) {
    const float v = x[row * ncols + c];
    acc += v * v;
  }
  acc = simd_sum(acc);
  if (lane == 0) partial[sg] = acc;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float total = simd_sum(lane < nsg ? partial[lane] : 0.0f);
    if (lane == 0) out[row] = total;
  }
}
"""


def main():
    lib = compile_shader(SOURCE)
    print("kernels in the compiled library:", ", ".join(dir(lib)))

    # --- fused activation -------------------------------------------------------------
    x = torch.randn(1_000_000)
    y = torch.randn(1_000_000)
    out = torch.empty(1_000_000, device="mps_ext")
    lib.gelu_mul_float(out, x.to("mps_ext"), y.to("mps_ext"))  # threads = out.numel()
    torch.mps_ext.synchronize()
    expected = torch.nn.functional.gelu(x, approximate="tanh") * y
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)
    print(f"gelu_mul_float matches torch on {x.numel():,} floats: largest absolute difference "
          f"{(out.cpu() - expected).abs().max().item():.2e}")

    xh, yh = x[:4096].half(), y[:4096].half()
    outh = torch.empty(4096, dtype=torch.float16, device="mps_ext")
    lib.gelu_mul_half(outh, xh.to("mps_ext"), yh.to("mps_ext"))
    torch.mps_ext.synchronize()
    expected_h = (torch.nn.functional.gelu(xh.float(), approximate="tanh") * yh.float()).half()
    torch.testing.assert_close(outh.cpu(), expected_h, rtol=2e-3, atol=2e-3)
    print(f"gelu_mul_half matches torch on {xh.numel():,} halves: largest absolute difference "
          f"{(outh.cpu().float() - expected_h.float()).abs().max().item():.2e}")

    # --- threadgroup reduction ----------------------------------------------------------
    rows, cols = 300, 1000
    m = torch.randn(rows, cols)
    sumsq = torch.empty(rows, device="mps_ext")
    group = 256  # threads per row; the grid is rows * group threads, one threadgroup per row
    lib.row_sumsq(sumsq, m.to("mps_ext"), cols, threads=rows * group, group_size=group)
    torch.mps_ext.synchronize()
    torch.testing.assert_close(sumsq.cpu(), (m * m).sum(1), rtol=1e-4, atol=1e-3)
    k = lib.row_sumsq
    print(f"row_sumsq matches torch on {rows} rows of {cols} floats; kernel properties: "
          f"max_threads_per_threadgroup {k.max_threads_per_threadgroup} threads, "
          f"thread_execution_width {k.thread_execution_width} threads (a simdgroup), "
          f"static_thread_group_memory_length {k.static_thread_group_memory_length} bytes")


if __name__ == "__main__":
    main()
