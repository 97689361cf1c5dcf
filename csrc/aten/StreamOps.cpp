// Layer 3: stream-related operators for PrivateUse1 (mps_ext).
#include "core/Allocator.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace torch_mps_ext {
namespace {

// Tensor.record_stream(s): the block may not serve another stream before `s`
// has finished the work submitted to it so far (core/Allocator.h).
void record_stream(at::Tensor& self, c10::Stream s) {
  TORCH_CHECK(s.device_type() == c10::DeviceType::PrivateUse1,
              "record_stream: expected an mps_ext stream, got a stream on ", s.device());
  TORCH_CHECK(s.device_index() == self.device().index(),
              "record_stream: the stream is on ", s.device(),
              " but the tensor is on ", self.device());
  deviceAllocator().recordStream(self.storage().data_ptr(), s);
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("record_stream", TORCH_FN(record_stream));
}

} // namespace
} // namespace torch_mps_ext
