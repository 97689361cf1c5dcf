#include "aten/HostView.h"

#include "core/Allocator.h"
#include "runtime/Device.h"
#include "runtime/Stream.h"

#include <ATen/EmptyTensor.h>
#include <ATen/NestedTensorImpl.h>
#include <ATen/ops/copy_native.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/TensorImpl.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>

namespace torch_mps_ext {
namespace {

thread_local int t_lend_device = -1;
c10::DeleterFnPtr g_base_raw_deleter = nullptr;

// Memory from raw_allocate() (oneDNN's buffers use it) may have been lent
// from the pool; it goes back where it came from.
void lendingRawDelete(void* ptr) {
  if (!releaseIfPooled(ptr)) g_base_raw_deleter(ptr);
}

// The CPU allocator while mps_ext is loaded: the stock one, except on a
// thread inside a LendScope, where allocations come from the device pool so
// that a CPU kernel's outputs are already device memory.
struct LendingAllocator final : public c10::Allocator {
  c10::Allocator* base = nullptr;

  c10::DataPtr allocate(std::size_t n) override {
    if (t_lend_device >= 0) {
      return allocateOn(t_lend_device, n, c10::DeviceType::CPU);
    }
    return base->allocate(n);
  }
  c10::DeleterFnPtr raw_deleter() const override { return &lendingRawDelete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    base->copy_data(dest, src, count);
  }
};

// Host views' storages name it as their allocator before it is installed
// (a kernel that resizes one allocates through it): it captures torch's own
// CPU allocator when first used, which is before installLendingAllocator.
LendingAllocator& lending() {
  static LendingAllocator* a = [] {
    auto* l = new LendingAllocator();
    l->base = c10::GetCPUAllocator();
    g_base_raw_deleter = l->base->raw_deleter();
    return l;
  }();
  return *a;
}

c10::DeleterFnPtr poolDeleter() {
  return deviceAllocator().raw_deleter();
}

} // namespace

// The process's CPU allocator is wrapped on the first LendScope, i.e. the
// first time a CPU kernel runs on device memory: a program that never does
// keeps torch's own CPU allocator untouched.
void installLendingAllocator() {
  static std::once_flag once;
  std::call_once(once, [] { c10::SetCPUAllocator(&lending(), /*priority=*/1); });
}

LendScope::LendScope(int device) : saved_(t_lend_device) {
  static std::atomic<bool> installed{false};
  if (C10_UNLIKELY(!installed.load(std::memory_order_acquire))) {
    installLendingAllocator();
    installed.store(true, std::memory_order_release);
  }
  t_lend_device = device;
}

LendScope::~LendScope() {
  t_lend_device = saved_;
}

bool isPoolMemory(const c10::DataPtr& dp) {
  return dp.get_deleter() == poolDeleter();
}

namespace {

// A tensor with `key` over `storage`, with like's geometry and math bits.
at::Tensor tensorOver(c10::Storage storage, const at::Tensor& like, c10::DispatchKey key) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(key), like.dtype());
  impl->set_sizes_and_strides(like.sizes(), like.strides(), like.storage_offset());
  if (like.is_conj()) impl->_set_conj(true);
  if (like.is_neg()) impl->_set_neg(true);
  return at::Tensor(std::move(impl));
}

} // namespace

at::Tensor hostView(const at::Tensor& t) {
  // The host is about to touch device memory inline: first let the current
  // stream finish what is queued on it (runtime/Stream.h).
  runtime::awaitCurrentStream(t.device().index());
  c10::StorageImpl* dev = t.storage().unsafeGetStorageImpl();
  auto storage = c10::make_intrusive<c10::StorageImpl>(
      c10::StorageImpl::use_byte_size_t(), dev->nbytes(),
      c10::DataPtr(const_cast<void*>(dev->data()), c10::Device(c10::kCPU)),
      &lending(), dev->resizable());
  return tensorOver(c10::Storage(std::move(storage)), t, c10::DispatchKey::CPU);
}

namespace {

// A nested tensor over `storage` with like's metadata, built the way torch
// builds nested tensors from a buffer (so its dispatch keys, autograd and
// ADInplaceOrView included, are those torch gives a nested tensor of the
// buffer's device). `key` is the buffer's backend key.
at::Tensor nestedOver(c10::Storage storage, const at::Tensor& like, c10::DispatchKey key) {
  const at::native::NestedTensorImpl* nt = at::native::get_nested_tensor_impl(like);
  const int64_t numel = static_cast<int64_t>(storage.nbytes() / like.dtype().itemsize());
  auto buffer_impl = c10::make_intrusive<c10::TensorImpl>(std::move(storage),
                                                          c10::DispatchKeySet(key), like.dtype());
  buffer_impl->set_sizes_contiguous({numel});
  at::Tensor buffer(std::move(buffer_impl));
  return at::detail::make_tensor<at::native::NestedTensorImpl>(
      buffer, nt->get_nested_sizes(), nt->get_nested_strides(), nt->get_storage_offsets());
}

} // namespace

