#include "core/Generator.h"

#include "runtime/Device.h"

#include <ATen/core/GeneratorForPrivateuseone.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/Exception.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/StorageImpl.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <random>

namespace torch_mps_ext {

PhiloxGenerator::PhiloxGenerator(c10::DeviceIndex device, std::uint64_t seed)
    : c10::GeneratorImpl(c10::Device(c10::DeviceType::PrivateUse1, device),
                         c10::DispatchKeySet(c10::DispatchKey::PrivateUse1)),
      seed_(seed) {}

void PhiloxGenerator::set_current_seed(std::uint64_t seed) {
  seed_ = seed;
  offset_ = 0;
}

std::uint64_t PhiloxGenerator::current_seed() const {
  return seed_;
}

std::uint64_t PhiloxGenerator::seed() {
  std::uint64_t s = c10::detail::getNonDeterministicRandom(true);
  set_current_seed(s);
  return s;
}

void PhiloxGenerator::set_offset(std::uint64_t offset) {
  offset_ = offset;
}

std::uint64_t PhiloxGenerator::get_offset() const {
  return offset_;
}

std::uint64_t PhiloxGenerator::advance(std::uint64_t increment) {
  std::uint64_t start = offset_;
  offset_ += increment;
  return start;
}

void PhiloxGenerator::set_state(const c10::TensorImpl& new_state) {
  TORCH_CHECK_TYPE(new_state.dtype() == caffe2::TypeMeta::Make<std::uint8_t>() &&
                       new_state.device().is_cpu(),
                   "RNG state must be a torch.ByteTensor");
  TORCH_CHECK(static_cast<std::size_t>(new_state.numel()) == kStateSize,
              "RNG state is wrong size");
  TORCH_CHECK(new_state.is_contiguous(), "RNG state must be contiguous");
  const auto* bytes = static_cast<const std::uint8_t*>(new_state.data());
  std::memcpy(&seed_, bytes, 8);
  std::memcpy(&offset_, bytes + 8, 8);
}

c10::intrusive_ptr<c10::TensorImpl> PhiloxGenerator::get_state() const {
  auto storage = c10::make_intrusive<c10::StorageImpl>(
      c10::StorageImpl::use_byte_size_t(), kStateSize,
      c10::GetCPUAllocator()->allocate(kStateSize), c10::GetCPUAllocator(),
      /*resizable=*/true);
  auto state = c10::make_intrusive<c10::TensorImpl>(
      c10::Storage(std::move(storage)), c10::DispatchKey::CPU,
      caffe2::TypeMeta::Make<std::uint8_t>());
  state->set_sizes_contiguous({static_cast<std::int64_t>(kStateSize)});
  auto* bytes = static_cast<std::uint8_t*>(state->mutable_data());
  std::memcpy(bytes, &seed_, 8);
  std::memcpy(bytes + 8, &offset_, 8);
  return state;
}

void PhiloxGenerator::graphsafe_set_state(
    const c10::intrusive_ptr<c10::GeneratorImpl>& state) {
  auto* other = dynamic_cast<PhiloxGenerator*>(state.get());
  TORCH_CHECK(other != nullptr, "expected an mps_ext generator state");
  seed_ = other->seed_;
  offset_ = other->offset_;
}

c10::intrusive_ptr<c10::GeneratorImpl> PhiloxGenerator::graphsafe_get_state() const {
  return c10::intrusive_ptr<c10::GeneratorImpl>::reclaim(clone_impl());
}

PhiloxGenerator* PhiloxGenerator::clone_impl() const {
  auto* g = new PhiloxGenerator(device().index(), seed_);
  g->offset_ = offset_;
  return g;
}

const at::Generator& defaultGenerator(c10::DeviceIndex device) {
  static std::once_flag once[runtime::kMaxDevices];
  static at::Generator gens[runtime::kMaxDevices];
  if (device < 0) device = static_cast<c10::DeviceIndex>(runtime::currentDevice());
  runtime::checkDevice(device);
  std::call_once(once[device], [device] {
    gens[device] = at::make_generator<PhiloxGenerator>(device);
  });
  return gens[device];
}

PhiloxStream reserveWords(PhiloxGenerator* gen, std::uint64_t words) {
  std::lock_guard<std::mutex> lock(gen->mutex_);
  const std::uint64_t seed = gen->current_seed();
  return PhiloxStream{seed, gen->advance((words + 3) / 4)};
}

PhiloxGenerator* generatorFor(const std::optional<at::Generator>& gen,
                              c10::DeviceIndex device) {
  return at::get_generator_or_default<PhiloxGenerator>(gen, defaultGenerator(device));
}

at::Generator newGenerator(c10::DeviceIndex device) {
  if (device < 0) device = static_cast<c10::DeviceIndex>(runtime::currentDevice());
  runtime::checkDevice(device);
  return at::make_generator<PhiloxGenerator>(device);
}

} // namespace torch_mps_ext
