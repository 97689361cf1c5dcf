// Layer 3: what Apple's MPS backend computes and CPU does not (or computes
// otherwise), so that the boxed fallback alone cannot serve it on mps_ext
// (issue 23; docs/fidelity.md, "Kernels MPS has and CPU lacks").
//
//   - _convert_weight_to_int4pack / _weight_int4pack_mm: MPS's int4 weight
//     packing and its grouped-quantized matmul, with MPS's layout and
//     semantics (the CPU has its own `_for_cpu` variants with another layout).
//     Layout, as MPS defines it: the input is uint8 [N, K/2], byte j of row n
//     holding q[n][2j] in its high nibble and q[n][2j+1] in its low nibble
//     (what torch's _group_quantize_tensor builds off CPU). Packing swaps the
//     nibbles of every byte (q[n][2j] low, q[n][2j+1] high), same byte order,
//     in an int32 tensor of MPS's shape [N/8, K/(16*innerKTiles), 32,
//     innerKTiles/2]. The matmul reads row n of it at byte n*K/2 and computes
//     C[m][n] = sum_k A[m][k] * (scale * q[n][k] + (zero - 8 * scale)), with
//     (scale, zero) = qScaleAndZeros[k / qGroupSize][n], the zero term rounded
//     in A's dtype as MPS's kernel does, the sum in float32.
//   - mish_backward: CPU and MPS have kernels; the PrivateUse1 key otherwise
//     gets the CompositeImplicitAutograd decomposition, which computes in the
//     tensor's dtype (float16: 2,511 of 4,096 gradients differed from CPU's
//     float32-opmath kernel). The fallback runs CPU's kernel instead.
//   - grid_sampler_2d/3d and their backwards in float16/bfloat16, in mps
//     fidelity mode only: MPS computes them in float32 (opmath) and rounds
//     the results; CPU's kernels compute in half precision (the difference
//     grows without bound with the grid's magnitude). Off, CPU's kernels as
//     before.
//   - bincount with weights, in mps fidelity mode only: MPS's kernel returns
//     float32 for float32 weights, int32 for int32 weights, the weights'
//     dtype for float16/bfloat16 (summed in float32), and int32 for every
//     other dtype (each weight truncated to int32 first); CPU's returns
//     float32 or float64 (an empty input: int64 zeros on MPS). Off, CPU's
//     dtypes as before.
//   - (_sample_dirichlet in float16/bfloat16, which MPS samples and CPU's
//     kernel does not: RandomCpuDerived.cpp samples them in float32.)
#include "aten/Fallback.h"
#include "aten/Fidelity.h"
#include "aten/HostView.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>

namespace torch_mps_ext {
namespace {

// MPS's own texts (aten/src/ATen/native/mps/operations/Quantized.mm).
constexpr const char* kPackName = "_convert_weight_to_int4pack_mps";
constexpr const char* kMmName = "_weight_int4pack_mm_mps";

at::Tensor convertWeightToInt4pack(const at::Tensor& in, int64_t innerKTiles) {
  TORCH_CHECK(in.dim() == 2, kPackName, " : expect weight to be 2D tensor.");
  TORCH_CHECK(in.scalar_type() == at::kByte, kPackName, " : expect weight to be kByte.");
  TORCH_CHECK(innerKTiles == 2 || innerKTiles == 4 || innerKTiles == 8, kPackName,
              " : innerKTiles need to be 2, 4, or 8, got ", innerKTiles);
  const int64_t N = in.size(0);
  const int64_t Kdiv2 = in.size(1);
  const int64_t K = Kdiv2 * 2;
  // MPS's output shape holds N*K/2 bytes only when these divide; MPS writes
  // past it otherwise. Refused here.
  TORCH_CHECK(N % 8 == 0 && K % (16 * innerKTiles) == 0, kPackName,
              " : expect N (weight.size(0)) to be a multiple of 8 and K (2 * weight.size(1)) a "
              "multiple of 16 * innerKTiles = ", 16 * innerKTiles, ", got N = ", N, ", K = ", K);
  at::Tensor out = at::empty({N / 8, K / (16 * innerKTiles), 32, innerKTiles / 2},
                             in.options().dtype(at::kInt));
  at::Tensor src = hostView(in).contiguous();
  at::Tensor dst = hostView(out);
  const auto* s = src.const_data_ptr<uint8_t>();
  auto* d = static_cast<uint8_t*>(dst.data_ptr());
  at::parallel_for(0, N * Kdiv2, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      d[i] = static_cast<uint8_t>((s[i] << 4) | (s[i] >> 4));
    }
  });
  return out;
}

