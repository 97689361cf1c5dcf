// Layer 3: DispatchStubs that composite kernels consult by device type.
//
// A few CompositeImplicitAutograd kernels pick their route by asking a
// DispatchStub whether the tensors' device has a kernel
// (`stub.is_device_supported(device.type())`) instead of going through the
// dispatcher, so the boxed fallback never sees the question. Unanswered, they
// take a generic route CPU does not take, with other numerics. Registering
// the stub for PrivateUse1 with "ask CPU's kernel" makes mps_ext take CPU's
// route; the ops on that route then reach CPU's kernels through the fallback.
#include "aten/Fidelity.h"

#include <ATen/SDPBackend.h>
#include <ATen/native/transformers/attention.h>

#include <c10/core/DeviceType.h>

namespace torch_mps_ext {
namespace {

// scaled_dot_product_attention: CPU picks its flash kernel
// (_scaled_dot_product_flash_attention_for_cpu) where it applies; without
// this, mps_ext would always run the math decomposition.
//
// CPU's choice reads only metadata (sizes, strides, dtypes, nesting, which
// inputs require grad, the global SDP flags), so it is asked directly, on the
// device tensors themselves: no host views, no dispatcher. That also answers
// under FakeTensorMode (torch.compile): the Meta kernel of _fused_sdp_choice
// asks this stub for a fake mps_ext tensor, which has no memory to view, and
// a call through the dispatcher would meet the fake mode with real tensors
// ("Please convert all Tensors to FakeTensors first").
//
// In mps fidelity mode the answer is the math backend, as on a Mac: MPS has
// no backend choice (no kernel for this stub), so ATen runs its math route
// there, whatever the SDP flags say; Attention.cpp takes MPS's side of that
// route.
int64_t sdpChoice(const at::Tensor& query, const at::Tensor& key,
                  const at::Tensor& value, const std::optional<at::Tensor>& mask,
                  double dropout_p, bool is_causal, std::optional<double> scale,
                  bool enable_gqa) {
  if (C10_UNLIKELY(fidelity::on())) return static_cast<int64_t>(at::SDPBackend::math);
  return at::native::_fused_sdp_choice_stub(c10::DeviceType::CPU, query, key, value, mask,
                                            dropout_p, is_causal, scale, enable_gqa);
}

} // namespace
} // namespace torch_mps_ext

namespace at::native {
REGISTER_PRIVATEUSE1_DISPATCH(_fused_sdp_choice_stub, &torch_mps_ext::sdpChoice)
} // namespace at::native
