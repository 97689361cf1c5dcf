// Layer 2: DistributedDataParallel's per-iteration timer for mps_ext.
//
// DDP's logger asks c10d::TimerRegistry for a timer of the module's device
// type (CPU and CUDA register one) and, without one, warns on every run that
// it collects no time stats. This one records the forward/backward/
// communication points as timing events on the device's current stream, as
// CUDA's timer does with CUDA events, so DDP's logging data
// (avg_forward_compute_time etc.) is measured in device time.
#include "runtime/Stream.h"

#include <torch/csrc/distributed/c10d/reducer_timer.hpp>

#include <array>
#include <stdexcept>

namespace torch_mps_ext {
namespace {

class DeviceTimer final : public c10d::Timer {
 public:
  explicit DeviceTimer(c10::Device device) : device_(device.index()) {
    for (auto& e : events_) e = runtime::createEvent(/*timing=*/true);
  }
  ~DeviceTimer() override {
    for (auto* e : events_) runtime::destroyEvent(e);
  }

  void record(Event event) override {
    c10d::Timer::record(event);  // the host timestamp
    runtime::recordEvent(events_[static_cast<std::size_t>(event)], device_,
                         runtime::currentStreamId(device_));
  }

  std::optional<int64_t> measureDifference(Event start, Event end) override {
    const runtime::Event* a = events_[static_cast<std::size_t>(start)];
    const runtime::Event* b = events_[static_cast<std::size_t>(end)];
    // Not recorded this run (no backward, no_sync): no measurement.
    if (a->device < 0 || b->device < 0) return std::nullopt;
    runtime::synchronizeEvent(a);
    runtime::synchronizeEvent(b);
    try {
      return static_cast<int64_t>(runtime::elapsedMs(a, b) * 1e6);
    } catch (const std::runtime_error&) {
      return std::nullopt;  // end recorded before start (e.g. no_sync)
    }
  }

 private:
  int device_;
  std::array<runtime::Event*, 5> events_{};
};

} // namespace
} // namespace torch_mps_ext

namespace c10d {
C10_REGISTER_TYPED_CLASS(TimerRegistry, c10::kPrivateUse1, torch_mps_ext::DeviceTimer)
} // namespace c10d
