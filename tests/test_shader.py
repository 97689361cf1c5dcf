"""compile_shader / load_metallib on the mps_ext device (SPEC §6).

Compilation dominates the runtime, so the kernels are grouped into a few libraries that are
compiled once per module (into a private cache directory) and shared by the tests.
"""

import os
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import torch_mps_ext  # noqa: F401  (registers the mps_ext device)
from torch_mps_ext import shader

DEV = "mps_ext"


@pytest.fixture(scope="module", autouse=True)
def private_cache(private_shader_cache):
    return private_shader_cache


def compile_shader(src):
    fn = getattr(getattr(torch, "mps_ext", None), "compile_shader", None) or shader.compile_shader
    return fn(src)


def sync():
    torch.mps_ext.synchronize()


def dev(t):
    return t.to(DEV)


# --------------------------------------------------------------------------- libraries
BASIC_SRC = r"""
#include <metal_stdlib>
using namespace metal;

struct Params { float scale; int offset; uint2 dims; };

template <typename T>
kernel void axpy(device T* out [[buffer(0)]], constant T* x [[buffer(1)]], constant float& a [[buffer(2)]],
                 uint i [[thread_position_in_grid]]) {
  out[i] = static_cast<T>(a * float(x[i]) + float(out[i]));
}
template [[host_name("axpy_float")]] kernel void axpy<float>(device float*, constant float*, constant float&, uint);
template [[host_name("axpy_half")]] kernel void axpy<half>(device half*, constant half*, constant float&, uint);
template [[host_name("axpy_bfloat")]] kernel void axpy<bfloat>(device bfloat*, constant bfloat*, constant float&, uint);

kernel void vec_ops(device float4* out, constant float4* in, uint i [[thread_position_in_grid]]) {
  float4 v = in[i];
  float2 a = v.xy + v.zw;                 // swizzle reads
  float4 r = float4(a, v.wz);             // mixed constructor
  r.xy *= 2.0f;                           // swizzle compound assignment
  r.w = dot(v, float4(1.0f)) + length(float2(3.0f, 4.0f));
  out[i] = r + v.x * float4(0, 0, 1, 0);
}

kernel void int_ops(device int* out, constant int* a, constant uint* b, uint i [[thread_position_in_grid]]) {
  int3 v = int3(a[i], a[i] * 2, -a[i]);
  uint3 u = uint3(b[i]) >> uint3(1, 2, 3);
  out[4 * i + 0] = v.x + v.y * v.z;
  out[4 * i + 1] = int(u.x + u.y + u.z);
  out[4 * i + 2] = clamp(a[i], -5, 5) + abs(v.z) + min(a[i], 3) + max(a[i], -3);
  out[4 * i + 3] = int(popcount(b[i])) + int(clz(b[i] | 1u)) + select(0, 100, a[i] > 0);
}

kernel void math_ops(device float* out, constant float* x, uint i [[thread_position_in_grid]]) {
  float v = x[i];
  out[8 * i + 0] = precise::exp(v) + fast::sin(v);
  out[8 * i + 1] = metal::sqrt(metal::abs(v)) + rsqrt(v * v + 1.0f);
  out[8 * i + 2] = clamp(v, -0.5f, 0.5f);
  out[8 * i + 3] = select(-1.0f, 1.0f, v > 0.0f) + fma(v, 2.0f, 1.0f);
  out[8 * i + 4] = as_type<float>(as_type<uint>(v) ^ 0x80000000u);   // negate through the bits
  out[8 * i + 5] = numeric_limits<float>::max() / 1e30f + float(numeric_limits<half>::max())
                   + float(numeric_limits<int>::lowest()) / 1e9f;
  out[8 * i + 6] = fract(v) + floor(v) + trunc(v * 3.0f) + precise::tanh(v);
  out[8 * i + 7] = isnan(v / 0.0f) ? 1.0f : (isinf(v / 0.0f) ? 2.0f : 3.0f);
}

kernel void params_kernel(device float* out, constant Params& p [[buffer(1)]], constant long* shape [[buffer(2)]],
                          constant float* coeffs [[buffer(3)]], uint2 pos [[thread_position_in_grid]]) {
  if (pos.x >= p.dims.x || pos.y >= p.dims.y) return;
  const uint idx = pos.y * p.dims.x + pos.x;
  out[idx] = p.scale * float(int(idx) + p.offset) + float(shape[0] * 100 + shape[1]) + coeffs[0] * coeffs[1];
}

kernel void grid3d(device uint* out, uint3 pos [[thread_position_in_grid]], uint3 tpg [[threads_per_grid]],
                   uint3 tg [[threadgroup_position_in_grid]], uint3 ltid [[thread_position_in_threadgroup]],
                   uint3 tptg [[threads_per_threadgroup]], uint lin [[thread_index_in_threadgroup]]) {
  const uint idx = (pos.z * tpg.y + pos.y) * tpg.x + pos.x;
  out[4 * idx + 0] = pos.x + 10 * pos.y + 100 * pos.z;
  out[4 * idx + 1] = tg.x + 10 * tg.y + 100 * tg.z;
  out[4 * idx + 2] = ltid.x + 10 * ltid.y + 100 * ltid.z;
  out[4 * idx + 3] = (lin == (ltid.z * tptg.y + ltid.y) * tptg.x + ltid.x) ? tptg.x * tptg.y * tptg.z : 0;
}

kernel void lambda_array(device float* out, constant float* x, uint i [[thread_position_in_grid]]) {
  metal::array<float, 3> w = {0.25f, 0.5f, 0.25f};
  auto at = [&](int k) { return x[clamp(int(i) + k, 0, 15)]; };
  float acc = 0;
  for (int k = -1; k <= 1; ++k) acc += w[k + 1] * at(k);
  out[i] = acc;
}

kernel void tensor_list(device float* out, constant float* const* srcs [[buffer(1)]], constant long& n [[buffer(2)]],
                        uint i [[thread_position_in_grid]]) {
  float s = 0;
  for (long k = 0; k < n; ++k) s += srcs[k][i];
  out[i] = s;
}

kernel void scalars(device float* out, constant long& i64, constant float& f32, constant half& f16,
                    constant bfloat& bf16, constant int& i32, constant short& i16, constant char& i8,
                    constant uchar& u8, uint i [[thread_position_in_grid]]) {
  out[0] = float(i64); out[1] = f32; out[2] = float(f16); out[3] = float(bf16);
  out[4] = float(i32); out[5] = float(i16); out[6] = float(i8); out[7] = float(u8);
}

[[max_total_threads_per_threadgroup(64)]]
kernel void small_groups(device float* out, uint i [[thread_position_in_grid]]) { out[i] = 1.0f; }

kernel void full(device float* out, constant float& val, uint idx [[thread_position_in_grid]]) { out[idx] = val; }

kernel void sum_rows(device float* out, constant float* x, constant uint& ncols, uint row [[thread_position_in_grid]]) {
  float s = 0;  // deterministic per-thread reduction (no atomics)
  for (uint c = 0; c < ncols; ++c) s += x[row * ncols + c] * (1.0f + 1e-3f * float(c));
  out[row] = s;
}

kernel void packed(device packed_float3* out, constant packed_float3* in, uint i [[thread_position_in_grid]]) {
  float3 v = in[i];                      // packed -> padded vector
  packed_float3 p = v * 2.0f + in[i];    // arithmetic mixes both
  p += float3(1.0f);
  out[i] = p;
  out[i].y = float(sizeof(packed_float3) + 100 * sizeof(float3));
}

kernel void mats(device float4* out, constant float4x4& m, constant float4* v, uint i [[thread_position_in_grid]]) {
  float4x4 t = transpose(m);
  float2x2 r = float2x2(float2(0, 1), float2(-1, 0));  // columns: rotation by 90 degrees
  float2 q = r * v[i].xy;
  out[2 * i] = m * v[i] + (v[i] * m) * 2.0f;
  out[2 * i + 1] = float4(q, determinant(float3x3(2.0f)), (t * m)[1][1]);
}

namespace ops {
inline float five() { return 5.0f; }
kernel void ns_kernel(device float* o, uint i [[thread_position_in_grid]]) { o[i] = five() + float(i); }
}  // namespace ops

kernel void conversions(device float* out, constant int4* iv, constant half4* hv, uint i [[thread_position_in_grid]]) {
  float4 f = float4(iv[i]);                 // explicit vector conversions
  long2 l = long2(iv[i].xy) * 3;
  vec<float, 2> q = float2(hv[i].zw);
  half2 h2 = half2(f.xy) + hv[i].xy;
  bool4 m = f > 0.0f;
  out[8 * i + 0] = f.x + f.y + f.z + f.w;
  out[8 * i + 1] = float(l.x - l.y);
  out[8 * i + 2] = q.x * q.y;
  out[8 * i + 3] = float(h2.x) + float(h2.y);
  out[8 * i + 4] = float(all(m)) + 2.0f * float(any(m));
  out[8 * i + 5] = float(uint2(uint2(7u, 9u).yx).x);
  out[8 * i + 6] = select(float4(-1), float4(1), m).w;
  out[8 * i + 7] = distance(float3(f.xyz), float3(0.0f));
}
"""

