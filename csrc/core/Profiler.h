// Layer 2: the device profiler's recorder.
//
// Device operations are seen from the dispatcher: while at least one consumer
// is enabled, a global RecordFunction callback keeps every aten op whose
// tensor arguments live on mps_ext (or whose `device` argument is mps_ext)
// and records its name, device, stream and start/end times. With no consumer
// enabled the callback is not registered at all, so the off path costs
// nothing beyond what the dispatcher already does.
//
// Other device code records its own commands (shader launches, event records)
// with recordCommand(); they go to the same consumers.
//
// Consumers:
//   kTrace   torch.mps_ext.profiler.start()/stop(): Chrome trace
//   kCapture torch.mps_ext.profiler.metal_capture(): full argument record
//   kStats   PYTORCH_MPS_EXT_LOG_PROFILE_INFO: per-op totals printed at exit
//   kKineto  torch.profiler with ProfilerActivity.PrivateUse1
// Each consumer has its own buffer; take() drains one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace torch_mps_ext::profiler {

enum Consumer : unsigned {
  kTrace = 1u << 0,
  kCapture = 1u << 1,
  kStats = 1u << 2,
  kKineto = 1u << 3,
};

// PYTORCH_MPS_EXT_LOG_PROFILE_INFO bits (same positions as MPS's
// PYTORCH_MPS_LOG_PROFILE_INFO where the meaning carries over).
enum LogOptions : unsigned {
  kLogOperationInfo = 1u << 0,   // print each device op as it completes
  kLogCopyInfo = 1u << 1,        // print each copy as it completes
  kLogCommandInfo = 1u << 2,     // print each recorded device command (launches, events)
  kLogOperationStats = 1u << 3,  // per-op table at exit
  kLogCopyStats = 1u << 4,       // per-copy-direction table at exit
  kLogCommandStats = 1u << 5,    // per-command table at exit
  kLogIncludeArgs = 1u << 6,     // add argument shapes/dtypes to the *_INFO lines
};

enum class Kind : std::uint8_t { Op = 0, Copy = 1, Command = 2 };

struct Record {
  std::string name;
  std::string overload;       // the op's overload ("out", "Tensor", ...), "" for commands
  Kind kind = Kind::Op;
  int device = 0;
  std::int64_t stream = 0;
  std::int64_t start_ns = 0;  // CLOCK_REALTIME, as torch.profiler's events
  std::int64_t end_ns = 0;
  std::uint64_t thread = 0;   // RecordFunction thread id (0 for commands off the dispatcher)
  int depth = 0;              // nesting among recorded device ops on this thread
  bool leaf = true;           // no device work (op with a kernel, command) inside it
  bool kernel = true;         // false for allocation/view-only ops (aten::empty, as_strided, ...)
  std::uint64_t correlation = 0;  // torch.profiler correlation id (kKineto)
  std::string direction;      // copies: "cpu -> mps_ext", ...
  std::string args;           // JSON object text: arguments (capture) or command attributes
};

struct Stat {
  std::string name;
  Kind kind = Kind::Op;
  std::uint64_t count = 0;
  std::int64_t total_ns = 0;
  std::int64_t min_ns = 0;
  std::int64_t max_ns = 0;
};

// Enables/disables consumers. Throws c10::Error when `c` is already enabled
// (enable) or not enabled (disable).
void enable(unsigned consumers, bool wait_until_completed = false);
void disable(unsigned consumers);
unsigned enabledConsumers();
inline bool isEnabled(unsigned c) { return (enabledConsumers() & c) != 0; }

std::vector<Record> take(Consumer c);
std::vector<Stat> stats();
void setLogOptions(unsigned bits);
unsigned logOptions();

std::int64_t nowNs();

// Records a device command that ran from start_ns to end_ns on `device`'s
// current stream (stream < 0) or on `stream`. `attrs` is a JSON object's text
// ("{}" when empty). Cheap no-op when no consumer is enabled.
//
// Work queued to a stream's worker thread: take `token = issueToken()` on the
// issuing thread when enqueuing, and call recordCommand(..., token) from the
// worker when the work has run, so torch.profiler links it to the op that
// issued it and the trace nests it under that op's depth.
struct IssueToken {
  std::uint64_t correlation = 0;
  int depth = 0;
};
IssueToken issueToken();
void recordCommand(const std::string& name, int device, std::int64_t stream,
                   std::int64_t start_ns, std::int64_t end_ns, std::string attrs);
void recordCommand(const std::string& name, int device, std::int64_t stream,
                   std::int64_t start_ns, std::int64_t end_ns, std::string attrs,
                   IssueToken issued);

// Device memory after an allocator change, for the trace's allocated/reserved
// counter track (kTrace only). The caller checks isEnabled(kTrace) first.
struct MemorySample {
  int device = 0;
  std::int64_t time_ns = 0;
  std::size_t allocated = 0;
  std::size_t reserved = 0;
};
void recordMemoryUsage(int device, std::size_t allocated, std::size_t reserved);
std::vector<MemorySample> takeMemorySamples();

// Kineto session hooks (ProfilerKineto.cpp).
void pushCorrelation(std::uint64_t id);
void popCorrelation();

} // namespace torch_mps_ext::profiler
