// Layer 2: PrivateUse1 hooks (availability, device count, generators, ...),
// the allocator registration, and device storage resizing (the hooks'
// resizePrivateUse1Bytes and aten's resize_ share it).
#include "core/Allocator.h"
#include "core/Generator.h"
#include "core/Hooks.h"
#include "core/HostAllocator.h"
#include "runtime/Device.h"
#include "runtime/Stream.h"

#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <c10/core/Allocator.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

namespace torch_mps_ext {
namespace {

struct MpsExtHooks final : public at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return runtime::deviceCount() > 0; }
  bool hasPrimaryContext(c10::DeviceIndex device) const override {
    return device >= 0 && device < runtime::deviceCount();
  }
  c10::DeviceIndex deviceCount() const override {
    return static_cast<c10::DeviceIndex>(runtime::deviceCount());
  }
  void setCurrentDevice(c10::DeviceIndex device) const override {
    runtime::setCurrentDevice(device);
  }
  c10::DeviceIndex getCurrentDevice() const override {
    return static_cast<c10::DeviceIndex>(runtime::currentDevice());
  }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex device) const override {
    auto old = runtime::currentDevice();
    runtime::setCurrentDevice(device);
    return static_cast<c10::DeviceIndex>(old);
  }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex device) const override {
    return exchangeDevice(device);
  }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex device) const override {
    return defaultGenerator(device);
  }
  at::Generator getNewGenerator(c10::DeviceIndex device) const override {
    return newGenerator(device);
  }
  at::Device getDeviceFromPtr(void* data) const override {
    int device = runtime::currentDevice();
    lookupDevice(data, &device);
    return at::Device(c10::DeviceType::PrivateUse1, static_cast<c10::DeviceIndex>(device));
  }
  // Pinned host memory: the mps_ext host allocator (core/HostAllocator.h).
  bool isPinnedPtr(const void* data) const override {
    return torch_mps_ext::isPinnedPtr(data);
  }
  c10::Allocator* getPinnedMemoryAllocator() const override {
    return &hostAllocator();
  }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t newsize) const override {
    resizeStorageBytes(storage.unsafeGetStorageImpl(), newsize);
  }
};

} // namespace

void registerHooks() {
  static bool done = false;
  if (done) return;
  done = true;
  c10::SetAllocator(c10::DeviceType::PrivateUse1, &deviceAllocator());
  at::RegisterPrivateUse1HooksInterface(new MpsExtHooks());
  registerHostAllocator();
}

void resizeStorageBytes(c10::StorageImpl* storage, std::size_t newsize) {
  TORCH_CHECK(storage->resizable(),
              "Trying to resize storage that is not resizable");
  c10::DeviceGuard guard(storage->device());
  runtime::awaitCurrentStream(storage->device().index());
  c10::DataPtr fresh = deviceAllocator().allocate(newsize);
  std::size_t keep = std::min(newsize, storage->nbytes());
  if (keep && storage->data()) std::memcpy(fresh.get(), storage->data(), keep);
  storage->set_data_ptr_noswap(std::move(fresh));
  storage->set_nbytes(newsize);
}

} // namespace torch_mps_ext