SYNC_SRC = r"""
#include <metal_stdlib>
using namespace metal;

// classic shared-memory tree reduction; correct for any group size incl. a partial last group
kernel void tg_reduce(device float* out, constant float* x, constant uint& n,
                      uint gid [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],
                      uint tptg [[threads_per_threadgroup]], uint i [[thread_position_in_grid]]) {
  threadgroup float buf[1024];
  buf[tid] = i < n ? x[i] : 0.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = 1; s < tptg; s *= 2) {
    float other = (tid % (2 * s) == 0 && tid + s < tptg) ? buf[tid + s] : 0.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    buf[tid] += other;
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (tid == 0) out[gid] = buf[0];
}

// simd_sum + threadgroup memory: the usual two-level reduction
constexpr constant uint TILE = 16;
template <uint N>
kernel void tg_sizes(device float* out, uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float4 tile[TILE][TILE + 1];
  threadgroup half extra[N], more[2 * N];
  tile[0][tid] = float4(1.0f);
  extra[tid] = half(2.0f);
  more[tid] = half(3.0f);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = tile[0][tid].x + float(extra[tid]) + float(more[tid]);
}
template [[host_name("tg_sizes_8")]] kernel void tg_sizes<8>(device float*, uint);

kernel void simd_reduce(device float* out, constant float* x, uint gid [[threadgroup_position_in_grid]],
                        uint tid [[thread_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]],
                        uint sg [[simdgroup_index_in_threadgroup]], uint nsg [[simdgroups_per_threadgroup]],
                        uint i [[thread_position_in_grid]]) {
  threadgroup float partial[32];
  float v = simd_sum(x[i]);
  if (lane == 0) partial[sg] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float w = lane < nsg ? partial[lane] : 0.0f;
    w = simd_sum(w);
    if (lane == 0) out[gid] = w;
  }
}

// simd functions with only some lanes active (divergent branches)
kernel void simd_partial(device float* out, constant float* x, uint i [[thread_position_in_grid]],
                         uint lane [[thread_index_in_simdgroup]]) {
  float v = x[i];
  float r0, r1;
  if (lane % 3 == 0) {
    r0 = simd_sum(v);
    r1 = simd_max(v);
  } else {
    r0 = simd_min(v);
    r1 = simd_product(v > 0 ? 1.0f : 2.0f);
  }
  out[9 * i + 0] = r0;
  out[9 * i + 1] = r1;
  out[9 * i + 2] = simd_prefix_exclusive_sum(v);
  out[9 * i + 3] = simd_prefix_inclusive_sum(v);
  out[9 * i + 4] = simd_shuffle_down(v, 1);
  out[9 * i + 5] = simd_shuffle_xor(v, 5);
  out[9 * i + 6] = float(static_cast<ulong>(simd_ballot(v > 0.0f)) & 0xffffu) + (simd_any(v > 100.0f) ? 0.5f : 0.0f)
                   + (simd_all(v > -100.0f) ? 0.25f : 0.0f);
  out[9 * i + 7] = simd_broadcast(v, 2) + simd_shuffle_up(v, 3);
  out[9 * i + 8] = simd_shuffle(v, ushort((lane * 7) % 32));
}

// classic tiled matmul: 2-D threadgroups, threadgroup tiles, two barriers per step,
// a defaulted template parameter sizing the tiles
struct Dims { uint M, N, K; };
template <typename T, int BS = 16>
kernel void matmul(device T* C [[buffer(0)]], device const T* A [[buffer(1)]], device const T* B [[buffer(2)]],
                   constant Dims& d [[buffer(3)]], uint2 gid [[thread_position_in_grid]],
                   uint2 tid [[thread_position_in_threadgroup]]) {
  threadgroup float As[BS][BS];
  threadgroup float Bs[BS][BS];
  float acc = 0;
  const uint row = gid.y, col = gid.x;
  for (uint t = 0; t < (d.K + BS - 1) / BS; ++t) {
    const uint ac = t * BS + tid.x, br = t * BS + tid.y;
    As[tid.y][tid.x] = (row < d.M && ac < d.K) ? float(A[row * d.K + ac]) : 0.0f;
    Bs[tid.y][tid.x] = (br < d.K && col < d.N) ? float(B[br * d.N + col]) : 0.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int k = 0; k < BS; ++k) acc += As[tid.y][k] * Bs[k][tid.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (row < d.M && col < d.N) C[row * d.N + col] = T(acc);
}
template [[host_name("matmul_f32")]] kernel void matmul<float>(device float*, device const float*, device const float*,
                                                               constant Dims&, uint2, uint2);
template [[host_name("matmul_f16")]] kernel void matmul<half>(device half*, device const half*, device const half*,
                                                              constant Dims&, uint2, uint2);

// overloads that differ only by address space (all T* on the host): merged, first one kept
inline float sum3(device const float* p) { return p[0] + p[1] + p[2]; }
inline float sum3(threadgroup const float* p) { return p[0] + p[1] + p[2]; }
inline float sum3(constant float* p) { return p[0] + p[1] + p[2]; }
kernel void overloads(device float* out, device const float* in, constant float* c, uint i [[thread_position_in_grid]],
                      uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float t[3];
  if (tid < 3) t[tid] = in[tid] * 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = sum3(in) + sum3(t) + sum3(c);
}

// collectives reached only through a namespace-scope lambda / a functor template argument:
// the front end must still run these kernels with the fiber scheduler
auto reduce_lanes = [](float x) { return simd_sum(x); };
struct LaneMax { float operator()(float x) const { return simd_max(x); } };
template <typename F> kernel void apply_op(device float* out, constant float* in, uint i [[thread_position_in_grid]]) {
  F f;
  out[i] = f(in[i]);
}
template [[host_name("apply_lanemax")]] kernel void apply_op<LaneMax>(device float*, constant float*, uint);
kernel void via_lambda(device float* out, constant float* in, uint i [[thread_position_in_grid]]) {
  out[i] = reduce_lanes(in[i]);
}

kernel void atomics(device atomic_int* acc_i [[buffer(0)]], device atomic_uint* acc_u [[buffer(1)]],
                    device atomic_float* acc_f [[buffer(2)]], constant int* x [[buffer(3)]],
                    device int* swapped [[buffer(4)]], uint i [[thread_position_in_grid]]) {
  atomic_fetch_add_explicit(&acc_i[0], x[i], memory_order_relaxed);
  atomic_fetch_max_explicit(&acc_i[1], x[i], memory_order_relaxed);
  atomic_fetch_min_explicit(&acc_i[2], x[i], memory_order_relaxed);
  atomic_fetch_add_explicit(&acc_u[0], 1u, memory_order_relaxed);
  atomic_fetch_or_explicit(&acc_u[1], 1u << (i % 32), memory_order_relaxed);
  atomic_fetch_add_explicit(&acc_f[0], float(x[i]) * 0.5f, memory_order_relaxed);
  atomic_fetch_max_explicit(&acc_f[1], float(x[i]) * 0.25f, memory_order_relaxed);
  atomic_fetch_min_explicit(&acc_f[2], float(x[i]) * 0.25f, memory_order_relaxed);
  float fexp = atomic_load_explicit(&acc_f[3], memory_order_relaxed);
  while (!atomic_compare_exchange_weak_explicit(&acc_f[3], &fexp, fexp + 1.0f, memory_order_relaxed,
                                                memory_order_relaxed)) {}
  // compare-and-swap increment
  int expected = atomic_load_explicit(&acc_i[3], memory_order_relaxed);
  while (!atomic_compare_exchange_weak_explicit(&acc_i[3], &expected, expected + 2, memory_order_relaxed,
                                                memory_order_relaxed)) {}
  swapped[i] = atomic_exchange_explicit(&acc_i[4], int(i), memory_order_relaxed) >= 0 ? 1 : 0;
}
"""

