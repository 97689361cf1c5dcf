// Layer 2: the device profiler's recorder (see Profiler.h).
#include "core/Profiler.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <ATen/record_function.h>
#include <c10/core/ScalarType.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/ApproximateClock.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <map>
#include <mutex>
#include <sstream>
#include <utility>

namespace torch_mps_ext::profiler {
namespace {

constexpr auto kDev = c10::DeviceType::PrivateUse1;

std::atomic<unsigned> g_consumers{0};
std::atomic<unsigned> g_log{0};
std::atomic<bool> g_wait{false};

struct State {
  std::mutex mu;
  at::CallbackHandle handle = 0;
  std::vector<Record> trace, capture, kineto;
  std::vector<MemorySample> memory;  // kTrace's counter track
  std::map<std::pair<int, std::string>, Stat> stats;
};

State& state() {
  static auto* s = new State();  // leaked: used from atexit handlers
  return *s;
}

std::vector<Record>* buffer(State& s, Consumer c) {
  switch (c) {
    case kTrace: return &s.trace;
    case kCapture: return &s.capture;
    case kKineto: return &s.kineto;
    default: return nullptr;
  }
}

const c10::impl::DeviceGuardImplInterface* guardImpl() {
  return c10::impl::getDeviceGuardImpl(kDev);
}

int currentDevice() {
  return guardImpl()->getDevice().index();
}

std::int64_t streamOf(int device) {
  return guardImpl()->getStream(c10::Device(kDev, static_cast<c10::DeviceIndex>(device))).id();
}

// The mps_ext device an argument lives on, or -1.
int deviceOf(const c10::IValue& v) {
  if (v.isTensor()) {
    const auto& t = v.toTensor();
    return t.defined() && t.device().type() == kDev ? t.device().index() : -1;
  }
  if (v.isDevice()) {
    auto d = v.toDevice();
    if (d.type() != kDev) return -1;
    return d.has_index() ? d.index() : currentDevice();
  }
  if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorList()) {
      if (t.defined() && t.device().type() == kDev) return t.device().index();
    }
    return -1;
  }
  if (v.isList()) {  // Tensor?[] (index lists)
    for (const c10::IValue& e : v.toListRef()) {
      int d = deviceOf(e);
      if (d >= 0) return d;
    }
  }
  return -1;
}

void jsonString(std::ostream& os, std::string_view s) {
  os << '"';
  for (char ch : s) {
    switch (ch) {
      case '"': os << "\\\""; break;
      case '\\': os << "\\\\"; break;
      case '\n': os << "\\n"; break;
      default:
        if (static_cast<unsigned char>(ch) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", ch);
          os << buf;
        } else {
          os << ch;
        }
    }
  }
  os << '"';
}

// JSON has no NaN/Infinity: those become strings.
void jsonNumber(std::ostream& os, double d) {
  if (std::isfinite(d)) {
    os << d;
  } else {
    jsonString(os, std::isnan(d) ? "nan" : (d > 0 ? "inf" : "-inf"));
  }
}

template <typename T>
void jsonInts(std::ostream& os, c10::ArrayRef<T> xs) {
  os << '[';
  for (std::size_t i = 0; i < xs.size(); ++i) os << (i ? "," : "") << xs[i];
  os << ']';
}

