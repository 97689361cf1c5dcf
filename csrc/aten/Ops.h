// Layer 3: the native operators every device needs (Ops.cpp), as other
// kernels of this layer use them.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace torch_mps_ext {

// A new tensor on mps_ext:`device` (what empty/empty_strided make); no
// strides: contiguous in `memory_format`.
at::Tensor emptyOnDevice(c10::IntArrayRef sizes, std::optional<c10::IntArrayRef> strides,
                         at::ScalarType dtype, int device,
                         std::optional<at::MemoryFormat> memory_format = std::nullopt);

} // namespace torch_mps_ext
