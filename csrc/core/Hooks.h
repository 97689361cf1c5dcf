#pragma once

#include <c10/core/StorageImpl.h>

#include <cstddef>

namespace torch_mps_ext {

// Registers the device allocator and the PrivateUse1 hooks with torch.
void registerHooks();

// Grows or shrinks a device storage to `newsize` bytes, keeping the contents
// up to min(old, new) bytes (memory comes from the device allocator).
void resizeStorageBytes(c10::StorageImpl* storage, std::size_t newsize);

} // namespace torch_mps_ext