void describe(std::ostream& os, const c10::IValue& v) {
  if (v.isTensor()) {
    const auto& t = v.toTensor();
    if (!t.defined()) {
      os << "null";
      return;
    }
    os << "{\"shape\":";
    jsonInts(os, t.sizes());
    os << ",\"strides\":";
    jsonInts(os, t.strides());
    os << ",\"dtype\":";
    jsonString(os, c10::getDtypeNames(t.scalar_type()).first);
    os << ",\"device\":";
    jsonString(os, t.device().str());
    os << ",\"storage_offset\":" << t.storage_offset();
    // CPU 0-dim tensors are scalar arguments (wrapped numbers): keep the value.
    if (t.dim() == 0 && t.device().is_cpu()) {
      const void* p = t.const_data_ptr();
      switch (t.scalar_type()) {
        case at::kDouble: os << ",\"value\":"; jsonNumber(os, *static_cast<const double*>(p)); break;
        case at::kFloat: os << ",\"value\":"; jsonNumber(os, *static_cast<const float*>(p)); break;
        case at::kLong: os << ",\"value\":" << *static_cast<const int64_t*>(p); break;
        case at::kInt: os << ",\"value\":" << *static_cast<const int32_t*>(p); break;
        case at::kBool: os << ",\"value\":" << (*static_cast<const bool*>(p) ? "true" : "false"); break;
        default: break;
      }
    }
    os << '}';
  } else if (v.isNone()) {
    os << "null";
  } else if (v.isBool()) {
    os << (v.toBool() ? "true" : "false");
  } else if (v.isInt()) {
    os << v.toInt();
  } else if (v.isDouble()) {
    jsonNumber(os, v.toDouble());
  } else if (v.isString()) {
    jsonString(os, v.toStringRef());
  } else if (v.isIntList()) {
    jsonInts(os, c10::ArrayRef<int64_t>(v.toIntVector()));
  } else if (v.isTensorList() || v.isList()) {
    os << '[';
    bool first = true;
    for (const c10::IValue& e : v.toListRef()) {
      os << (first ? "" : ",");
      first = false;
      describe(os, e);
    }
    os << ']';
  } else if (v.isDevice()) {
    jsonString(os, v.toDevice().str());
  } else {
    std::ostringstream tmp;
    tmp << v.tagKind();
    jsonString(os, tmp.str());
  }
}

void describeList(std::ostream& os, const c10::IValue* begin, std::size_t n) {
  os << '[';
  for (std::size_t i = 0; i < n; ++i) {
    if (i) os << ',';
    describe(os, begin[i]);
  }
  os << ']';
}

const char* kindName(Kind k) {
  switch (k) {
    case Kind::Op: return "op";
    case Kind::Copy: return "copy";
    case Kind::Command: return "command";
  }
  return "op";
}

// Ops that only allocate or re-describe memory: no device work runs in them,
// so they do not make their caller a non-leaf (the caller's own kernel is the
// device work) and torch.profiler gets no device activity for them.
bool isMetadataOnly(std::string_view name) {
  return name == "aten::empty" || name == "aten::empty_strided" || name == "aten::as_strided" ||
         name == "aten::view" || name == "aten::_reshape_alias" || name == "aten::resize_" ||
         name == "aten::set_" || name == "aten::alias" || name == "aten::detach";
}

bool isCopy(std::string_view name) {
  return name == "aten::_copy_from" || name == "aten::_copy_from_and_resize" ||
         name == "aten::copy_";
}

// The device types of a copy's source and destination, "cpu -> mps_ext".
std::string copyDirection(const at::RecordFunction& fn) {
  auto in = fn.inputs();
  if (in.size() < 2 || !in[0].isTensor() || !in[1].isTensor()) return {};
  const auto& a = in[0].toTensor();
  const auto& b = in[1].toTensor();
  if (!a.defined() || !b.defined()) return {};
  // _copy_from(self=src, dst); copy_(self=dst, src)
  bool copy_ = std::string_view(fn.name()) == "aten::copy_";
  const auto& src = copy_ ? b : a;
  const auto& dst = copy_ ? a : b;
  return c10::DeviceTypeName(src.device().type(), true) + " -> " +
         c10::DeviceTypeName(dst.device().type(), true);
}

struct OpContext : at::ObserverContext {
  std::int64_t start_ns = 0;
  int device = 0;
  std::int64_t stream = 0;
  int depth = 0;
  bool leaf = true;
  bool metadata = false;
  Kind kind = Kind::Op;
  std::string direction;  // copies
  std::string inputs;     // JSON list (capture / include-args logging)
};

thread_local std::vector<OpContext*> t_open;
thread_local std::vector<std::uint64_t> t_correlation;

bool needArgs(unsigned consumers) {
  return (consumers & kCapture) || (g_log.load(std::memory_order_relaxed) & kLogIncludeArgs);
}

void logLine(const Record& r) {
  unsigned bits = g_log.load(std::memory_order_relaxed);
  unsigned want = r.kind == Kind::Op ? kLogOperationInfo
                  : r.kind == Kind::Copy ? kLogCopyInfo : kLogCommandInfo;
  if (!(bits & want)) return;
  std::fprintf(stderr, "[mps_ext profiler] %s %s (device %d, stream %lld): %.3f us%s%s\n",
               kindName(r.kind), r.name.c_str(), r.device,
               static_cast<long long>(r.stream), (r.end_ns - r.start_ns) / 1e3,
               (bits & kLogIncludeArgs) && !r.args.empty() ? " " : "",
               (bits & kLogIncludeArgs) ? r.args.c_str() : "");
}

