// Layer 3: scaled-dot-product attention as Apple's MPS backend runs it
// (issue 23; docs/fidelity.md, "Kernels MPS has and CPU lacks" and "SDPA's
// route in mps mode").
//
//   - _scaled_dot_product_attention_math_for_mps: an operator with an MPS
//     kernel only (CPU has none, so the fallback cannot serve it). mps_ext's
//     kernel, in both modes, computes what MPS's does
//     (aten/src/ATen/native/mps/operations/Attention.mm):
//       * query/key/value of 3 dimensions get a batch of 1, more than 4 are
//         flattened to one batch dimension; the results have the query's
//         leading dimensions;
//       * key/value heads may divide the query heads (grouped-query
//         attention, whatever enable_gqa says: MPS derives the group size
//         from the head counts);
//       * the mask is expanded to (..., heads, L, S): bool (True takes part)
//         or additive float;
//       * is_causal keeps keys j <= i for query row i (top-left, as CPU);
//         is_causal together with a mask is combined where MPS runs its
//         prefill kernel (L > 8, float32/float16/bfloat16, a bool mask or one
//         of the query's dtype, equal query and value head dims among 32, 64,
//         72, 80, 96, 128, 256) and refused elsewhere with MPS's text (its
//         MPSGraph path does not combine them);
//       * rows whose every score is -inf give 0, not NaN (MPS's correction);
//       * float16/bfloat16 are computed in float32 as MPS's kernels compute
//         them: scores, softmax and accumulation in float32, the
//         unnormalized probabilities rounded to the inputs' dtype for the
//         product with V (as CPU's flash kernel does too);
//       * the second result is the attention weights, (..., heads, L, S), in
//         the query's dtype, as MPS's MPSGraph path and torch's meta kernel
//         give it (MPS's kernel paths return scratch tensors there);
//       * dropout is refused (NotImplementedError), as are non-float dtypes.
//   - scaled_dot_product_attention in mps fidelity mode: ATen sends an MPS
//     call of the math backend (the only one MPS has) to
//     _scaled_dot_product_attention_math_for_mps when there is no dropout, no
//     input requires grad under grad mode and nothing is nested
//     (aten/src/ATen/native/transformers/attention.cpp branches on
//     DeviceType::MPS). mps mode takes the same route here; everything else,
//     and the default mode, runs ATen's own composite unchanged (calls that
//     ATen's input checks would refuse go that way too, so they fail with
//     ATen's errors). Registered on AutogradPrivateUse1 (where the composite
//     runs normally) and on PrivateUse1 (where it runs under inference mode).
#include "aten/Fidelity.h"
#include "aten/HostView.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/_scaled_dot_product_attention_math_for_mps.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scaled_dot_product_attention_native.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace torch_mps_ext {
namespace {

// MPS's texts (Attention.mm).
constexpr const char* kCausalWithMask =
    "_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True";
constexpr const char* kName = "_scaled_dot_product_attention_math_for_mps";

bool isMpsFloat(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// MPS's ensure_4d: 3 dimensions get a batch of 1, more than 4 one flattened
// batch dimension.
at::Tensor as4d(const at::Tensor& t) {
  if (t.dim() == 3) return t.unsqueeze(0);
  if (t.dim() > 4) return t.reshape({-1, t.size(-3), t.size(-2), t.size(-1)});
  return t;
}

// Where MPS's _scaled_dot_product_attention_math_mps runs its prefill
// kernel, the only one of its paths that combines is_causal with a mask.
bool mpsPrefill(const at::Tensor& q4, const at::Tensor& k4, const at::Tensor& v4,
                const at::Tensor& mask) {
  const int64_t d = q4.size(3);
  const bool head_dim = d == v4.size(3) &&
      (d == 32 || d == 64 || d == 72 || d == 80 || d == 96 || d == 128 || d == 256);
  const bool mask_ok = mask.scalar_type() == at::kBool || mask.scalar_type() == q4.scalar_type();
  return q4.size(2) > 8 && isMpsFloat(q4.scalar_type()) && mask_ok && head_dim && k4.size(2) > 0;
}

std::tuple<at::Tensor, at::Tensor> mathForMps(const at::Tensor& query, const at::Tensor& key,
                                              const at::Tensor& value,
                                              const std::optional<at::Tensor>& attn_mask,
                                              double dropout_p, bool is_causal,
                                              const std::optional<at::Tensor>& /*dropout_mask*/,
                                              std::optional<double> scale, bool /*enable_gqa*/) {
  for (const at::Tensor* t : {&query, &key, &value}) {
    TORCH_CHECK_NOT_IMPLEMENTED(c10::isFloatingType(t->scalar_type()),
                                "scaled_dot_product_attention for MPS does not support dtype ",
                                t->scalar_type());
  }
  TORCH_CHECK_NOT_IMPLEMENTED(dropout_p == 0.0,
                              "scaled_dot_product_attention for MPS does not support dropout.");
  if (C10_UNLIKELY(fidelity::on())) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("aten::_scaled_dot_product_attention_math_for_mps", "");
    for (const at::Tensor* t : {&query, &key, &value}) fidelity::checkOperandDtype(t->scalar_type(), &op);
  }
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && query.scalar_type() == value.scalar_type(),
              kName, ": expected query, key and value of one dtype, got ", query.scalar_type(), ", ",
              key.scalar_type(), " and ", value.scalar_type());
  TORCH_CHECK(query.dim() >= 3 && key.dim() == query.dim() && value.dim() == query.dim(), kName,
              ": expected query, key and value with the same number of dimensions, at least 3 "
              "(..., heads, sequence, head dim), got ",
              query.dim(), ", ", key.dim(), " and ", value.dim());
  const auto device = query.device();
  TORCH_CHECK(key.device() == device && value.device() == device &&
                  (!attn_mask || attn_mask->device() == device),
              kName, ": expected all tensors on ", device);
  const int64_t q_heads = query.size(-3);
  const int64_t k_heads = key.size(-3);
  TORCH_CHECK(q_heads % k_heads == 0, "For GQA, the query tensor's head dimension (", q_heads,
              ") must be divisible by the key tensor's head dimension (", k_heads, ").");
  TORCH_CHECK(value.size(-3) == k_heads && value.size(-2) == key.size(-2) &&
                  key.size(-1) == query.size(-1) &&
                  key.sizes().slice(0, key.dim() - 3) == query.sizes().slice(0, query.dim() - 3) &&
                  value.sizes().slice(0, value.dim() - 3) == query.sizes().slice(0, query.dim() - 3),
              kName, ": expected key ", key.sizes(), " and value ", value.sizes(),
              " to match query ", query.sizes(),
              " (same leading dimensions, key's head dim, one key/value sequence and head count)");

