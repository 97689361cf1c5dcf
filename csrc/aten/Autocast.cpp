// Layer 3: torch.autocast("mps_ext").
//
// The AutocastPrivateUse1 dispatch key gets torch's shared autocast op lists
// (ATen/autocast_mode.h: AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32, ...),
// the lists CUDA uses: matmuls and convolutions run in the autocast dtype
// (float16 by default, bfloat16 on request), precision-sensitive ops
// (softmax, norms, losses, exp/log, ...) in float32, and multi-input ops
// like addcmul in the widest input type. Everything else falls through.
//
// This file includes the full ATen operator headers (autocast_mode.h needs
// them); it is the only one that does, so ccache keeps rebuilds cheap.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace torch_mps_ext {
namespace {

// As on CUDA: binary_cross_entropy on autocast float16 inputs loses too much
// precision to be safe, so autocast refuses it.
at::Tensor binaryCrossEntropyBanned(const at::Tensor&, const at::Tensor&,
                                    const std::optional<at::Tensor>&, int64_t) {
  TORCH_CHECK(
      false,
      "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe "
      "to autocast.\nMany models use a sigmoid layer right before the binary "
      "cross entropy layer.\nIn this case, combine the two layers using "
      "torch.nn.functional.binary_cross_entropy_with_logits\nor "
      "torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and "
      "BCEWithLogits are\nsafe to autocast.");
}

} // namespace
} // namespace torch_mps_ext

namespace at::autocast {
namespace {

TORCH_LIBRARY_IMPL(_, AutocastPrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(aten, AutocastPrivateUse1, m) {
#define MPS_EXT_LOWER_PRECISION_FP(...) \
  KERNEL_PRIVATEUSEONE(__VA_ARGS__, lower_precision_fp)
#define MPS_EXT_FP32(...) KERNEL_PRIVATEUSEONE(__VA_ARGS__, fp32)
#define MPS_EXT_FP32_SET_OPT_DTYPE(...) \
  KERNEL_PRIVATEUSEONE(__VA_ARGS__, fp32_set_opt_dtype)
#define MPS_EXT_PROMOTE(...) KERNEL_PRIVATEUSEONE(__VA_ARGS__, promote)

  AT_FORALL_LOWER_PRECISION_FP(MPS_EXT_LOWER_PRECISION_FP)
  AT_FORALL_FP32(MPS_EXT_FP32)
  AT_FORALL_FP32_SET_OPT_DTYPE(MPS_EXT_FP32_SET_OPT_DTYPE)
  AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE(
      KERNEL_DIFFERENT_REDISPATCH_SIGNATURE_PRIVATEUSEONE)
  AT_FORALL_PROMOTE(MPS_EXT_PROMOTE)

#undef MPS_EXT_LOWER_PRECISION_FP
#undef MPS_EXT_FP32
#undef MPS_EXT_FP32_SET_OPT_DTYPE
#undef MPS_EXT_PROMOTE

  m.impl(TORCH_SELECTIVE_NAME("aten::binary_cross_entropy"),
         TORCH_FN((&torch_mps_ext::binaryCrossEntropyBanned)));
}

} // namespace
} // namespace at::autocast