C10_SRC = r"""
#include <c10/metal/utils.h>
#include <c10/metal/random.h>
#include <c10/metal/special_math.h>
#include <c10/metal/reduction_utils.h>
#include <c10/metal/atomic.h>
#include <c10/metal/error.h>
#include <c10/metal/indexing.h>
#include <c10/metal/igamma.h>
#include <c10/metal/expm1f.h>
#include <metal_stdlib>
using namespace metal;
using namespace c10::metal;

kernel void utils_k(device float* out, constant float* a, constant float* b, device long* iout,
                    constant long* ia, constant long* ib, uint i [[thread_position_in_grid]]) {
  out[3 * i + 0] = c10::metal::remainder(a[i], b[i]);
  out[3 * i + 1] = c10::metal::floor_divide(a[i], b[i]);
  out[3 * i + 2] = c10::metal::hypot(a[i], b[i]);
  iout[2 * i + 0] = c10::metal::floor_divide(ia[i], ib[i]);
  iout[2 * i + 1] = c10::metal::remainder(ia[i], ib[i]);
}
kernel void random_k(device float* out, constant long& seed, uint i [[thread_position_in_grid]]) {
  out[2 * i] = c10::metal::rand(seed, i);
  out[2 * i + 1] = c10::metal::randn(seed, i);
}
kernel void special_k(device float* out, constant float* x, uint i [[thread_position_in_grid]]) {
  out[6 * i + 0] = c10::metal::erfinv(x[i] * 0.45f);
  out[6 * i + 1] = c10::metal::i0(x[i]);
  out[6 * i + 2] = c10::metal::digamma(x[i] + 3.0f);
  out[6 * i + 3] = c10::metal::erf(x[i]);
  out[6 * i + 4] = c10::metal::expm1f(x[i]);
  out[6 * i + 5] = c10::metal::igamma(x[i] + 2.0f, 1.5f);
}
kernel void reduce_k(device float* out, device long* amax, constant float* x,
                     uint tid [[thread_index_in_threadgroup]], uint tptg [[threads_per_threadgroup]],
                     uint gid [[threadgroup_position_in_grid]], uint i [[thread_position_in_grid]]) {
  threadgroup float shared[32];
  threadgroup float sarg[32];
  threadgroup long sidx[32];
  out[gid] = c10::metal::threadgroup_sum(shared, x[i], tid, tptg);
  amax[gid] = c10::metal::threadgroup_argmax(sarg, sidx, x[i], long(i), tid, tptg);
}
kernel void atomic_k(device AtomicType_t<float>* acc, device AtomicType_t<half>* hacc, constant float* x,
                     uint i [[thread_position_in_grid]]) {
  AtomicType<float>::atomic_add(acc, i % 4, x[i]);
  AtomicType<half>::atomic_add(hacc, i % 2, half(1.0f));
}
kernel void error_k(device float* out, constant long& limit, device ErrorMessages* err [[buffer(2)]],
                    uint i [[thread_position_in_grid]]) {
  if (long(i) >= limit) {
    TORCH_REPORT_ERROR(err, "index ", long(i), " is out of bounds for size ", limit);
    return;
  }
  out[i] = 1.0f;
}
struct cube_functor {
  template <typename T> T operator()(const T x) { return x * x * x; }
};
REGISTER_UNARY_OP(cube, float, float);
REGISTER_UNARY_OP(cube, half, half);
"""


@pytest.fixture(scope="module")
def basic_lib():
    return compile_shader(BASIC_SRC)


@pytest.fixture(scope="module")
def sync_lib():
    return compile_shader(SYNC_SRC)


@pytest.fixture(scope="module")
def c10_lib():
    return compile_shader(C10_SRC)


# --------------------------------------------------------------------------- basics
def test_docstring_example():
    lib = compile_shader(
        "kernel void full(device float* out, constant float& val, uint idx [[thread_position_in_grid]]) { out[idx] = val; }")
    x = torch.zeros(16, device="mps_ext")
    lib.full(x, 3.14)
    sync()
    torch.testing.assert_close(x.cpu(), torch.full((16,), 3.14))


def test_dir_and_unknown_kernel(basic_lib):
    names = dir(basic_lib)
    for n in ("axpy_float", "axpy_half", "axpy_bfloat", "vec_ops", "full", "grid3d", "tensor_list"):
        assert n in names
    assert "axpy" not in names  # the template itself is not a kernel, its instantiations are
    with pytest.raises(RuntimeError, match="no_such_kernel"):
        basic_lib.no_such_kernel


def test_kernel_properties(basic_lib, sync_lib):
    k = basic_lib.full
    assert k.max_threads_per_threadgroup == 1024
    assert k.thread_execution_width == 32
    assert k.static_thread_group_memory_length == 0
    assert basic_lib.small_groups.max_threads_per_threadgroup == 64
    # execution mode chosen by the front end: plain loops unless the kernel synchronizes
    assert not basic_lib.full._info["sync"] and not basic_lib.axpy_half._info["sync"]
    assert sync_lib.tg_reduce._info["sync"] and sync_lib.simd_partial._info["sync"]
    assert sync_lib.tg_reduce.static_thread_group_memory_length == 1024 * 4
    assert sync_lib.simd_reduce.static_thread_group_memory_length == 32 * 4
    # constexpr sizes, 2-D arrays, several declarators, template arguments; rounded up to 16
    assert sync_lib.tg_sizes_8.static_thread_group_memory_length == 16 * 17 * 16 + 16 + 32


@pytest.mark.parametrize("dtype,name", [(torch.float32, "axpy_float"), (torch.float16, "axpy_half"),
                                        (torch.bfloat16, "axpy_bfloat")])
def test_template_instantiations_and_dtypes(basic_lib, dtype, name):
    x = torch.randn(100, dtype=dtype)
    y = torch.randn(100, dtype=dtype)
    out = dev(y)
    getattr(basic_lib, name)(out, dev(x), 0.5)
    sync()
    expected = (0.5 * x.float() + y.float()).to(dtype)
    torch.testing.assert_close(out.cpu(), expected)


def test_vector_types_and_swizzles(basic_lib):
    v = torch.randn(10, 4)
    out = torch.empty(10, 4, device=DEV)
    basic_lib.vec_ops(out, dev(v), threads=10)
    sync()
    a = v[:, :2] + v[:, 2:]
    exp = torch.stack([2 * a[:, 0], 2 * a[:, 1], v[:, 3] + v[:, 0], v.sum(1) + 5.0], dim=1)
    torch.testing.assert_close(out.cpu(), exp)


