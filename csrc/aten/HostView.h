// Layer 3: moving between mps_ext tensors and CPU tensors without copying.
//
// The device's memory is host memory, so a CPU kernel can work on it in
// place. These helpers build CPU views ("host views") of device tensors, lend
// device memory to CPU kernels for the outputs they allocate, and adopt the
// results back as device tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/StorageImpl.h>

namespace torch_mps_ext {

// A CPU tensor over the same bytes as the device tensor `t` (same sizes,
// strides, offset, dtype, conj/neg bits). Its storage does not own the
// memory; it allocates from the lending allocator when a kernel resizes it.
// Waits first for the work queued on the current stream of t's device.
at::Tensor hostView(const at::Tensor& t);

// A host view of `t` over the CPU storage of `host`, a host view of a tensor
// with the same device storage as t: host views of aliasing device tensors
// share one CPU storage, so CPU kernels see the aliasing (memory-overlap
// checks, is_set_to, same-storage fast paths) exactly as on CPU.
at::Tensor hostViewSharing(const at::Tensor& t, const at::Tensor& host);

// Nested tensors (torch.nested, strided layout: a buffer plus CPU metadata
// tensors of sizes, strides and offsets). hostNestedView: a nested CPU tensor
// over the device tensor's buffer (waits for the current stream as
// hostView does). deviceNested: the nested device tensor over `storage` with
// `like`'s metadata (shared, as torch's nested views share it).
at::Tensor hostNestedView(const at::Tensor& t);
at::Tensor deviceNested(c10::Storage storage, const at::Tensor& like);

// Like hostView, but the CPU tensor also keeps the device memory alive (its
// storage holds a reference to t's), so it may outlive `t`: what work that
// finishes later (a collective in flight) uses. Exposed to Python as
// torch.ops.mps_ext._host_alias.
at::Tensor hostAlias(const at::Tensor& t);

// A device tensor on `device` over `storage` with the given geometry.
at::Tensor deviceTensor(c10::Storage storage, const at::Tensor& like_geometry);

// While alive, CPU allocations made by this thread come from the device pool
// of `device` (memory is tagged CPU until adopted). Nests.
class LendScope {
 public:
  explicit LendScope(int device);
  ~LendScope();
  LendScope(const LendScope&) = delete;
  LendScope& operator=(const LendScope&) = delete;

 private:
  int saved_;
};

// True if `dp` is device-pool memory (lent or not).
bool isPoolMemory(const c10::DataPtr& dp);

// Takes the memory of a CPU storage that holds lent device memory and makes
// it a device storage on `device`. The CPU storage is left empty.
c10::Storage adoptLentStorage(c10::StorageImpl* cpu_storage, int device);

// The CPU result `cpu` of a kernel run inside a LendScope, as a device tensor
// on `device`: its lent memory adopted when nothing else holds the storage,
// else a copy.
at::Tensor adoptResult(const at::Tensor& cpu, int device);

// A device copy of the CPU tensor `cpu` on `device`, same sizes and strides.
at::Tensor copyToDevice(const at::Tensor& cpu, int device);

// Wraps the process's CPU allocator with the lending one (once; the first
// LendScope does it).
void installLendingAllocator();

} // namespace torch_mps_ext
