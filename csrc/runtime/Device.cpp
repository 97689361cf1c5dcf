#include "runtime/Device.h"
#include "runtime/Settings.h"

#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>

namespace torch_mps_ext::runtime {
namespace {

int g_device_count = 0;
std::size_t g_memory_bytes = 0;
std::once_flag g_init_once;
thread_local int t_current_device = 0;

constexpr std::size_t kHugePage = 2u << 20;

struct PendingErrors {
  std::mutex mu;
  std::optional<std::string> first[kMaxDevices];
};
PendingErrors& pending() {
  static PendingErrors p;
  return p;
}

void doInitialize() {
  g_device_count = static_cast<int>(
      settings::integer("TORCH_MPS_EXT_DEVICE_COUNT", 1, kMaxDevices,
                        "an integer from 1 to " + std::to_string(kMaxDevices))
          .value_or(1));
  // Like Metal's recommendedMaxWorkingSetSize on unified memory: 3/4 of RAM.
  g_memory_bytes = static_cast<std::size_t>(
      settings::integer("TORCH_MPS_EXT_MEMORY_BYTES", 1, std::numeric_limits<long long>::max(),
                        "a positive integer number of bytes")
          .value_or(static_cast<long long>(hostPhysicalBytes() / 4 * 3)));
}

} // namespace

void initialize() {
  // A failed initialisation throws out of call_once and is retried next time,
  // so a fixed environment can be picked up without restarting.
  std::call_once(g_init_once, doInitialize);
}

int deviceCount() {
  return g_device_count;
}

int currentDevice() {
  return t_current_device;
}

void setCurrentDevice(int device) {
  checkDevice(device);
  t_current_device = device;
}

void checkDevice(int device) {
  if (device < 0 || device >= g_device_count) {
    throw std::out_of_range(
        "Invalid device index " + std::to_string(device) + " for mps_ext: " +
        "valid indices are 0.." + std::to_string(g_device_count - 1) +
        " (set TORCH_MPS_EXT_DEVICE_COUNT for more devices)");
  }
}

std::size_t deviceMemoryBytes() {
  return g_memory_bytes;
}

std::size_t hostPhysicalBytes() {
  long pages = sysconf(_SC_PHYS_PAGES);
  long page = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return std::size_t(8) << 30;
  return static_cast<std::size_t>(pages) * static_cast<std::size_t>(page);
}

namespace {
// `bytes` of fresh mapping starting on a 2 MiB boundary (over-map by one huge
// page and trim), so transparent huge pages can back it.
void* mapAligned(std::size_t bytes, int prot, int flags) {
  std::size_t span = bytes + kHugePage;
  void* raw = mmap(nullptr, span, prot, MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  auto base = reinterpret_cast<std::uintptr_t>(raw);
  std::uintptr_t aligned = (base + kHugePage - 1) & ~(kHugePage - 1);
  std::size_t head = aligned - base;
  std::size_t tail = span - head - bytes;
  if (head) munmap(raw, head);
  if (tail) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
  return reinterpret_cast<void*>(aligned);
}
} // namespace

void* allocateSegment(std::size_t bytes) {
  if (bytes < kHugePage) {
    void* p = nullptr;
    if (posix_memalign(&p, 64, bytes) != 0) return nullptr;
    return p;
  }
  void* p = mapAligned(bytes, PROT_READ | PROT_WRITE, 0);
#ifdef MADV_HUGEPAGE
  if (p) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return p;
}

void freeSegment(void* ptr, std::size_t bytes) {
  if (ptr == nullptr) return;
  if (bytes < kHugePage) {
    std::free(ptr);
  } else {
    munmap(ptr, bytes);
  }
}

namespace {
// Address space only (PROT_NONE, not committed): 64 MiB per growable segment
// is nothing next to a 47-bit address space.
constexpr std::size_t kGrowReserve = 64u << 20;
} // namespace

std::size_t growableReserve(std::size_t bytes) {
  std::size_t r = bytes > kGrowReserve ? bytes : kGrowReserve;
  return (r + kHugePage - 1) & ~(kHugePage - 1);
}

void* allocateGrowableSegment(std::size_t bytes) {
  std::size_t reserve = growableReserve(bytes);
  void* p = mapAligned(reserve, PROT_NONE, MAP_NORESERVE);
  if (p == nullptr) return nullptr;
  if (!growSegment(p, 0, bytes)) {
    munmap(p, reserve);
    return nullptr;
  }
  return p;
}

bool growSegment(void* base, std::size_t old_bytes, std::size_t new_bytes) {
  if (new_bytes <= old_bytes) return true;
  if (new_bytes > growableReserve(old_bytes ? old_bytes : new_bytes)) return false;
  char* from = static_cast<char*>(base) + old_bytes;
  if (mprotect(from, new_bytes - old_bytes, PROT_READ | PROT_WRITE) != 0) return false;
#ifdef MADV_HUGEPAGE
  madvise(from, new_bytes - old_bytes, MADV_HUGEPAGE);
#endif
  return true;
}

void freeGrowableSegment(void* base, std::size_t bytes) {
  if (base != nullptr) munmap(base, growableReserve(bytes));
}

void reportError(int device, const std::string& message) {
  checkDevice(device);
  auto& p = pending();
  std::lock_guard<std::mutex> lock(p.mu);
  if (!p.first[device]) p.first[device] = message;
}

std::optional<std::string> takeError(int device) {
  checkDevice(device);
  auto& p = pending();
  std::lock_guard<std::mutex> lock(p.mu);
  std::optional<std::string> out;
  out.swap(p.first[device]);
  return out;
}

std::int64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

} // namespace torch_mps_ext::runtime