at::Tensor weightInt4packMm(const at::Tensor& A, const at::Tensor& B, int64_t qGroupSize,
                            const at::Tensor& qScaleAndZeros) {
  constexpr int64_t kNTileSize = 8;
  TORCH_CHECK(A.scalar_type() == at::kBFloat16 || A.scalar_type() == at::kHalf ||
                  A.scalar_type() == at::kFloat,
              kMmName, " : expect A to be either 32-bit or 16-bit float tensor.");
  TORCH_CHECK(A.is_contiguous(), kMmName, " : expect A to be contiguous.");
  TORCH_CHECK(A.dim() == 2, kMmName, " : expect A to be 2D tensor.");
  TORCH_CHECK(B.scalar_type() == at::kInt, kMmName, " : expect B to be int32 tensor.");
  TORCH_CHECK(B.is_contiguous(), kMmName, " : expect B to be contiguous.");
  TORCH_CHECK(B.dim() == 4, kMmName, " : expect B to 4d tensor.");
  TORCH_CHECK(qGroupSize == 32 || qGroupSize == 64 || qGroupSize == 128 || qGroupSize == 256,
              kMmName, ": expect qGroupSize to be 32, 64, 128 or 256, got ", qGroupSize);
  const int64_t M = A.size(0);
  const int64_t K = A.size(1);
  const int64_t N = B.size(0) * kNTileSize;
  TORCH_CHECK(qScaleAndZeros.dim() == 3 && qScaleAndZeros.size(1) == N &&
                  qScaleAndZeros.size(2) == 2,
              kMmName, ": expect qScaleAndZeros to be 3d tensor with sizes [:, ", N, ", 2]");
  // What MPS's kernel assumes without checking (it reads out of bounds or
  // reinterprets otherwise): refused with a clear error here.
  TORCH_CHECK(K % 2 == 0 && B.numel() * 4 == N * K / 2, kMmName,
              " : expect B to pack A.size(1) = ", K, " 4-bit values for each of its ", N,
              " rows (", N * K / 2, " bytes), got ", B.numel() * 4, " bytes");
  TORCH_CHECK(qScaleAndZeros.size(0) * qGroupSize >= K, kMmName, " : expect qScaleAndZeros to have ",
              (K + qGroupSize - 1) / qGroupSize, " groups for K = ", K, ", got ",
              qScaleAndZeros.size(0));
  TORCH_CHECK(qScaleAndZeros.scalar_type() == A.scalar_type(), kMmName,
              " : expect qScaleAndZeros to have A's dtype ", A.scalar_type(), ", got ",
              qScaleAndZeros.scalar_type());
  TORCH_CHECK(A.device() == B.device() && A.device() == qScaleAndZeros.device(), kMmName,
              " : expect A, B and qScaleAndZeros on one device, got ", A.device(), ", ",
              B.device(), " and ", qScaleAndZeros.device());

  at::Tensor C = at::empty({M, N}, A.options());
  at::Tensor a_h = hostView(A);
  at::Tensor b_h = hostView(B);
  at::Tensor sz_h = hostView(qScaleAndZeros).contiguous();
  at::Tensor c_h = hostView(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), kMmName, [&] {
    const auto* a = a_h.const_data_ptr<scalar_t>();
    const auto* b = static_cast<const uint8_t*>(b_h.const_data_ptr());
    const auto* sz = sz_h.const_data_ptr<scalar_t>();
    auto* c = c_h.data_ptr<scalar_t>();
    const int64_t groups = (K + qGroupSize - 1) / qGroupSize;
    // Dequantization terms per (group, n): scale, and zero - 8 * scale
    // rounded in scalar_t as MPS's kernel computes it.
    std::vector<float> scale(groups * N), offset(groups * N);
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t s = sz[(g * N + n) * 2];
        const scalar_t z = sz[(g * N + n) * 2 + 1];
        scale[g * N + n] = static_cast<float>(s);
        offset[g * N + n] = static_cast<float>(static_cast<scalar_t>(z - s * scalar_t(8)));
      }
    }
    at::parallel_for(0, M * N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t m = i / N;
        const int64_t n = i % N;
        const uint8_t* row = b + n * (K / 2);
        const scalar_t* a_row = a + m * K;
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          const int q = (row[k / 2] >> ((k & 1) * 4)) & 0xF;
          const int64_t gn = (k / qGroupSize) * N + n;
          acc += static_cast<float>(a_row[k]) * (scale[gn] * static_cast<float>(q) + offset[gn]);
        }
        c[i] = static_cast<scalar_t>(acc);
      }
    });
  });
  return C;
}