def test_integer_ops(basic_lib):
    a = torch.randint(-20, 20, (64,), dtype=torch.int32)
    b = torch.randint(0, 2**31 - 1, (64,), dtype=torch.int64).to(torch.int32)
    out = torch.empty(64 * 4, dtype=torch.int32, device=DEV)
    basic_lib.int_ops(out, dev(a), dev(b), threads=64)
    sync()
    a64, b64 = a.long(), b.long()
    exp0 = a64 + (2 * a64) * (-a64)
    exp1 = (b64 >> 1) + (b64 >> 2) + (b64 >> 3)
    exp2 = a64.clamp(-5, 5) + a64.abs() + a64.clamp(max=3) + a64.clamp(min=-3)
    pop = torch.tensor([bin(int(x)).count("1") for x in b64])
    clz = torch.tensor([32 - (int(x) | 1).bit_length() for x in b64])
    exp3 = pop + clz + torch.where(a64 > 0, 100, 0)
    exp = torch.stack([exp0, exp1, exp2, exp3], 1).reshape(-1).int()
    assert torch.equal(out.cpu(), exp)


def test_math_functions(basic_lib):
    x = torch.tensor([-2.5, -0.75, -0.1, 0.3, 0.5, 1.7, 3.25, 9.0])
    out = torch.empty(8 * 8, device=DEV)
    basic_lib.math_ops(out, dev(x), threads=8)
    sync()
    o = out.cpu().view(8, 8)
    torch.testing.assert_close(o[:, 0], torch.exp(x) + torch.sin(x))
    torch.testing.assert_close(o[:, 1], x.abs().sqrt() + torch.rsqrt(x * x + 1))
    torch.testing.assert_close(o[:, 2], x.clamp(-0.5, 0.5))
    torch.testing.assert_close(o[:, 3], torch.where(x > 0, 1.0, -1.0) + (2 * x + 1))
    torch.testing.assert_close(o[:, 4], -x)
    fmax, hmax, imin = torch.finfo(torch.float32).max, torch.finfo(torch.float16).max, torch.iinfo(torch.int32).min
    torch.testing.assert_close(o[:, 5], torch.full((8,), fmax / 1e30 + hmax + imin / 1e9))
    torch.testing.assert_close(o[:, 6], (x - x.floor()) + x.floor() + torch.trunc(x * 3) + torch.tanh(x))
    torch.testing.assert_close(o[:, 7], torch.full((8,), 2.0))


def test_struct_list_and_2d_grid(basic_lib):
    W, H = 7, 5
    out = torch.zeros(W * H, device=DEV)
    # struct Params {float scale; int offset; uint2 dims;} packed by hand into a uint8 tensor
    params = dev(torch.frombuffer(bytearray(struct.pack("<fiII", 0.5, 3, W, H)), dtype=torch.uint8))
    basic_lib.params_kernel(out, params, [2, 9], [1.5, 4.0], threads=(W, H), group_size=(4, 2))
    sync()
    idx = torch.arange(W * H, dtype=torch.float32)
    torch.testing.assert_close(out.cpu(), 0.5 * (idx + 3) + 209 + 6.0)


def test_3d_grid_attributes_and_partial_groups(basic_lib):
    X, Y, Z = 5, 3, 2
    gx, gy, gz = 2, 2, 1
    out = torch.zeros(X * Y * Z * 4, dtype=torch.int32, device=DEV)
    basic_lib.grid3d(out, threads=(X, Y, Z), group_size=(gx, gy, gz))
    sync()
    o = out.cpu().view(Z, Y, X, 4)
    for z in range(Z):
        for y in range(Y):
            for x in range(X):
                tg = (x // gx, y // gy, z // gz)
                lt = (x % gx, y % gy, z % gz)
                size = min(gx, X - tg[0] * gx) * min(gy, Y - tg[1] * gy) * min(gz, Z - tg[2] * gz)
                assert o[z, y, x].tolist() == [x + 10 * y + 100 * z, tg[0] + 10 * tg[1] + 100 * tg[2],
                                               lt[0] + 10 * lt[1] + 100 * lt[2], size]


def test_vector_conversions(basic_lib):
    n = 50
    iv = torch.randint(-5, 6, (n, 4), dtype=torch.int32)
    hv = torch.randn(n, 4).half()
    out = torch.zeros(n * 8, device=DEV)
    basic_lib.conversions(out, dev(iv), dev(hv), threads=n)
    sync()
    o = out.cpu().view(n, 8)
    f = iv.float()
    torch.testing.assert_close(o[:, 0], f.sum(1))
    torch.testing.assert_close(o[:, 1], 3.0 * (f[:, 0] - f[:, 1]))
    torch.testing.assert_close(o[:, 2], hv[:, 2].float() * hv[:, 3].float())
    h2 = f[:, :2].half() + hv[:, :2]
    torch.testing.assert_close(o[:, 3], h2[:, 0].float() + h2[:, 1].float())
    pos = f > 0
    torch.testing.assert_close(o[:, 4], pos.all(1).float() + 2 * pos.any(1).float())
    torch.testing.assert_close(o[:, 5], torch.full((n,), 9.0))
    torch.testing.assert_close(o[:, 6], torch.where(pos[:, 3], 1.0, -1.0))
    torch.testing.assert_close(o[:, 7], f[:, :3].norm(dim=1))


def test_packed_vectors(basic_lib):
    x = torch.randn(10, 3)
    out = torch.zeros(10, 3, device=DEV)
    basic_lib.packed(out, dev(x), threads=10)
    sync()
    exp = 3 * x + 1
    exp[:, 1] = 12 + 100 * 16  # packed_float3 is 12 bytes, float3 is 16 (padded like Metal)
    torch.testing.assert_close(out.cpu(), exp)


def test_matrices(basic_lib):
    cols = torch.randn(4, 4)  # float4x4 is column-major: row c of this tensor is column c
    v = torch.randn(8, 4)
    out = torch.zeros(16, 4, device=DEV)
    basic_lib.mats(out, dev(cols), dev(v), threads=8)
    sync()
    M = cols.t()  # the mathematical matrix
    o = out.cpu().view(8, 2, 4)
    torch.testing.assert_close(o[:, 0], v @ M.t() + 2 * (v @ M))
    torch.testing.assert_close(o[:, 1, :2], torch.stack([-v[:, 1], v[:, 0]], 1))
    torch.testing.assert_close(o[:, 1, 2], torch.full((8,), 8.0))
    torch.testing.assert_close(o[:, 1, 3], (M.t() @ M)[1, 1].expand(8))


def test_kernel_in_namespace(basic_lib):
    out = torch.zeros(5, device=DEV)
    basic_lib.ns_kernel(out)
    sync()
    assert out.cpu().tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]


def test_lambda_and_metal_array(basic_lib):
    x = torch.randn(16)
    out = torch.empty(16, device=DEV)
    basic_lib.lambda_array(out, dev(x))
    sync()
    xp = torch.cat([x[:1], x, x[-1:]])
    torch.testing.assert_close(out.cpu(), 0.25 * xp[:-2] + 0.5 * xp[1:-1] + 0.25 * xp[2:])


def test_tensor_list_argument_buffer(basic_lib):
    srcs = [torch.randn(32) for _ in range(3)]
    out = torch.empty(32, device=DEV)
    basic_lib.tensor_list(out, [dev(s) for s in srcs], 3)
    sync()
    torch.testing.assert_close(out.cpu(), srcs[0] + srcs[1] + srcs[2])


