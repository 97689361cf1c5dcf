// Layer 2: the autograd profiler's legacy device hooks for PrivateUse1.
//
// torch.autograd.profiler.profile(use_device="mps_ext") without Kineto
// (ProfilerState::KINETO_PRIVATEUSE1_FALLBACK) brackets every op with two
// device "events" from these stubs and reports their distance as the op's
// device time. An event here is the host clock read once the current stream
// has finished the work queued before it, which is what a device timestamp
// means for this device. (torch.profiler with ProfilerActivity.PrivateUse1
// uses the Kineto activity profiler instead: ProfilerKineto.cpp.)
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/ApproximateClock.h>
#include <torch/csrc/profiler/stubs/base.h>

#include <memory>

namespace torch_mps_ext::profiler {
namespace {

constexpr auto kDev = c10::DeviceType::PrivateUse1;

const c10::impl::DeviceGuardImplInterface* impl() {
  return c10::impl::getDeviceGuardImpl(kDev);
}

struct Stubs final : torch::profiler::impl::ProfilerStubs {
  void record(c10::DeviceIndex* device, torch::profiler::impl::ProfilerVoidEventStub* event,
              int64_t* cpu_ns) const override {
    auto d = impl()->getDevice();
    if (device) *device = d.index();
    if (event) {
      impl()->synchronizeStream(impl()->getStream(d));
      *event = std::make_shared<int64_t>(c10::getTime());
    }
    if (cpu_ns) *cpu_ns = c10::getTime();
  }

  // Microseconds, as torch's CUDA stubs.
  float elapsed(const torch::profiler::impl::ProfilerVoidEventStub* a,
                const torch::profiler::impl::ProfilerVoidEventStub* b) const override {
    if (!a || !b || !*a || !*b) return 0.f;
    auto t0 = *static_cast<const int64_t*>(a->get());
    auto t1 = *static_cast<const int64_t*>(b->get());
    return static_cast<float>(t1 - t0) / 1000.f;
  }

  void mark(const char*) const override {}
  void rangePush(const char*) const override {}
  void rangePop() const override {}
  bool enabled() const override { return true; }

  void onEachDevice(std::function<void(int)> op) const override {
    auto prev = impl()->getDevice();
    for (c10::DeviceIndex i = 0; i < impl()->deviceCount(); ++i) {
      impl()->setDevice(c10::Device(kDev, i));
      op(i);
    }
    impl()->setDevice(prev);
  }

  void synchronize() const override {
    for (c10::DeviceIndex i = 0; i < impl()->deviceCount(); ++i) impl()->synchronizeDevice(i);
  }
};

struct Register {
  Register() {
    static Stubs stubs;
    torch::profiler::impl::registerPrivateUse1Methods(&stubs);
  }
} register_stubs;

} // namespace
} // namespace torch_mps_ext::profiler