  const at::Tensor q4 = as4d(query);
  const at::Tensor k4 = as4d(key);
  const at::Tensor v4 = as4d(value);
  const int64_t B = q4.size(0), Hq = q4.size(1), L = q4.size(2), E = q4.size(3);
  const int64_t S = k4.size(2), Ev = v4.size(3);
  const int64_t g = Hq / k_heads;

  std::optional<at::Tensor> mask4;
  if (attn_mask) {
    TORCH_CHECK(attn_mask->scalar_type() == at::kBool || c10::isFloatingType(attn_mask->scalar_type()),
                kName, ": expected a bool or floating-point attn_mask, got ", attn_mask->scalar_type());
    std::vector<int64_t> expanded = query.sizes().vec();
    expanded.back() = S;
    mask4 = as4d(attn_mask->expand(expanded));
  }
  if (is_causal && mask4) TORCH_CHECK(mpsPrefill(q4, k4, v4, *mask4), kCausalWithMask);

  std::vector<int64_t> out_shape = query.sizes().vec();
  out_shape.back() = Ev;
  std::vector<int64_t> attn_shape = query.sizes().vec();
  attn_shape.back() = S;
  at::Tensor out = at::empty(out_shape, query.options());
  at::Tensor attn = at::empty(attn_shape, query.options());
  if (out.numel() == 0 && attn.numel() == 0) return {out, attn};
  if (S == 0) {  // no key: every row is masked
    out.zero_();
    return {out, attn};
  }

