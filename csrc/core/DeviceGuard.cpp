// Layer 2: c10 device guard for PrivateUse1 (mps_ext).
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

  c10::Stream getStream(c10::Device d) const override {
    return c10::Stream(c10::Stream::UNSAFE, d, runtime::currentStreamId(d.index()));
  }

  c10::Stream getDefaultStream(c10::Device d) const override {
    return c10::Stream(c10::Stream::UNSAFE, d, 0);
  }

  c10::Stream exchangeStream(c10::Stream s) const override {
    return c10::Stream(c10::Stream::UNSAFE, s.device(), 0);
  }

  c10::DeviceIndex deviceCount() const noexcept override {
    return static_cast<c10::DeviceIndex>(runtime::deviceCount());
  }

  bool queryStream(const c10::Stream& /*stream*/) const override { return true; }
  void synchronizeStream(const c10::Stream& /*stream*/) const override {}
  void synchronizeDevice(const c10::DeviceIndex /*device*/) const override {}
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, MpsExtGuardImpl);

} // namespace
} // namespace torch_mps_ext
