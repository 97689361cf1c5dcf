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
#include <memory>
#include <string>
#include <vector>

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

// --- Memory history and snapshots (torch.cuda.memory's formats) -------------
//
// While history is recorded, every allocator action is appended to a bounded
// ring per device (under the allocator's mutex), and live blocks keep the
// context (a stack, gathered by `context_fn` before the mutex is taken) of
// their allocation. With recording off the only cost is one relaxed atomic
// load per allocation and per free.

// torch.cuda's TraceEntry actions, with their snapshot names.
enum class MemoryAction : std::uint8_t {
  kAlloc,          // "alloc": a block handed out (size: bytes requested)
  kFreeRequested,  // "free_requested": the client released it
  kFreeCompleted,  // "free_completed": it is reusable (later with record_stream)
  kSegmentAlloc,   // "segment_alloc": a segment taken from the system
  kSegmentFree,    // "segment_free": a segment given back
  kSegmentMap,     // "segment_map": a growable segment grown in place (addr: the new part)
  kOom,            // "oom": allocation refused (addr: bytes still free under the limit)
};
const char* memoryActionName(MemoryAction a);

struct MemoryTraceEntry {
  MemoryAction action;
  std::uintptr_t addr;  // device_free for kOom
  std::size_t size;
  std::int64_t stream;
  std::int64_t time_us;  // CLOCK_REALTIME
  std::shared_ptr<c10::GatheredContext> context;
};

enum class MemoryBlockState : std::uint8_t { kAllocated, kAwaitingFree, kInactive };

struct MemoryBlockInfo {
  std::uintptr_t address;
  std::size_t size;
  std::size_t requested_size;
  MemoryBlockState state;
  std::shared_ptr<c10::GatheredContext> context;  // of its allocation, if recorded
};

struct MemorySegmentInfo {
  int device;
  std::uintptr_t address;
  std::size_t total_size;
  std::size_t allocated_size;   // active_allocated blocks
  std::size_t active_size;      // allocated + awaiting free
  std::size_t requested_size;   // bytes requested by the allocated blocks
  std::int64_t stream;
  bool small;                   // small pool ("small") or large ("large")
  bool expandable;              // large segments grow in place
  std::vector<MemoryBlockInfo> blocks;  // in address order, covering the segment
};

struct MemorySnapshot {
  std::vector<MemorySegmentInfo> segments;              // by device, then address
  std::vector<std::vector<MemoryTraceEntry>> device_traces;  // oldest first
};

// enabled=false stops recording and clears the history. `when` says which
// events keep a context (c10's RecordContext: NEVER, STATE = live blocks,
// ALLOC = + alloc events, ALL = + free events); `context_fn` gathers one
// (may be null when `when` is NEVER). max_entries bounds each device's ring
// (at least 1). clear_history empties the rings. skip_mask: bit
// (1 << MemoryAction) set = that action is not recorded.
void recordMemoryHistory(bool enabled, c10::CachingDeviceAllocator::CreateContextFn context_fn,
                         std::size_t max_entries,
                         c10::CachingDeviceAllocator::RecordContext when, bool clear_history,
                         unsigned skip_mask);
bool memoryHistoryEnabled();

// Every device's segments and blocks from the allocator's own structures,
// and (include_traces) the recorded history.
MemorySnapshot memorySnapshot(bool include_traces);

} // namespace torch_mps_ext