  // On the host, in float32 for float16/bfloat16 (float64 stays float64,
  // which only the default mode lets through).
  const auto acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const double scale_factor = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(E));
  const at::Tensor qh = hostView(q4).to(acc).reshape({B, k_heads, g, L, E});
  const at::Tensor kh = hostView(k4).to(acc).reshape({B, k_heads, 1, S, E});
  const at::Tensor vh = hostView(v4).to(acc).reshape({B, k_heads, 1, S, Ev});
  // MPS multiplies by the scale as a float32.
  const double s = acc == at::kFloat ? static_cast<double>(static_cast<float>(scale_factor))
                                     : scale_factor;
  at::Tensor scores = at::matmul(qh, kh.transpose(-2, -1)).mul_(s).reshape({B, Hq, L, S});
  const double neg_inf = -std::numeric_limits<double>::infinity();
  if (mask4) {
    const at::Tensor m = hostView(*mask4);
    if (m.scalar_type() == at::kBool) {
      scores.masked_fill_(m.logical_not(), neg_inf);
    } else {
      scores.add_(m);
    }
  }
  if (is_causal) {
    scores.masked_fill_(at::ones({L, S}, scores.options().dtype(at::kBool)).triu(1), neg_inf);
  }
  // Softmax as a flash kernel computes it: e = exp(s - rowmax) and its row
  // sum in the accumulation type; e rounded to the inputs' dtype for the
  // product with V (MPS's kernels, like CPU's flash kernel, multiply
  // half-precision operands), then divided by the sum. Rows whose every score
  // is -inf give 0.
  at::Tensor rowmax = scores.amax(-1, /*keepdim=*/true);
  const at::Tensor masked = rowmax.eq(neg_inf);
  rowmax.masked_fill_(masked, 0);
  const at::Tensor e = scores.sub_(rowmax).exp_();
  const at::Tensor sum = e.sum(-1, /*keepdim=*/true);
  const at::Tensor e_v = query.scalar_type() == acc ? e : e.to(query.scalar_type()).to(acc);
  at::Tensor o = at::matmul(e_v.view({B, k_heads, g, L, S}), vh).view({B, Hq, L, Ev}).div_(sum);
  at::Tensor probs = e.div(sum);
  o.masked_fill_(masked, 0);
  probs.masked_fill_(masked, 0);
  hostView(out).copy_(o.view(out_shape));
  hostView(attn).copy_(probs.view(attn_shape));
  return {out, attn};
}

// The conditions under which ATen sends an MPS call of the math backend to
// _scaled_dot_product_attention_math_for_mps, restricted to calls ATen's own
// input checks (validate_sdpa_input, the composite's head check) accept:
// everything else takes ATen's way and its errors.
bool mpsRoute(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& mask, double dropout_p, bool enable_gqa) {
  if (dropout_p != 0.0) return false;
  if (q.is_nested() || k.is_nested() || v.is_nested()) return false;
  if (c10::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad())) {
    return false;
  }
  const auto dtype = q.scalar_type();
  if (!c10::isFloatingType(dtype) || k.scalar_type() != dtype || v.scalar_type() != dtype) return false;
  if (k.device() != q.device() || v.device() != q.device()) return false;
  if (q.dim() < 3 || k.dim() != q.dim() || v.dim() != q.dim()) return false;
  if (k.size(-1) != q.size(-1) || v.size(-2) != k.size(-2) || v.size(-3) != k.size(-3)) return false;
  const auto lead = q.sizes().slice(0, q.dim() - 3);
  if (k.sizes().slice(0, k.dim() - 3) != lead || v.sizes().slice(0, v.dim() - 3) != lead) return false;
  const int64_t hq = q.size(-3), hk = k.size(-3);
  if (hq != hk && !(enable_gqa && hk > 0 && hq % hk == 0)) return false;
  if (mask) {
    const auto mt = mask->scalar_type();
    if (mask->device() != q.device()) return false;
    if (mt != at::kBool && mt != at::kFloat && mt != dtype) return false;
  }
  return true;
}

at::Tensor scaledDotProductAttention(const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value,
                                     const std::optional<at::Tensor>& attn_mask, double dropout_p,
                                     bool is_causal, std::optional<double> scale, bool enable_gqa) {
  if (C10_UNLIKELY(fidelity::on()) && mpsRoute(query, key, value, attn_mask, dropout_p, enable_gqa)) {
    return std::get<0>(at::_scaled_dot_product_attention_math_for_mps(
        query, key, value, attn_mask, dropout_p, is_causal, std::nullopt, scale, enable_gqa));
  }
  return at::native::scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                                  scale, enable_gqa);
}

} // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("_scaled_dot_product_attention_math_for_mps", TORCH_FN(mathForMps));
  m.impl("scaled_dot_product_attention", TORCH_FN(scaledDotProductAttention));
}

TORCH_LIBRARY_IMPL(aten, AutogradPrivateUse1, m) {
  m.impl("scaled_dot_product_attention", TORCH_FN(scaledDotProductAttention));
}

} // namespace torch_mps_ext