def test_scalar_arguments_and_arg_casts(basic_lib):
    out = torch.zeros(8, device=DEV)
    casts = {3: "fp16", 4: "bf16", 5: "int32", 6: "int16", 7: "int8", 8: "uint8"}
    basic_lib.scalars(out, 2**40 + 3, 1.25, 0.333, 2.7, -70000, -300, -7, 250, threads=1, arg_casts=casts)
    sync()
    exp = [float(2**40 + 3), 1.25, float(torch.tensor(0.333).half()), float(torch.tensor(2.7).bfloat16()),
           -70000.0, -300.0, -7.0, 250.0]
    torch.testing.assert_close(out.cpu(), torch.tensor(exp))
    # a str cast applies to every non-tensor argument; 0-dim CPU tensors are passed by value
    out2 = torch.zeros(16, device=DEV)
    basic_lib.full(out2, torch.tensor(2.5, dtype=torch.float64))
    sync()
    torch.testing.assert_close(out2.cpu(), torch.full((16,), 2.5))
    vals = torch.zeros(4, dtype=torch.int16, device=DEV)
    lib16 = compile_shader("kernel void f(device short* o, constant short* v, uint i [[thread_position_in_grid]])"
                           " { o[i] = v[i] * 2; }")
    lib16.f(vals, [1, -2, 300, 4], arg_casts="int16")
    sync()
    assert vals.cpu().tolist() == [2, -4, 600, 8]


_SCALAR_KERNELS = {
    # dtype of the 0-dim CPU tensor: the MSL type of the constant parameter
    torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat",
    torch.int32: "int", torch.int64: "long", torch.int16: "short", torch.int8: "char",
    torch.uint8: "uchar", torch.bool: "bool",
}


@pytest.mark.parametrize("dtype", list(_SCALAR_KERNELS), ids=str)
def test_zero_dim_cpu_tensor_is_bound_by_value(dtype):
    # torch.mps binds a 0-dim CPU tensor as its value in its own dtype;
    # float64 is narrowed to float (below). Each kernel writes v * 1 as float.
    msl = _SCALAR_KERNELS[dtype]
    lib = compile_shader(f"kernel void k(device float* o, constant {msl}& v,"
                         " uint i [[thread_position_in_grid]]) { o[i] = float(v); }")
    value = {torch.bool: True, torch.uint8: 200, torch.int8: -100}.get(
        dtype, -3 if not dtype.is_floating_point else 2.5)
    out = torch.zeros(4, device=DEV)
    lib.k(out, torch.tensor(value, dtype=dtype))
    sync()
    assert out.cpu().tolist() == [float(value)] * 4
    lib64 = compile_shader("kernel void k(device float* o, constant float& v,"
                           " uint i [[thread_position_in_grid]]) { o[i] = v; }")
    lib64.k(out, torch.tensor(-1.5, dtype=torch.float64))
    sync()
    assert out.cpu().tolist() == [-1.5] * 4


def test_storage_offset_is_honoured(basic_lib):
    base = torch.zeros(32, device=DEV)
    view = base[8:24]
    basic_lib.full(view, 7.0)
    sync()
    exp = torch.zeros(32)
    exp[8:24] = 7.0
    torch.testing.assert_close(base.cpu(), exp)


# --------------------------------------------------------------------------- errors
def test_argument_errors(basic_lib):
    x = torch.zeros(4, device=DEV)
    with pytest.raises(RuntimeError, match="^Passed CPU tensor to MPS op$"):
        basic_lib.full(torch.zeros(4), 1.0)
    with pytest.raises(RuntimeError, match="^Unsupported argument type$"):
        basic_lib.full(x, "1.0")
    with pytest.raises(RuntimeError, match="^Unsupported argument type$"):
        basic_lib.full(x, None)
    with pytest.raises(RuntimeError, match="^Number of threads is undefined or has wrong dimension$"):
        basic_lib.small_groups(3.0)
    with pytest.raises(RuntimeError, match="^Number of threads is undefined or has wrong dimension$"):
        basic_lib.full(x, 1.0, threads=(1, 1, 1, 1))
    with pytest.raises(RuntimeError, match="Empty list/tuple"):
        basic_lib.tensor_list(x, [], 0)
    with pytest.raises(ValueError, match="^Threadgroup size exceeds 1024 limit$"):
        basic_lib.full(x, 1.0, threads=4096, group_size=2048)
    with pytest.raises(ValueError, match="^Threadgroup size exceeds 1024 limit$"):
        basic_lib.full(x, 1.0, threads=(64, 64), group_size=(64, 32))
    with pytest.raises(ValueError, match="^Threadgroup size exceeds 64 limit$"):
        basic_lib.small_groups(x, group_size=128)
    with pytest.raises(RuntimeError, match="Unsupported cast instruction"):
        basic_lib.full(x, 1.0, arg_casts="fp64")


def test_default_group_is_capped_by_kernel_limit(basic_lib):
    out = torch.zeros(1000, device=DEV)
    basic_lib.small_groups(out)  # default group = min(n, 64): no error, every thread runs
    sync()
    assert out.cpu().sum().item() == 1000


def test_compile_error_maps_to_user_lines():
    src = "#include <metal_stdlib>\nusing namespace metal;\n\nkernel void bad(device float* o, uint i [[thread_position_in_grid]]) {\n  o[i] = undefined_thing;\n}\n"
    with pytest.raises(SyntaxError) as ei:
        compile_shader(src)
    assert ei.value.lineno == 5
    assert "program_source:5:" in str(ei.value)
    assert "undefined_thing" in str(ei.value)


def test_load_metallib_type_error(tmp_path):
    with pytest.raises(TypeError, match="^expected bytes or path, got int$"):
        shader.load_metallib(42)
    with pytest.raises(TypeError, match="^expected bytes or path, got list$"):
        shader.load_metallib([b"x"])
    with pytest.raises(RuntimeError, match="is not a torch_mps_ext shader library"):
        shader.load_metallib(b"not a library")


# --------------------------------------------------------------------------- cache & metallib
def test_disk_cache_skips_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_MPS_EXT_SHADER_CACHE", str(tmp_path))
    src = "kernel void twice(device int* o, uint i [[thread_position_in_grid]]) { o[i] = 2 * int(i); }"
    runs = shader.stats["compiler_runs"]
    lib = compile_shader(src)
    assert shader.stats["compiler_runs"] == runs + 1
    assert list(tmp_path.glob("*.so"))
    lib2 = compile_shader(src)
    assert shader.stats["compiler_runs"] == runs + 1  # second compile: cache hit, no compiler
    out = torch.zeros(8, dtype=torch.int32, device=DEV)
    lib2.twice(out)
    sync()
    assert out.cpu().tolist() == [2 * i for i in range(8)]
    # a fresh process finds the library on disk too
    code = textwrap.dedent(f"""
        import torch_mps_ext
        from torch_mps_ext import shader
        shader.compile_shader({src!r})
        print(shader.stats["compiler_runs"], shader.stats["cache_hits"])
    """)
    env = dict(os.environ, TORCH_MPS_EXT_SHADER_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "1"]
    # load_metallib: from the path and from the bytes of the cached library
    path = shader.library_path(lib)
    for src_arg in (path, str(path), path.read_bytes()):
        lib3 = shader.load_metallib(src_arg)
        assert dir(lib3) == ["twice"]
        out.zero_()
        lib3.twice(out)
        sync()
        assert out.cpu().tolist() == [2 * i for i in range(8)]