void deliver(Record&& r) {
  unsigned c = g_consumers.load(std::memory_order_acquire);
  if (!c) return;
  logLine(r);
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (c & kStats) {
    std::string key = r.name;
    if (!r.direction.empty()) key += " (" + r.direction + ")";
    auto& st = s.stats[{static_cast<int>(r.kind), key}];
    std::int64_t d = r.end_ns - r.start_ns;
    if (st.count == 0) {
      st.name = key;
      st.kind = r.kind;
      st.min_ns = st.max_ns = d;
    }
    st.count++;
    st.total_ns += d;
    st.min_ns = std::min(st.min_ns, d);
    st.max_ns = std::max(st.max_ns, d);
  }
  if (c & kKineto) s.kineto.push_back(r);
  if (c & kCapture) s.capture.push_back(r);
  if (c & kTrace) s.trace.push_back(std::move(r));
}

std::unique_ptr<at::ObserverContext> onStart(const at::RecordFunction& fn) {
  unsigned c = g_consumers.load(std::memory_order_relaxed);
  if (!c) return nullptr;
  int device = -1;
  auto in = fn.inputs();
  for (const auto& v : in) {
    device = deviceOf(v);
    if (device >= 0) break;
  }
  if (device < 0) return nullptr;
  auto ctx = std::make_unique<OpContext>();
  ctx->device = device;
  ctx->stream = streamOf(device);
  if (isCopy(fn.name())) {
    ctx->kind = Kind::Copy;
    ctx->direction = copyDirection(fn);
  }
  if (needArgs(c)) {
    std::ostringstream os;
    describeList(os, in.data(), in.size());
    ctx->inputs = os.str();
  }
  ctx->metadata = isMetadataOnly(fn.name());
  ctx->depth = static_cast<int>(t_open.size());
  if (!t_open.empty() && !ctx->metadata) t_open.back()->leaf = false;
  t_open.push_back(ctx.get());
  ctx->start_ns = c10::getTime();
  return ctx;
}

void onEnd(const at::RecordFunction& fn, at::ObserverContext* p) {
  if (!p) return;
  auto* ctx = static_cast<OpContext*>(p);
  if (!t_open.empty() && t_open.back() == ctx) {
    t_open.pop_back();
  } else {
    for (auto it = t_open.begin(); it != t_open.end(); ++it) {
      if (*it == ctx) {
        t_open.erase(it);
        break;
      }
    }
  }
  if (g_wait.load(std::memory_order_relaxed)) {
    guardImpl()->synchronizeStream(c10::Stream(
        c10::Stream::UNSAFE, c10::Device(kDev, static_cast<c10::DeviceIndex>(ctx->device)),
        ctx->stream));
  }
  Record r;
  r.end_ns = c10::getTime();
  r.start_ns = ctx->start_ns;
  r.name = fn.name();
  r.overload = fn.overload_name();
  r.kind = ctx->kind;
  r.device = ctx->device;
  r.stream = ctx->stream;
  r.thread = at::RecordFunction::currentThreadId();
  r.depth = ctx->depth;
  r.leaf = ctx->leaf;
  r.kernel = !ctx->metadata;
  r.correlation = t_correlation.empty() ? 0 : t_correlation.back();
  r.direction = ctx->direction;
  unsigned c = g_consumers.load(std::memory_order_relaxed);
  if (needArgs(c) || !ctx->direction.empty()) {
    std::ostringstream os;
    os << '{';
    bool any = false;
    if (!ctx->direction.empty()) {
      os << "\"direction\":";
      jsonString(os, ctx->direction);
      any = true;
    }
    if (!ctx->inputs.empty()) {
      os << (any ? "," : "") << "\"inputs\":" << ctx->inputs << ",\"outputs\":";
      const auto& out = fn.outputs();
      describeList(os, out.data(), out.size());
    }
    os << '}';
    r.args = os.str();
  }
  deliver(std::move(r));
}

} // namespace