at::Tensor hostNestedView(const at::Tensor& t) {
  runtime::awaitCurrentStream(t.device().index());
  c10::StorageImpl* dev = t.storage().unsafeGetStorageImpl();
  auto storage = c10::make_intrusive<c10::StorageImpl>(
      c10::StorageImpl::use_byte_size_t(), dev->nbytes(),
      c10::DataPtr(const_cast<void*>(dev->data()), c10::Device(c10::kCPU)), &lending(),
      /*resizable=*/false);
  return nestedOver(c10::Storage(std::move(storage)), t, c10::DispatchKey::CPU);
}

at::Tensor deviceNested(c10::Storage storage, const at::Tensor& like) {
  return nestedOver(std::move(storage), like, c10::DispatchKey::PrivateUse1);
}

at::Tensor hostViewSharing(const at::Tensor& t, const at::Tensor& host) {
  TORCH_INTERNAL_ASSERT(host.storage().data() == t.storage().data());
  runtime::awaitCurrentStream(t.device().index());
  return tensorOver(host.storage(), t, c10::DispatchKey::CPU);
}

at::Tensor hostAlias(const at::Tensor& t) {
  TORCH_CHECK(t.device().type() == c10::DeviceType::PrivateUse1,
              "_host_alias: expected an mps_ext tensor, got a tensor on ", t.device());
  runtime::awaitCurrentStream(t.device().index());
  c10::StorageImpl* dev = t.storage().unsafeGetStorageImpl();
  auto* keep = new c10::Storage(t.storage());
  c10::DataPtr dp(const_cast<void*>(dev->data()), keep,
                  [](void* ctx) { delete static_cast<c10::Storage*>(ctx); },
                  c10::Device(c10::kCPU));
  auto storage = c10::make_intrusive<c10::StorageImpl>(
      c10::StorageImpl::use_byte_size_t(), dev->nbytes(), std::move(dp),
      /*allocator=*/nullptr, /*resizable=*/false);
  return tensorOver(c10::Storage(std::move(storage)), t, c10::DispatchKey::CPU);
}

at::Tensor deviceTensor(c10::Storage storage, const at::Tensor& like) {
  return tensorOver(std::move(storage), like, c10::DispatchKey::PrivateUse1);
}

c10::Storage adoptLentStorage(c10::StorageImpl* cpu_storage, int device) {
  std::size_t nbytes = cpu_storage->nbytes();
  c10::DataPtr dp = cpu_storage->set_data_ptr(
      c10::DataPtr(nullptr, c10::Device(c10::kCPU)));
  cpu_storage->set_nbytes(0);
  dp.unsafe_set_device(
      c10::Device(c10::DeviceType::PrivateUse1, static_cast<c10::DeviceIndex>(device)));
  return c10::Storage(c10::make_intrusive<c10::StorageImpl>(
      c10::StorageImpl::use_byte_size_t(), nbytes, std::move(dp),
      &deviceAllocator(), /*resizable=*/true));
}

at::Tensor adoptResult(const at::Tensor& cpu, int device) {
  const c10::Storage& st = cpu.storage();
  if (isPoolMemory(st.data_ptr()) && st.use_count() == 1) {
    return deviceTensor(adoptLentStorage(st.unsafeGetStorageImpl(), device), cpu);
  }
  return copyToDevice(cpu, device);
}

at::Tensor copyToDevice(const at::Tensor& cpu, int device) {
  c10::DeviceGuard guard(
      c10::Device(c10::DeviceType::PrivateUse1, static_cast<c10::DeviceIndex>(device)));
  at::Tensor out = at::detail::empty_strided_generic(
      cpu.sizes(), cpu.strides(), &deviceAllocator(),
      c10::DispatchKeySet(c10::DispatchKey::PrivateUse1), cpu.scalar_type());
  at::Tensor view = hostView(out);
  at::native::copy_(view, cpu, false);  // resolves conj/neg bits
  return out;
}

// mps_ext::_host_alias(Tensor self) -> Tensor: a CPU tensor over an mps_ext
// tensor's memory that keeps it alive (hostAlias). torch_mps_ext.distributed
// hands these to gloo.
TORCH_LIBRARY(mps_ext, m) {
  m.def("_host_alias(Tensor self) -> Tensor");
}

TORCH_LIBRARY_IMPL(mps_ext, CompositeExplicitAutograd, m) {  // any device: a clear error off mps_ext
  m.impl("_host_alias", TORCH_FN(hostAlias));
}

} // namespace torch_mps_ext