# --------------------------------------------------------------------------- barriers / simd
@pytest.mark.parametrize("n,group", [(1000, 256), (1000, 100), (37, 64), (4096, 1024), (999, 33)])
def test_threadgroup_barrier_reduction(sync_lib, n, group):
    x = torch.randn(n)
    ngroups = (n + group - 1) // group
    out = torch.zeros(ngroups, device=DEV)
    sync_lib.tg_reduce(out, dev(x), n, threads=n, group_size=group)
    sync()
    exp = torch.nn.functional.pad(x, (0, ngroups * group - n)).view(ngroups, group).sum(1)
    torch.testing.assert_close(out.cpu(), exp, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,group", [(1024, 1024), (1000, 256), (70, 70), (100, 40)])
def test_simd_sum_two_level_reduction(sync_lib, n, group):
    x = torch.randn(n)
    ngroups = (n + group - 1) // group
    out = torch.zeros(ngroups, device=DEV)
    sync_lib.simd_reduce(out, dev(x), threads=n, group_size=group)
    sync()
    exp = torch.nn.functional.pad(x, (0, ngroups * group - n)).view(ngroups, group).sum(1)
    torch.testing.assert_close(out.cpu(), exp, rtol=1e-5, atol=1e-4)


def _simd_reference(x, group):
    """Python model of simd_partial: 32-wide simdgroups inside each threadgroup."""
    n = x.numel()
    out = torch.zeros(n, 9)
    for g0 in range(0, n, group):
        gsize = min(group, n - g0)
        for s0 in range(0, gsize, 32):
            lanes = list(range(g0 + s0, g0 + min(s0 + 32, gsize)))
            v = {i - g0 - s0: float(x[i]) for i in lanes}
            a = [l for l in v if l % 3 == 0]
            b = [l for l in v if l % 3 != 0]
            for l in v:
                i = g0 + s0 + l
                if l % 3 == 0:
                    out[i, 0] = sum(v[k] for k in a)
                    out[i, 1] = max(v[k] for k in a)
                else:
                    out[i, 0] = min(v[k] for k in b)
                    p = 1.0
                    for k in b:
                        p *= 1.0 if v[k] > 0 else 2.0
                    out[i, 1] = p
                out[i, 2] = sum(v[k] for k in v if k < l)
                out[i, 3] = sum(v[k] for k in v if k <= l)
                out[i, 4] = v.get(l + 1, 0.0) if l + 1 < 32 else v[l]
                out[i, 5] = v.get(l ^ 5, 0.0)
                ballot = sum(1 << k for k in v if v[k] > 0) & 0xFFFF
                out[i, 6] = ballot + (0.5 if any(v[k] > 100 for k in v) else 0) + 0.25
                out[i, 7] = v.get(2, 0.0) + (v[l - 3] if l >= 3 else v[l])
                out[i, 8] = v.get((l * 7) % 32, 0.0)  # lanes outside the group read as 0
    return out


@pytest.mark.parametrize("n,group", [(64, 64), (50, 50), (100, 48), (45, 32)])
def test_simd_functions_with_inactive_lanes(sync_lib, n, group):
    x = torch.randn(n)
    out = torch.zeros(n * 9, device=DEV)
    sync_lib.simd_partial(out, dev(x), threads=n, group_size=group)
    sync()
    torch.testing.assert_close(out.cpu().view(n, 9), _simd_reference(x, group), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,name", [(torch.float32, "matmul_f32"), (torch.float16, "matmul_f16")])
def test_tiled_matmul(sync_lib, dtype, name):
    M, N, K = 64, 48, 37
    a, b = torch.randn(M, K).to(dtype), torch.randn(K, N).to(dtype)
    c = torch.zeros(M, N, dtype=dtype, device=DEV)
    dims = dev(torch.tensor([M, N, K], dtype=torch.int32))
    getattr(sync_lib, name)(c, dev(a), dev(b), dims, threads=(N, M), group_size=(16, 16))
    sync()
    exp = (a.float() @ b.float()).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(c.cpu(), exp, rtol=tol, atol=tol)
    assert getattr(sync_lib, name).static_thread_group_memory_length == 2 * 16 * 16 * 4


def test_address_space_overloads(sync_lib):
    x = torch.tensor([1.0, 2.0, 4.0])
    out = torch.zeros(4, device=DEV)
    sync_lib.overloads(out, dev(x), [10.0, 20.0, 30.0], group_size=4)
    sync()
    assert out.cpu().tolist() == [7.0 + 14.0 + 60.0] * 4


def test_collectives_behind_lambdas_and_functors(sync_lib):
    x = torch.randn(64)
    out = torch.zeros(64, device=DEV)
    sync_lib.via_lambda(out, dev(x), group_size=64)
    sync()
    torch.testing.assert_close(out.cpu(), x.view(2, 32).sum(1).repeat_interleave(32))
    sync_lib.apply_lanemax(out, dev(x), group_size=64)
    sync()
    torch.testing.assert_close(out.cpu(), x.view(2, 32).amax(1).repeat_interleave(32))


def test_atomics(sync_lib):
    n = 3000
    x = torch.randint(-1000, 1000, (n,), dtype=torch.int32)
    acc_i = dev(torch.tensor([0, -(2**31), 2**31 - 1, 0, 0], dtype=torch.int32))
    acc_u = torch.zeros(2, dtype=torch.int32, device=DEV)
    acc_f = dev(torch.tensor([0.0, float("-inf"), float("inf"), 0.0]))
    swapped = torch.zeros(n, dtype=torch.int32, device=DEV)
    sync_lib.atomics(acc_i, acc_u, acc_f, dev(x), swapped, threads=n, group_size=128)
    sync()
    ai = acc_i.cpu()
    assert ai[0].item() == int(x.sum())
    assert ai[1].item() == int(x.max())
    assert ai[2].item() == int(x.min())
    assert ai[3].item() == 2 * n
    assert 0 <= ai[4].item() < n
    assert acc_u.cpu()[0].item() == n and acc_u.cpu()[1].item() == -1  # all 32 bits set
    af = acc_f.cpu()
    torch.testing.assert_close(af[0], x.float().sum() * 0.5)
    assert af[1].item() == x.max().item() * 0.25 and af[2].item() == x.min().item() * 0.25
    assert af[3].item() == float(n)
    assert swapped.cpu().sum().item() == n


def test_results_independent_of_thread_count_and_group_size(basic_lib, sync_lib):
    rows, cols = 257, 129
    x = torch.randn(rows * cols)
    results = []
    old = torch.get_num_threads()
    try:
        for nthreads, group in ((1, 1), (2, 7), (old, 64), (2, 256)):
            torch.set_num_threads(nthreads)
            out = torch.empty(rows, device=DEV)
            basic_lib.sum_rows(out, dev(x), cols, threads=rows, group_size=group)
            red = torch.zeros((rows * cols + 127) // 128, device=DEV)
            sync_lib.tg_reduce(red, dev(x), rows * cols, threads=rows * cols, group_size=128)
            sync()
            results.append((out.cpu(), red.cpu()))
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        assert torch.equal(r[0], results[0][0])
        assert torch.equal(r[1], results[0][1])


# --------------------------------------------------------------------------- torch's c10/metal headers
def test_c10_utils(c10_lib):
    a = torch.tensor([5.5, -5.5, 7.0, -7.25, 3.0e-20, 1e20])  # (c10 hypot expects |a|, |b|: tested on abs)
    b = torch.tensor([2.0, 2.0, -3.0, -2.5, 4.0e-20, 3e19])
    ia = torch.tensor([7, -7, 7, -7, 0, 100])
    ib = torch.tensor([2, 2, -2, -2, 3, 7])
    out = torch.zeros(18, device=DEV)
    iout = torch.zeros(12, dtype=torch.long, device=DEV)
    c10_lib.utils_k(out, dev(a), dev(b), iout, dev(ia), dev(ib), threads=6)
    hyp = torch.zeros(18, device=DEV)
    c10_lib.utils_k(hyp, dev(a.abs()), dev(b.abs()), iout, dev(ia), dev(ib), threads=6)
    sync()
    o = out.cpu().view(6, 3)
    torch.testing.assert_close(o[:, 0], torch.remainder(a, b))
    torch.testing.assert_close(o[:, 1], torch.floor_divide(a, b))
    torch.testing.assert_close(hyp.cpu().view(6, 3)[:, 2], torch.hypot(a, b))
    io = iout.cpu().view(6, 2)
    assert torch.equal(io[:, 0], torch.floor_divide(ia, ib))
    assert torch.equal(io[:, 1], torch.remainder(ia, ib))


def _philox_uniform(seed, idx):
    """Reference Philox 4x32-10 (as c10/metal/random.h) -> uniform float from the first word."""
    M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    ctr = [0, 0, (idx >> 32) & 0xFFFFFFFF, idx & 0xFFFFFFFF]
    key = [(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF]
    for _ in range(9):
        p0 = M0 * ctr[0]
        p1 = M1 * ctr[2]
        ctr = [((p1 >> 32) ^ ctr[1] ^ key[0]) & 0xFFFFFFFF, p1 & 0xFFFFFFFF,
               ((p0 >> 32) ^ ctr[3] ^ key[1]) & 0xFFFFFFFF, p0 & 0xFFFFFFFF]
        key = [(key[0] + W0) & 0xFFFFFFFF, (key[1] + W1) & 0xFFFFFFFF]
    u1 = torch.tensor(ctr[0] & 0x7FFFFFFF, dtype=torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    u2 = torch.tensor(ctr[1] & 0x7FFFFFFF, dtype=torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    return u1.item(), u2.item()


def test_c10_random(c10_lib):
    n = 64
    seed = 123456789012
    out = torch.zeros(2 * n, device=DEV)
    c10_lib.random_k(out, seed, threads=n)
    sync()
    o = out.cpu().view(n, 2)
    ref = [_philox_uniform(seed, i) for i in range(n)]
    u1 = torch.tensor([r[0] for r in ref])
    u2 = torch.tensor([r[1] for r in ref])
    torch.testing.assert_close(o[:, 0], u1)
    normal = torch.sqrt(-2.0 * torch.log(1.0 - u1)) * torch.cos(2.0 * torch.pi * (1.0 - u2))
    torch.testing.assert_close(o[:, 1], normal, rtol=1e-4, atol=1e-4)
    big = torch.zeros(2 * 20000, device=DEV)
    c10_lib.random_k(big, 7, threads=20000)
    sync()
    u = big.cpu().view(-1, 2)[:, 0]
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def test_c10_special_math_igamma_expm1f(c10_lib):
    x = torch.linspace(-0.95, 2.0, 23)
    out = torch.zeros(23 * 6, device=DEV)
    c10_lib.special_k(out, dev(x), threads=23)
    sync()
    o = out.cpu().view(23, 6)
    torch.testing.assert_close(o[:, 0], torch.special.erfinv(x * 0.45), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(o[:, 1], torch.special.i0(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o[:, 2], torch.special.digamma(x + 3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o[:, 3], torch.special.erf(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o[:, 4], torch.special.expm1(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o[:, 5], torch.special.gammainc(x + 2, torch.tensor(1.5)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,group", [(1024, 256), (1000, 128), (77, 77)])
def test_c10_reduction_utils(c10_lib, n, group):
    x = torch.randn(n)
    ngroups = (n + group - 1) // group
    out = torch.zeros(ngroups, device=DEV)
    amax = torch.zeros(ngroups, dtype=torch.long, device=DEV)
    c10_lib.reduce_k(out, amax, dev(x), threads=n, group_size=group)
    sync()
    padded = torch.nn.functional.pad(x, (0, ngroups * group - n), value=float("-inf"))
    exp_sum = torch.nn.functional.pad(x, (0, ngroups * group - n)).view(ngroups, group).sum(1)
    torch.testing.assert_close(out.cpu(), exp_sum, rtol=1e-5, atol=1e-4)
    exp_arg = padded.view(ngroups, group).argmax(1) + torch.arange(ngroups) * group
    assert torch.equal(amax.cpu(), exp_arg)


def test_c10_atomic(c10_lib):
    n = 1000
    x = torch.randn(n)
    acc = torch.zeros(4, device=DEV)
    hacc = torch.zeros(2, dtype=torch.float16, device=DEV)
    c10_lib.atomic_k(acc, hacc, dev(x), threads=n, group_size=100)
    sync()
    torch.testing.assert_close(acc.cpu(), x.view(-1, 4).sum(0), rtol=1e-4, atol=1e-4)
    assert hacc.cpu().tolist() == [500.0, 500.0]


def test_c10_error_buffer_raises_at_synchronize(c10_lib):
    out = torch.zeros(8, device=DEV)
    sync()
    c10_lib.error_k(out, 5, threads=8, error_buf_idx=2)  # returns at once; the error is pending
    with pytest.raises(torch.AcceleratorError, match="index 5 is out of bounds for size 5"):
        sync()
    sync()  # the error was consumed
    assert out.cpu().tolist() == [1.0] * 5 + [0.0] * 3


def test_c10_indexing_register_unary_op(c10_lib):
    assert {"cube_dense_float_float", "cube_strided_float_float", "cube_dense_half_half"} <= set(dir(c10_lib))
    n = 30
    x = torch.randn(n)
    out = torch.zeros(n, device=DEV)
    c10_lib.cube_dense_float_float(out, dev(x), n, threads=(n + 3) // 4)
    sync()
    torch.testing.assert_close(out.cpu(), x ** 3)
    xh = torch.randn(n).half()
    outh = torch.zeros(n, dtype=torch.float16, device=DEV)
    c10_lib.cube_dense_scalar_half_half(outh, dev(xh))
    sync()
    torch.testing.assert_close(outh.cpu(), xh * xh * xh)
    # strided variant on a transposed input: sizes/strides innermost first, strides in bytes
    base = torch.randn(6, 4)
    xt = dev(base).t()  # shape (4, 6), strides (1, 4): a view of device memory
    outs = torch.zeros(4, 6, device=DEV)
    c10_lib.cube_strided_float_float(outs, xt, [6, 4], [xt.stride(1) * 4, xt.stride(0) * 4], [4, 24], 2,
                                     threads=(6, 4))
    sync()
    torch.testing.assert_close(outs.cpu(), base.t() ** 3)


# --------------------------------------------------------------------------- checked mode
def test_checked_mode_reports_out_of_bounds(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_MPS_EXT_SHADER_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_MPS_EXT_SHADER_CHECKED", "1")
    src = "kernel void oob_write(device float* out, constant float* inp, uint i [[thread_position_in_grid]])" \
          " { out[i + 1] = inp[i]; }"
    lib = compile_shader(src)
    big = torch.zeros(9, device=DEV)
    out = big[:8]
    sync()
    lib.oob_write(out, dev(torch.ones(8)))
    with pytest.raises(torch.AcceleratorError, match=r"kernel 'oob_write'.*argument 'out'.*element 8"):
        sync()
    assert big.cpu()[8].item() == 0.0  # the bad write was suppressed
    assert out.cpu()[1:].tolist() == [1.0] * 7
    # an in-bounds kernel runs normally under the checker
    lib.oob_write(big, dev(torch.ones(8)), threads=8)
    sync()


def test_example_custom_kernel_runs():
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).parent.parent / "examples" / "custom_kernel.py"), run_name="__main__")


# --------------------------------------------------------------------------- execution
# A launch is a device command (aten/ShaderLaunch.h): queued on the current
# stream, the call returns at once, results and errors arrive in stream order.
SLOW_COPY = """
kernel void slow_copy(device float* out, device const float* in, constant long& spins,
                      uint i [[thread_position_in_grid]]) {
  // Only thread 0 spins: the launch's cost is one thread's `spins`, and in a
  // single threadgroup (run in order) every later thread reads `in` after it.
  float acc = 0.0f;
  const long n = i == 0 ? spins : 0;
  for (long k = 0; k < n; ++k) acc += metal::precise::sin(float(k) * 1e-3f);
  out[i] = in[i] + (acc == 12345.0f ? 1.0f : 0.0f);
}
"""


@pytest.fixture(scope="module")
def slow_lib():
    return compile_shader(SLOW_COPY)


def _spins_for(slow_lib, seconds):
    """Spins that keep one thread of slow_copy busy for about `seconds`."""
    x = torch.zeros(1, device=DEV)
    t0 = time.perf_counter()
    slow_lib.slow_copy(x, x, 200_000, threads=1)
    sync()
    per_spin = max((time.perf_counter() - t0) / 200_000, 1e-9)
    return int(seconds / per_spin)


def test_launch_returns_before_the_kernel_has_run(slow_lib):
    spins = _spins_for(slow_lib, 0.5)
    src = torch.arange(4.0, device=DEV)
    out = torch.zeros(4, device=DEV)
    stream = torch.mps_ext.current_stream()
    slow_lib.slow_copy(out, src, spins, threads=4, group_size=1)
    assert not stream.query()  # still running: the call did not wait for it
    assert out.cpu().tolist() == [0.0, 1.0, 2.0, 3.0]  # .cpu() is ordered after it
    assert stream.query()


MEET_SRC = r"""
#include <metal_stdlib>
using namespace metal;
// Threadgroup 0 waits (bounded) for the last threadgroup's flag: it sees the flag only
// when the two run at the same time, on different intra-op threads.
kernel void meet(device atomic_uint* flag [[buffer(0)]], device uint* seen [[buffer(1)]],
                 constant uint& max_spins [[buffer(2)]],
                 uint g [[threadgroup_position_in_grid]], uint n [[threadgroups_per_grid]]) {
  if (g == n - 1) atomic_store_explicit(flag, 1u, memory_order_relaxed);
  if (g == 0) {
    uint spins = 0;
    while (atomic_load_explicit(flag, memory_order_relaxed) == 0u && spins < max_spins) ++spins;
    seen[0] = atomic_load_explicit(flag, memory_order_relaxed);
  }
}
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
def test_threadgroups_run_on_the_intra_op_threads_torch_set_num_threads_sets():
    lib = compile_shader(MEET_SRC)
    old = torch.get_num_threads()

    def met(threads):
        torch.set_num_threads(threads)
        flag = torch.zeros(1, dtype=torch.int32, device=DEV)
        seen = torch.zeros(1, dtype=torch.int32, device=DEV)
        lib.meet(flag, seen, 200_000_000, threads=2, group_size=1)
        return seen.item()

    try:
        # one thread: the groups run one after the other, group 0 gives up waiting
        assert met(1) == 0
        # raised after the stream's worker already ran kernels: it follows
        assert met(2) == 1
        assert met(1) == 0
    finally:
        torch.set_num_threads(old)


def test_side_stream_kernel_does_not_delay_default_stream(slow_lib):
    spins = _spins_for(slow_lib, 0.5)
    side = torch.mps_ext.Stream()
    src = torch.ones(2, device=DEV)
    out = torch.zeros(2, device=DEV)
    sync()
    with torch.mps_ext.stream(side):
        slow_lib.slow_copy(out, src, spins, threads=2, group_size=1)
    y = (torch.arange(3.0, device=DEV) * 2).cpu()  # default stream: runs now
    assert y.tolist() == [0.0, 2.0, 4.0]
    assert not side.query()  # the side stream's kernel is still running
    side.synchronize()
    assert out.cpu().tolist() == [1.0, 1.0]


def test_freed_input_of_a_queued_kernel_is_not_reused_before_it_ran(slow_lib):
    spins = _spins_for(slow_lib, 0.3)
    side = torch.mps_ext.Stream()
    out = torch.zeros(1024, device=DEV)
    src = torch.full((1024,), 7.0, device=DEV)  # allocated on the default stream
    sync()
    with torch.mps_ext.stream(side):
        slow_lib.slow_copy(out, src, spins, threads=1024, group_size=1024)
    del src
    reuse = torch.full((1024,), -1.0, device=DEV)  # same size, default stream
    torch.mps_ext.synchronize()
    assert (out.cpu() == 7.0).all()
    assert (reuse.cpu() == -1.0).all()


def test_kernel_errors_surface_at_synchronize_and_event_wait(c10_lib):
    out = torch.zeros(8, device=DEV)
    sync()
    c10_lib.error_k(out, 5, threads=8, error_buf_idx=2)
    with pytest.raises(torch.AcceleratorError, match="index 5 is out of bounds for size 5"):
        sync()
    assert out.cpu().tolist() == [1.0] * 5 + [0.0] * 3
    sync()  # the error was taken: the device works on


def test_profiler_records_the_launch_on_its_stream(slow_lib, tmp_path):
    import json

    side = torch.mps_ext.Stream()
    x = torch.zeros(4, device=DEV)
    trace = tmp_path / "trace.json"
    os.environ["PYTORCH_MPS_EXT_TRACE_FILE"] = str(trace)
    try:
        torch.mps_ext.profiler.start()
        with torch.mps_ext.stream(side):
            slow_lib.slow_copy(x, x, 10, threads=4)
        torch.mps_ext.synchronize()
        torch.mps_ext.profiler.stop()
    finally:
        os.environ.pop("PYTORCH_MPS_EXT_TRACE_FILE")
    events = json.loads(trace.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    launches = [e for e in events if e.get("name") == "slow_copy"]
    assert launches, [e.get("name") for e in events]
    assert any(str(side.stream_id) in json.dumps(e) for e in launches)


def test_precise_math_is_within_metal_bounds_vectorized():
    # Elementary functions vectorize through glibc's libmvec on x86-64
    # (mpsx_metal.h); Metal allows its precise:: functions 4 ulp.
    lib = torch.mps_ext.compile_shader("""
        #include <metal_stdlib>
        using namespace metal;
        kernel void ksin(device float* o, constant float* a, uint i [[thread_position_in_grid]]) { o[i] = precise::sin(a[i]); }
        kernel void kexp(device float* o, constant float* a, uint i [[thread_position_in_grid]]) { o[i] = precise::exp(a[i]); }
        kernel void klog(device float* o, constant float* a, uint i [[thread_position_in_grid]]) { o[i] = precise::log(a[i]); }
        kernel void ktanh(device float* o, constant float* a, uint i [[thread_position_in_grid]]) { o[i] = precise::tanh(a[i]); }
    """)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1 << 16, generator=g) * 20
    eps, tiny = torch.finfo(torch.float32).eps, torch.finfo(torch.float32).tiny
    for name, ref, x in (("ksin", torch.sin, a), ("kexp", torch.exp, a / 4),
                         ("klog", torch.log, a.abs() + 1e-3), ("ktanh", torch.tanh, a / 8)):
        xd = x.to("mps_ext")
        out = torch.empty_like(xd)
        getattr(lib, name)(out, xd)
        exact = ref(x.double())
        ulps = ((out.cpu().double() - exact).abs() / (eps * exact.abs().clamp_min(tiny))).max()
        assert ulps <= 4.0, (name, ulps.item())


def test_compiler_does_not_inherit_the_asan_preload(monkeypatch):
    # Under `make asan` the interpreter runs with the ASan runtime in LD_PRELOAD; the
    # compiler must not inherit it (it could not reserve its shadow memory under the
    # compiler's address-space limit, and every compile would fail).
    cxx = shader._compiler.compiler()[-1]
    libasan = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.skip("the compiler has no ASan runtime")
    monkeypatch.setenv("LD_PRELOAD", libasan)
    monkeypatch.setenv("ASAN_OPTIONS", "detect_leaks=0")
    lib = torch.mps_ext.compile_shader(
        "kernel void asan_env(device float* o, uint i [[thread_position_in_grid]]) { o[i] = 2.0f * i; }")
    out = torch.zeros(4, device=DEV)
    lib.asan_env(out)
    sync()
    assert out.cpu().tolist() == [0.0, 2.0, 4.0, 6.0]
