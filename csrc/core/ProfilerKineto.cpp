// Layer 2: torch.profiler integration.
//
// torch.profiler.profile(activities=[CPU, PrivateUse1]) runs Kineto in the
// KINETO_PRIVATEUSE1 state, which collects device activity from the activity
// profiler a PrivateUse1 backend registers (PrivateUse1ProfilerRegistry,
// torch >= 2.10). Ours is a child profiler whose session turns the recorder's
// kKineto consumer on between start() and stop() and hands Kineto one device
// activity per leaf device operation (CONCURRENT_KERNEL, or GPU_MEMCPY for
// copies), linked to the CPU op that issued it through the correlation id
// torch pushes around every op. torch maps these activity types to
// DeviceType::PrivateUse1 once the backend is renamed, so key_averages()
// shows them as device time ("Self mps_ext" / "mps_ext total") and
// export_chrome_trace() writes them on the device's row, one track per stream.
#include "core/Profiler.h"

#include <torch/csrc/profiler/standalone/privateuse1_profiler.h>

#include <libkineto.h>  // CpuTraceBuffer (complete type for getTraceBuffer)
#include <output_base.h>

#include <deque>
#include <set>

namespace torch_mps_ext::profiler {
namespace {

using libkineto::ActivityType;

class Session final : public libkineto::IActivityProfilerSession {
 public:
  void start() override {
    enable(kKineto);
    status_ = libkineto::TraceStatus::RECORDING;
  }

  void stop() override {
    if (isEnabled(kKineto)) disable(kKineto);
    records_ = take(kKineto);
    status_ = libkineto::TraceStatus::PROCESSING;
  }

  std::vector<std::string> errors() override { return {}; }

  void processTrace(libkineto::ActivityLogger& logger) override {
    processTrace(logger, nullptr, 0, 0);
  }

  void processTrace(libkineto::ActivityLogger& logger,
                    libkineto::getLinkedActivityCallback linked, int64_t /*startTime*/,
                    int64_t /*endTime*/) override {
    span_ = libkineto::TraceSpan(0, 0, "mps_ext");
    int32_t id = 0;
    for (const Record& r : records_) {
      // Parents would count their children's time twice; allocation and
      // view ops run no device work.
      if (!r.leaf || !r.kernel) continue;
      // Named apart from the CPU op that issued it, which torch.profiler's
      // tables list too: "aten::mm (mps_ext)", "aten::_copy_from (cpu -> mps_ext)".
      auto& a = activities_.emplace_back(
          span_, r.kind == Kind::Copy ? ActivityType::GPU_MEMCPY : ActivityType::CONCURRENT_KERNEL,
          r.name + " (" + (r.direction.empty() ? std::string("mps_ext") : r.direction) + ")");
      a.startTime = r.start_ns;
      a.endTime = r.end_ns;
      a.id = ++id;
      a.device = r.device;
      a.resource = static_cast<int32_t>(r.stream);
      a.threadId = static_cast<int32_t>(r.stream);
      if (linked && r.correlation) a.linked = linked(static_cast<int32_t>(r.correlation));
      // addMetadata() formats with fmt, which libtorch does not export;
      // the quoted form takes the text as is.
      a.addMetadataQuoted("device", "mps_ext:" + std::to_string(r.device));
      a.addMetadataQuoted("stream", std::to_string(r.stream));
      if (!r.direction.empty()) a.addMetadataQuoted("direction", r.direction);
      logger.handleGenericActivity(a);
    }
    status_ = libkineto::TraceStatus::READY;
  }

  std::unique_ptr<libkineto::DeviceInfo> getDeviceInfo() override {
    return std::make_unique<libkineto::DeviceInfo>(
        libkineto::DeviceInfo{0, 0, "mps_ext", "mps_ext:0"});
  }

  std::vector<libkineto::ResourceInfo> getResourceInfos() override {
    std::set<std::pair<int, int64_t>> seen;
    std::vector<libkineto::ResourceInfo> out;
    for (const Record& r : records_) {
      if (seen.insert({r.device, r.stream}).second) {
        out.push_back(libkineto::ResourceInfo{r.stream, r.stream, r.device,
                                              "stream " + std::to_string(r.stream)});
      }
    }
    return out;
  }

  std::unique_ptr<libkineto::CpuTraceBuffer> getTraceBuffer() override { return nullptr; }

  void pushCorrelationId(uint64_t id) override { pushCorrelation(id); }
  void popCorrelationId() override { popCorrelation(); }

  ~Session() override {
    if (isEnabled(kKineto) && status_ == libkineto::TraceStatus::RECORDING) {
      try {
        disable(kKineto);
      } catch (...) {
      }
    }
  }

 private:
  std::vector<Record> records_;
  libkineto::TraceSpan span_{0, 0, "mps_ext"};
  std::deque<libkineto::GenericTraceActivity> activities_;
};

class ActivityProfiler final : public libkineto::IActivityProfiler {
 public:
  const std::string& name() const override { return name_; }

  const std::set<ActivityType>& availableActivities() const override { return types_; }

  std::unique_ptr<libkineto::IActivityProfilerSession> configure(
      const std::set<ActivityType>& activity_types, const libkineto::Config& /*config*/) override {
    for (auto t : activity_types) {
      if (types_.count(t)) return std::make_unique<Session>();
    }
    return nullptr;
  }

  std::unique_ptr<libkineto::IActivityProfilerSession> configure(
      int64_t /*ts_ms*/, int64_t /*duration_ms*/, const std::set<ActivityType>& activity_types,
      const libkineto::Config& config) override {
    return configure(activity_types, config);
  }

 private:
  std::string name_{"mps_ext"};
  std::set<ActivityType> types_{ActivityType::CONCURRENT_KERNEL, ActivityType::GPU_MEMCPY};
};

REGISTER_PRIVATEUSE1_PROFILER(ActivityProfiler);

} // namespace
} // namespace torch_mps_ext::profiler
