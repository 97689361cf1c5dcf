// Layer 3: convolution. ATen sends convolutions of backends it does not know
// to convolution_overrideable / convolution_backward_overrideable; here they
// run CPU's convolution (oneDNN where it applies) on host views, with outputs
// lent from the device pool.
#include "aten/HostView.h"

#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <torch/library.h>

namespace torch_mps_ext {
namespace {

std::optional<at::Tensor> hostViewOpt(const std::optional<at::Tensor>& t) {
  if (!t || !t->defined()) return std::nullopt;
  return hostView(*t);
}

at::Tensor convolution(const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                       c10::IntArrayRef padding, c10::IntArrayRef dilation,
                       bool transposed, c10::IntArrayRef output_padding,
                       int64_t groups) {
  int device = input.device().index();
  at::Tensor out;
  {
    LendScope lend(device);
    out = at::convolution(hostView(input), hostView(weight), hostViewOpt(bias), stride,
                          padding, dilation, transposed, output_padding, groups);
  }
  return adoptResult(out, device);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
    bool transposed, c10::IntArrayRef output_padding, int64_t groups,
    std::array<bool, 3> output_mask) {
  int device = input.device().index();
  std::vector<c10::SymInt> channels{
      c10::SymInt(transposed ? weight.size(1) * groups : weight.size(0))};
  at::OptionalSymIntArrayRef bias_sizes;
  if (output_mask[2]) bias_sizes = c10::SymIntArrayRef(channels);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
  {
    LendScope lend(device);
    grads = at::convolution_backward_symint(
        hostView(grad_output), hostView(input), hostView(weight), bias_sizes,
        c10::fromIntArrayRefSlow(stride), c10::fromIntArrayRefSlow(padding),
        c10::fromIntArrayRefSlow(dilation), transposed,
        c10::fromIntArrayRefSlow(output_padding), groups, output_mask);
  }
  return {adoptResult(std::get<0>(grads), device), adoptResult(std::get<1>(grads), device),
          adoptResult(std::get<2>(grads), device)};
}

} // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("convolution_overrideable", TORCH_FN(convolution));
  m.impl("convolution_backward_overrideable", TORCH_FN(convolution_backward));
}

} // namespace torch_mps_ext
