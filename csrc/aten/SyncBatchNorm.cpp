// Layer 3: the per-rank kernels of nn.SyncBatchNorm.
//
// torch.nn.SyncBatchNorm lets every accelerator through to its autograd
// function (torch/nn/modules/_functions.py), which calls batch_norm_stats,
// batch_norm_gather_stats_with_counts, batch_norm_elemt,
// batch_norm_backward_reduce and batch_norm_backward_elemt: CUDA-only
// operators, so the fallback could not serve them (CPU has no kernel). They
// are built here from device operators, with CUDA's semantics: statistics in
// the accumulate type (float for half/bfloat16 inputs), the variance merged
// across ranks by counts, running statistics updated with the unbiased
// variance.
#include "aten/Fidelity.h"

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace torch_mps_ext {
namespace {

// MPS has none of these (on a Mac nn.SyncBatchNorm refuses MPS inputs before
// calling them): refused in mps fidelity mode (aten/Fidelity.h).
void mpsLacks(const char* name, const char* overload) {
  if (C10_UNLIKELY(fidelity::on())) fidelity::checkOperator(name, overload);
}

// The dims a per-channel reduction runs over (all but dim 1).
std::vector<int64_t> reduceDims(const at::Tensor& input) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  return dims;
}

// A per-channel vector shaped to broadcast against `input` (1, C, 1, ...).
at::Tensor perChannel(const at::Tensor& v, const at::Tensor& input) {
  std::vector<int64_t> shape(static_cast<size_t>(input.dim()), 1);
  shape[1] = v.numel();
  return v.reshape(shape);
}

at::ScalarType accType(const at::Tensor& input) {
  return at::toOpMathType(input.scalar_type());
}

void checkInput(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, op, ": expected an input with at least 2 dims (N, C, ...), got ",
              input.dim());
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input, double eps) {
  mpsLacks("aten::batch_norm_stats", "");
  checkInput("batch_norm_stats", input);
  at::Tensor x = input.to(accType(input));
  auto dims = reduceDims(x);
  at::Tensor mean = x.mean(dims);
  at::Tensor var = x.sub(perChannel(mean, x)).square().mean(dims);
  return {mean, var.add(eps).rsqrt()};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_gather_stats_with_counts(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    double momentum, double eps, const at::Tensor& counts) {
  mpsLacks("aten::batch_norm_gather_stats_with_counts", "");
  TORCH_CHECK(mean.dim() == 2 && invstd.sizes() == mean.sizes() &&
                  counts.numel() == mean.size(0),
              "batch_norm_gather_stats_with_counts: expected mean/invstd of size (world, C) "
              "and one count per row, got ", mean.sizes(), ", ", invstd.sizes(), " and ",
              counts.sizes());
  at::Tensor n = counts.to(mean.scalar_type()).reshape({-1, 1});
  at::Tensor total = n.sum();
  at::Tensor global_mean = mean.mul(n).sum(0).div(total);
  // Each rank's biased variance, merged: E[var_i + (mean_i - mean)^2].
  at::Tensor var_i = invstd.square().reciprocal().sub(eps);
  at::Tensor global_var = var_i.add(mean.sub(global_mean).square()).mul(n).sum(0).div(total);
  if (running_mean && running_mean->defined()) {
    at::Tensor rm = *running_mean;
    rm.mul_(1 - momentum).add_(global_mean.to(rm.scalar_type()), momentum);
  }
  if (running_var && running_var->defined()) {
    at::Tensor rv = *running_var;
    at::Tensor unbiased = global_var.mul(total).div(total.sub(1));
    rv.mul_(1 - momentum).add_(unbiased.to(rv.scalar_type()), momentum);
  }
  return {global_mean, global_var.add(eps).rsqrt()};
}

at::Tensor batch_norm_elemt(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                            const at::Tensor& invstd, double eps) {
  mpsLacks("aten::batch_norm_elemt", "");
  checkInput("batch_norm_elemt", input);
  at::Tensor y = input.to(mean.scalar_type()).sub(perChannel(mean, input))
                     .mul(perChannel(invstd, input));
  if (weight && weight->defined()) y = y.mul(perChannel(weight->to(y.scalar_type()), input));
  if (bias && bias->defined()) y = y.add(perChannel(bias->to(y.scalar_type()), input));
  return y.to(input.scalar_type());
}

at::Tensor& batch_norm_elemt_out(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                 const at::Tensor& invstd, double eps, at::Tensor& out) {
  mpsLacks("aten::batch_norm_elemt", "out");
  at::Tensor y = batch_norm_elemt(input, weight, bias, mean, invstd, eps);
  out.resize_(y.sizes());
  out.copy_(y);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_reduce(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool input_g,
    bool weight_g, bool bias_g) {
  mpsLacks("aten::batch_norm_backward_reduce", "");
  checkInput("batch_norm_backward_reduce", input);
  auto dims = reduceDims(input);
  at::Tensor dy = grad_out.to(mean.scalar_type());
  at::Tensor xmu = input.to(mean.scalar_type()).sub(perChannel(mean, input));
  at::Tensor sum_dy = dy.sum(dims);
  at::Tensor sum_dy_xmu = dy.mul(xmu).sum(dims);
  at::Tensor grad_weight, grad_bias;
  bool has_weight = weight && weight->defined();
  if (weight_g) {
    grad_weight = sum_dy_xmu.mul(invstd);
    if (has_weight) grad_weight = grad_weight.to(weight->scalar_type());
  }
  if (bias_g) {
    grad_bias = sum_dy;
    if (has_weight) grad_bias = grad_bias.to(weight->scalar_type());
  }
  if (!input_g) return {at::Tensor(), at::Tensor(), grad_weight, grad_bias};
  return {sum_dy, sum_dy_xmu, grad_weight, grad_bias};
}

at::Tensor batch_norm_backward_elemt(const at::Tensor& grad_out, const at::Tensor& input,
                                     const at::Tensor& mean, const at::Tensor& invstd,
                                     const std::optional<at::Tensor>& weight,
                                     const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                     const at::Tensor& count) {
  mpsLacks("aten::batch_norm_backward_elemt", "");
  checkInput("batch_norm_backward_elemt", input);
  at::Tensor total = count.to(mean.scalar_type()).sum();
  at::Tensor mean_dy = sum_dy.div(total);
  at::Tensor factor = invstd.square().mul(sum_dy_xmu.div(total));
  at::Tensor scale = invstd;
  if (weight && weight->defined()) scale = scale.mul(weight->to(mean.scalar_type()));
  at::Tensor xmu = input.to(mean.scalar_type()).sub(perChannel(mean, input));
  at::Tensor grad_in = grad_out.to(mean.scalar_type())
                           .sub(perChannel(mean_dy, input))
                           .sub(xmu.mul(perChannel(factor, input)))
                           .mul(perChannel(scale, input));
  return grad_in.to(input.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("batch_norm_stats", TORCH_FN(batch_norm_stats));
  m.impl("batch_norm_gather_stats_with_counts", TORCH_FN(batch_norm_gather_stats_with_counts));
  m.impl("batch_norm_elemt", TORCH_FN(batch_norm_elemt));
  m.impl("batch_norm_elemt.out", TORCH_FN(batch_norm_elemt_out));
  m.impl("batch_norm_backward_reduce", TORCH_FN(batch_norm_backward_reduce));
  m.impl("batch_norm_backward_elemt", TORCH_FN(batch_norm_backward_elemt));
}

}  // namespace torch_mps_ext