bool isHalf(const at::Tensor& t) {
  return t.defined() && (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16);
}

// Runs the operator's CPU kernel (the fallback) with its float16/bfloat16
// tensor arguments in float32 and rounds the results back, as MPS computes
// these operators. Only in mps mode; otherwise the fallback as it is.
void inFloat32OnMps(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t nargs = op.schema().arguments().size();
  const size_t first = stack->size() - nargs;
  std::optional<at::ScalarType> half;
  if (runtime::fidelity::on()) {
    for (size_t i = first; i < stack->size(); ++i) {
      auto& v = (*stack)[i];
      if (v.isTensor() && isHalf(v.toTensor())) {
        half = v.toTensor().scalar_type();
        v = v.toTensor().to(at::kFloat);
      }
    }
  }
  runFallback(op, stack);
  if (!half) return;
  const size_t nret = op.schema().returns().size();
  for (size_t i = stack->size() - nret; i < stack->size(); ++i) {
    auto& v = (*stack)[i];
    if (v.isTensor() && v.toTensor().defined() && v.toTensor().scalar_type() == at::kFloat) {
      v = v.toTensor().to(*half);
    }
  }
}

// bincount(self, weights, minlength): CPU's kernel, with the result in the
// dtype MPS's kernel gives for the weights' dtype in mps mode.
void bincountOnMps(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t first = stack->size() - op.schema().arguments().size();
  const c10::IValue& w = (*stack)[first + 1];
  std::optional<at::ScalarType> result;
  if (runtime::fidelity::on() && w.isTensor() && w.toTensor().defined()) {
    const at::ScalarType wt = w.toTensor().scalar_type();
    if ((*stack)[first].toTensor().numel() == 0) {
      result = at::kLong;  // MPS's early return for an empty input
    } else if (wt == at::kFloat || wt == at::kHalf || wt == at::kBFloat16) {
      result = wt;
    } else {
      result = at::kInt;
      // Truncated to int32 first, as MPS's kernel sums int32 weights.
      if (wt != at::kInt) (*stack)[first + 1] = w.toTensor().to(at::kInt);
    }
  }
  runFallback(op, stack);
  if (!result) return;
  const at::Tensor& out = stack->back().toTensor();
  if (out.scalar_type() == *result) return;
  // Converted on the host: CPU's float64 result is this kernel's own
  // intermediate, not a float64 tensor the user made. Integer sums wrap at
  // 32 bits as MPS's int32 accumulator does (exact in float64, which CPU's
  // kernel sums int weights in).
  at::Tensor host = hostView(out);
  if (*result == at::kInt) host = host.to(at::kLong);
  at::Tensor converted = at::empty(out.sizes(), out.options().dtype(*result));
  hostView(converted).copy_(host);
  stack->back() = converted;
}

} // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  for (const char* name : {"grid_sampler_2d", "grid_sampler_3d", "grid_sampler_2d_backward",
                           "grid_sampler_3d_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&inFloat32OnMps>());
  }
  m.impl("_convert_weight_to_int4pack", TORCH_FN(convertWeightToInt4pack));
  m.impl("_weight_int4pack_mm", TORCH_FN(weightInt4packMm));
  m.impl("mish_backward", torch::CppFunction::makeFromBoxedFunction<&runFallback>());
  m.impl("bincount", torch::CppFunction::makeFromBoxedFunction<&bincountOnMps>());
}

} // namespace torch_mps_ext
