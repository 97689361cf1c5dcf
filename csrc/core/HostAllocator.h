// Layer 2: the pinned host memory allocator for mps_ext (at::HostAllocator).
//
// "Pinned" memory is host memory owned by this allocator: non_blocking
// copies between it and the device are queued on a stream instead of run
// inline. Blocks are rounded up to a power of two (at least 512 bytes) and
// cached by size until empty_host_cache(). A block that a queued copy uses is
// recorded on that copy's stream and is not handed out again before the
// stream has passed the copy (the rule CUDA's CachingHostAllocator follows).
#pragma once

#include <ATen/core/CachingHostAllocator.h>

#include <cstdint>

namespace torch_mps_ext {

// The process-wide pinned allocator (registered for PrivateUse1 pinning).
at::HostAllocator& hostAllocator();

// True if `ptr` points into a block of the pinned allocator.
bool isPinnedPtr(const void* ptr);

// Marks the pinned block holding `ptr` as used by work on `stream` of
// `device`, submitted so far. No-op for memory that is not pinned.
void recordHostUse(const void* ptr, int device, std::int64_t stream);

// Registers the allocator with torch (setHostAllocator) once.
void registerHostAllocator();

} // namespace torch_mps_ext
