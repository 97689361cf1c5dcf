// Layer 2: c10 device guard for PrivateUse1 (mps_ext): devices, streams and
// events, mapped onto runtime/Stream.h (see docs/streams.md).
#include "core/Allocator.h"
#include "runtime/Device.h"
#include "runtime/Stream.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <stdexcept>

namespace torch_mps_ext {
namespace {

struct MpsExtGuardImpl final : public c10::impl::DeviceGuardImplInterface {
  static constexpr c10::DeviceType kType = c10::DeviceType::PrivateUse1;

  c10::DeviceType type() const override { return kType; }

  static void check(c10::Device d) {
    TORCH_CHECK(d.type() == kType, "expected an mps_ext device, got ", d);
    try {
      runtime::checkDevice(d.index());
    } catch (const std::out_of_range& e) {
      TORCH_CHECK_INDEX(false, e.what());
    }
  }

  c10::Device exchangeDevice(c10::Device d) const override {
    check(d);
    auto old = runtime::currentDevice();
    if (old != d.index()) runtime::setCurrentDevice(d.index());
    return c10::Device(kType, static_cast<c10::DeviceIndex>(old));
  }

  c10::Device getDevice() const override {
    return c10::Device(kType, static_cast<c10::DeviceIndex>(runtime::currentDevice()));
  }

  void setDevice(c10::Device d) const override {
    check(d);
    runtime::setCurrentDevice(d.index());
  }

  void uncheckedSetDevice(c10::Device d) const noexcept override {
    if (d.index() >= 0 && d.index() < runtime::deviceCount()) {
      runtime::setCurrentDevice(d.index());
    }
  }

  // ---- streams (runtime/Stream.h) ----

  static c10::Stream wrap(c10::Device d, std::int64_t id) {
    return c10::Stream(c10::Stream::UNSAFE, d, id);
  }

  static c10::Device indexed(c10::Device d) {
    if (d.has_index()) return d;
    return c10::Device(kType, static_cast<c10::DeviceIndex>(runtime::currentDevice()));
  }

  static void checkStream(const c10::Stream& s) {
    check(s.device());
    try {
      runtime::checkStream(s.device_index(), s.id());
    } catch (const std::out_of_range& e) {
      TORCH_CHECK(false, e.what());
    }
  }

  c10::Stream getStream(c10::Device d) const override {
    d = indexed(d);
    check(d);
    return wrap(d, runtime::currentStreamId(d.index()));
  }

  c10::Stream getDefaultStream(c10::Device d) const override {
    d = indexed(d);
    check(d);
    return wrap(d, 0);
  }

  c10::Stream getStreamFromGlobalPool(c10::Device d,
                                      bool isHighPriority = false) const override {
    d = indexed(d);
    check(d);
    return wrap(d, runtime::poolStream(d.index(), isHighPriority
                                           ? runtime::kHighestPriority
                                           : runtime::kLowestPriority));
  }

  c10::Stream getNewStream(c10::Device d, int priority = 0) const override {
    d = indexed(d);
    check(d);
    return wrap(d, runtime::poolStream(d.index(), priority));
  }

  c10::Stream exchangeStream(c10::Stream s) const override {
    checkStream(s);
    std::int64_t old = runtime::currentStreamId(s.device_index());
    runtime::setCurrentStreamId(s.device_index(), s.id());
    return wrap(s.device(), old);
  }

  void* getStreamNativeHandle(const c10::Stream s) const override {
    checkStream(s);
    return runtime::streamHandle(s.device_index(), s.id());
  }

  c10::DeviceIndex deviceCount() const noexcept override {
    return static_cast<c10::DeviceIndex>(runtime::deviceCount());
  }

  bool queryStream(const c10::Stream& s) const override {
    checkStream(s);
    return runtime::queryStream(s.device_index(), s.id());
  }

  void synchronizeStream(const c10::Stream& s) const override {
    checkStream(s);
    runtime::awaitStream(s.device_index(), s.id());
  }

  void synchronizeDevice(const c10::DeviceIndex device) const override {
    int d = device < 0 ? runtime::currentDevice() : device;
    check(c10::Device(kType, static_cast<c10::DeviceIndex>(d)));
    runtime::synchronizeStreams(d);
    if (auto error = runtime::takeError(d)) {
      throw c10::AcceleratorError(
          {__func__, __FILE__, static_cast<std::uint32_t>(__LINE__)}, /*code=*/1, *error);
    }
  }

  void recordDataPtrOnStream(const c10::DataPtr& data,
                             const c10::Stream& s) const override {
    deviceAllocator().recordStream(data, s);
  }

  // ---- events ----

  void record(void** event, const c10::Stream& s, const c10::DeviceIndex device_index,
              const c10::EventFlag flag) const override {
    checkStream(s);
    TORCH_CHECK(device_index == -1 || device_index == s.device_index(),
                "Event device index ", device_index,
                " does not match recording stream's device index ",
                s.device_index(), ".");
    if (*event == nullptr) {
      *event = runtime::createEvent(flag == c10::EventFlag::BACKEND_DEFAULT);
    }
    runtime::recordEvent(static_cast<runtime::Event*>(*event), s.device_index(), s.id());
  }

  void block(void* event, const c10::Stream& s) const override {
    if (event == nullptr) return;
    checkStream(s);
    runtime::streamWaitEvent(static_cast<runtime::Event*>(event), s.device_index(), s.id());
  }

  bool queryEvent(void* event) const override {
    return event == nullptr || runtime::queryEvent(static_cast<runtime::Event*>(event));
  }

  void synchronizeEvent(void* event) const override {
    if (event != nullptr) runtime::synchronizeEvent(static_cast<runtime::Event*>(event));
  }

  double elapsedTime(void* start, void* end, const c10::DeviceIndex /*device*/) const override {
    TORCH_CHECK(start != nullptr && end != nullptr,
                "Both events must be recorded before calculating elapsed time.");
    try {
      return runtime::elapsedMs(static_cast<runtime::Event*>(start),
                                static_cast<runtime::Event*>(end));
    } catch (const std::runtime_error& e) {
      TORCH_CHECK(false, e.what());
    }
  }

  void destroyEvent(void* event, const c10::DeviceIndex /*device*/) const noexcept override {
    runtime::destroyEvent(static_cast<runtime::Event*>(event));
  }
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, MpsExtGuardImpl);

} // namespace
} // namespace torch_mps_ext
