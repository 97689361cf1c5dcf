// Layer 3: DispatchStubs that composite kernels consult by device type.
//
// A few CompositeImplicitAutograd kernels pick their route by asking a
// DispatchStub whether the tensors' device has a kernel
// (`stub.is_device_supported(device.type())`) instead of going through the
// dispatcher, so the boxed fallback never sees the question. Unanswered, they
// take a generic route CPU does not take, with other numerics. Registering
// the stub for PrivateUse1 with "ask CPU's kernel about host views" makes mps_ext take
// CPU's route; the ops on that route then reach CPU's kernels through the
// fallback.
#include "aten/HostView.h"

#include <ATen/native/transformers/attention.h>
#include <ATen/ops/_fused_sdp_choice.h>

namespace torch_mps_ext {
namespace {

// scaled_dot_product_attention: CPU picks its flash kernel
// (_scaled_dot_product_flash_attention_for_cpu) where it applies; without
// this, mps_ext would always run the math decomposition.
int64_t sdpChoice(const at::Tensor& query, const at::Tensor& key,
                  const at::Tensor& value, const std::optional<at::Tensor>& mask,
                  double dropout_p, bool is_causal, std::optional<double> scale,
                  bool enable_gqa) {
  // The choice depends on which inputs require grad (no fused kernel when
  // the mask does): the host views say so too.
  auto view = [](const at::Tensor& t) {
    at::Tensor h = hostView(t);
    if (t.requires_grad()) h.set_requires_grad(true);
    return h;
  };
  std::optional<at::Tensor> host_mask;
  if (mask && mask->defined()) host_mask = view(*mask);
  // CPU's _fused_sdp_choice kernel consults the stub for CPU.
  return at::_fused_sdp_choice(view(query), view(key), view(value), host_mask,
                               dropout_p, is_causal, scale, enable_gqa);
}

} // namespace
} // namespace torch_mps_ext

namespace at::native {
REGISTER_PRIVATEUSE1_DISPATCH(_fused_sdp_choice_stub, &torch_mps_ext::sdpChoice)
} // namespace at::native
