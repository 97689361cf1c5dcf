// Layer 1: the emulated device ("driver"). Knows nothing of ATen or c10.
//
// An mps_ext device is a slice of the host: its memory is ordinary host memory
// (mmap'd segments), its kernels run on host threads. This layer owns:
//   * how many devices exist (TORCH_MPS_EXT_DEVICE_COUNT, 1..16),
//   * each device's memory size (TORCH_MPS_EXT_MEMORY_BYTES, else 3/4 of RAM),
//   * the calling thread's current device,
//   * raw memory segments from the system,
//   * errors that device work reported, waiting for the next synchronize.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace torch_mps_ext::runtime {

constexpr int kMaxDevices = 16;

// Reads and validates the environment once. Throws std::invalid_argument with
// a message naming the variable and the accepted range on a bad value.
void initialize();

int deviceCount();
int currentDevice();
void setCurrentDevice(int device);
// Throws std::out_of_range naming the valid range.
void checkDevice(int device);

// Bytes of memory each device reports (recommended_max_memory()).
std::size_t deviceMemoryBytes();
// Bytes of physical RAM in the host.
std::size_t hostPhysicalBytes();

// Raw memory from the system, 64-byte aligned (2 MiB aligned for segments of
// 2 MiB and more, so transparent huge pages can back them). Returns nullptr
// when the system refuses.
void* allocateSegment(std::size_t bytes);
void freeSegment(void* ptr, std::size_t bytes);

// Growable segments: `bytes` of memory at the start of a 2 MiB-aligned
// address-space reservation of growableReserve(bytes), which growSegment()
// commits further in place (so a free block at the end of a segment can
// become larger without a new segment). freeGrowableSegment() takes the
// segment's current size and releases the whole reservation.
std::size_t growableReserve(std::size_t bytes);
void* allocateGrowableSegment(std::size_t bytes);
bool growSegment(void* base, std::size_t old_bytes, std::size_t new_bytes);
void freeGrowableSegment(void* base, std::size_t bytes);

// Device-side errors (a kernel's TORCH_REPORT_ERROR, a failed async copy):
// kept per device until the next synchronize takes the first one.
void reportError(int device, const std::string& message);
std::optional<std::string> takeError(int device);

// Monotonic device clock in nanoseconds (for events and the profiler).
std::int64_t nowNs();

} // namespace torch_mps_ext::runtime
