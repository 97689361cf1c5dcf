// Layer 2: the caching device allocator for mps_ext (c10::DeviceAllocator).
//
// Block sizes are rounded to 512 bytes. Requests up to 512 KiB are served
// from the small pool, carved out of 1 MiB segments; larger ones from the
// large pool (segments of the request rounded up to 1 MiB below 8 MiB, to
// 2 MiB above). Free blocks are split and coalesced, and cached until
// empty_cache(). Blocks remember the stream they were allocated on and only
// serve that stream again; a block used on other streams (record_stream) is
// held back until those streams have passed the point of its release.
#pragma once

#include <c10/core/CachingDeviceAllocator.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace torch_mps_ext {

// The process-wide allocator registered for PrivateUse1.
c10::DeviceAllocator& deviceAllocator();

// Allocates `bytes` on `device` on its current stream and returns a DataPtr
// whose device is `device_type` (PrivateUse1 normally; CPU when the zero-copy
// fallback lends device memory to a CPU kernel).
c10::DataPtr allocateOn(int device, std::size_t bytes,
                        c10::DeviceType device_type);

// Frees `ptr` if it is a live block of the device pool; false otherwise.
bool releaseIfPooled(void* ptr);

// True if `ptr` is the start of a live block; sets *device.
bool lookupDevice(const void* ptr, int* device);

// Memory fraction: limit = fraction * recommended_max_memory (0 = unlimited).
void setMemoryFraction(int device, double fraction);
double memoryFraction(int device);

// Bytes in live blocks (rounded sizes) / bytes held from the system.
std::size_t currentAllocated(int device);
std::size_t driverAllocated(int device);

// Throws std::invalid_argument on a bad PYTORCH_MPS_EXT_*_WATERMARK_RATIO or
// PYTORCH_MPS_*_WATERMARK_RATIO (the latter used in mps fidelity mode).
void validateAllocatorEnvironment();

// Every device's default memory limits become those of the fidelity mode
// (`mps`: PYTORCH_MPS_*_WATERMARK_RATIO over PYTORCH_MPS_EXT_*); nothing
// changes when those variables are unset. Over the limit in mps mode, the
// OutOfMemoryError has MPS's text.
void applyFidelityWatermarks(bool mps);

// A human-readable memory report in the style of torch.cuda.memory_summary.
// (Formatting lives in Python; this exposes the raw stats.)
c10::CachingDeviceAllocator::DeviceStats deviceStats(int device);

} // namespace torch_mps_ext