void enable(unsigned consumers, bool wait_until_completed) {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  unsigned cur = g_consumers.load();
  TORCH_CHECK((cur & consumers) == 0, "the mps_ext profiler is already started",
              (consumers & kCapture) ? " (a metal capture is in progress)" : "");
  if (consumers & kTrace) {
    g_wait.store(wait_until_completed);
    s.trace.clear();
    s.memory.clear();
  }
  if (consumers & kCapture) s.capture.clear();
  if (consumers & kKineto) s.kineto.clear();
  g_consumers.store(cur | consumers, std::memory_order_release);
  if (s.handle == 0) {
    s.handle = at::addGlobalCallback(at::RecordFunctionCallback(onStart, onEnd)
                                         .needsInputs(true)
                                         .needsOutputs(true)
                                         .scopes({at::RecordScope::FUNCTION}));
  }
}

void disable(unsigned consumers) {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  unsigned cur = g_consumers.load();
  TORCH_CHECK((cur & consumers) == consumers, "the mps_ext profiler is not started");
  cur &= ~consumers;
  g_consumers.store(cur, std::memory_order_release);
  if (consumers & kTrace) g_wait.store(false);
  if (cur == 0 && s.handle != 0) {
    at::removeCallback(s.handle);
    s.handle = 0;
  }
}

unsigned enabledConsumers() {
  return g_consumers.load(std::memory_order_relaxed);
}

std::vector<Record> take(Consumer c) {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto* b = buffer(s, c);
  TORCH_CHECK(b, "no record buffer for this consumer");
  std::vector<Record> out;
  out.swap(*b);
  return out;
}

std::vector<Stat> stats() {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  std::vector<Stat> out;
  out.reserve(s.stats.size());
  for (const auto& [k, v] : s.stats) out.push_back(v);
  return out;
}

void setLogOptions(unsigned bits) {
  g_log.store(bits);
}

unsigned logOptions() {
  return g_log.load();
}

std::int64_t nowNs() {
  return c10::getTime();
}

namespace {

void recordCommandImpl(const std::string& name, int device, std::int64_t stream,
                       std::int64_t start_ns, std::int64_t end_ns, std::string attrs,
                       const IssueToken* issued) {
  Record r;
  r.name = name;
  r.kind = Kind::Command;
  r.device = device < 0 ? currentDevice() : device;
  r.stream = stream < 0 ? streamOf(r.device) : stream;
  r.start_ns = start_ns;
  r.end_ns = end_ns;
  r.thread = at::RecordFunction::currentThreadId();
  if (issued) {
    r.depth = issued->depth;
    r.correlation = issued->correlation;
  } else {
    r.depth = static_cast<int>(t_open.size());
    if (!t_open.empty()) t_open.back()->leaf = false;
    r.correlation = t_correlation.empty() ? 0 : t_correlation.back();
  }
  r.args = attrs.empty() ? "{}" : std::move(attrs);
  deliver(std::move(r));
}

} // namespace

IssueToken issueToken() {
  IssueToken t;
  if (!g_consumers.load(std::memory_order_relaxed)) return t;
  t.correlation = t_correlation.empty() ? 0 : t_correlation.back();
  t.depth = static_cast<int>(t_open.size());
  // The issuing op did device work (queued), so it is not a leaf.
  if (!t_open.empty()) t_open.back()->leaf = false;
  return t;
}

void recordCommand(const std::string& name, int device, std::int64_t stream,
                   std::int64_t start_ns, std::int64_t end_ns, std::string attrs) {
  if (!g_consumers.load(std::memory_order_relaxed)) return;
  recordCommandImpl(name, device, stream, start_ns, end_ns, std::move(attrs), nullptr);
}

void recordCommand(const std::string& name, int device, std::int64_t stream,
                   std::int64_t start_ns, std::int64_t end_ns, std::string attrs,
                   IssueToken issued) {
  if (!g_consumers.load(std::memory_order_relaxed)) return;
  recordCommandImpl(name, device, stream, start_ns, end_ns, std::move(attrs), &issued);
}

void recordMemoryUsage(int device, std::size_t allocated, std::size_t reserved) {
  MemorySample m{device, c10::getTime(), allocated, reserved};
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (g_consumers.load(std::memory_order_relaxed) & kTrace) s.memory.push_back(m);
}

std::vector<MemorySample> takeMemorySamples() {
  auto& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  std::vector<MemorySample> out;
  out.swap(s.memory);
  return out;
}

void pushCorrelation(std::uint64_t id) {
  t_correlation.push_back(id);
}

void popCorrelation() {
  if (!t_correlation.empty()) t_correlation.pop_back();
}

} // namespace torch_mps_ext::profiler
