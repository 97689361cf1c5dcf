// Layer 3: the native operators every device needs (allocation, views,
// resize, set_, copies, item()).
#include "aten/Fidelity.h"
#include "aten/HostView.h"
#include "aten/Ops.h"
#include "core/Allocator.h"
#include "core/Hooks.h"
#include "core/HostAllocator.h"
#include "runtime/Device.h"
#include "runtime/Stream.h"

#include <ATen/Context.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ops/_local_scalar_dense_native.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/copy_native.h>
#include <ATen/ops/set_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cstring>
#include <limits>

namespace torch_mps_ext {
namespace {

constexpr auto kDev = c10::DeviceType::PrivateUse1;

int deviceIndex(std::optional<at::Device> device) {
  return device && device->has_index() ? device->index() : runtime::currentDevice();
}

void checkEmptyOptions(std::optional<at::Layout> layout, std::optional<bool> pin_memory) {
  TORCH_CHECK(layout.value_or(at::kStrided) == at::kStrided,
              "mps_ext supports strided tensors only, got layout ",
              *layout);
  TORCH_CHECK(!pin_memory.value_or(false),
              "Only dense CPU tensors can be pinned");
}

// torch.use_deterministic_algorithms(True) with
// torch.utils.deterministic.fill_uninitialized_memory (its default): what
// empty*/resize_ hand out uninitialised is filled, as on CPU and CUDA, with
// NaN (floating and complex dtypes) or the dtype's largest value.
bool fillUninitializedMemory() {
  auto& ctx = at::globalContext();
  return ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory();
}

void fillUninitialized(const at::Tensor& t) {
  if (t.numel() == 0) return;
  if (t.is_floating_point() || t.is_complex()) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  AT_DISPATCH_V2(t.scalar_type(), "fill_uninitialized", AT_WRAP([&] {
    t.fill_(c10::Scalar(std::numeric_limits<scalar_t>::max()));
  }), at::kBool, AT_EXPAND(AT_INTEGRAL_TYPES_V2));
}

// Fills the bytes of `storage` past `old_nbytes` (what a resize_ added), as
// elements of `dtype`.
void fillGrownStorage(const c10::Storage& storage, caffe2::TypeMeta dtype,
                      std::size_t old_nbytes) {
  int64_t itemsize = static_cast<int64_t>(dtype.itemsize());
  int64_t old_numel = static_cast<int64_t>(old_nbytes) / itemsize;
  int64_t new_numel = static_cast<int64_t>(storage.nbytes()) / itemsize;
  if (new_numel <= old_numel) return;
  auto impl = c10::make_intrusive<c10::TensorImpl>(
      c10::Storage(storage), c10::DispatchKeySet(c10::DispatchKey::PrivateUse1), dtype);
  int64_t size = new_numel - old_numel, stride = 1;
  impl->set_sizes_and_strides(c10::IntArrayRef(size), c10::IntArrayRef(stride), old_numel);
  fillUninitialized(at::Tensor(std::move(impl)));
}

at::Tensor empty_memory_format(c10::IntArrayRef size,
                               std::optional<at::ScalarType> dtype,
                               std::optional<at::Layout> layout,
                               std::optional<at::Device> device,
                               std::optional<bool> pin_memory,
                               std::optional<at::MemoryFormat> memory_format) {
  checkEmptyOptions(layout, pin_memory);
  at::ScalarType st = dtype.value_or(c10::get_default_dtype_as_scalartype());
  if (C10_UNLIKELY(st == at::kDouble) && fidelity::on()) fidelity::checkNewTensor(st);
  at::Tensor t = emptyOnDevice(size, std::nullopt, st, deviceIndex(device), memory_format);
  if (C10_UNLIKELY(fillUninitializedMemory())) fillUninitialized(t);
  return t;
}

at::Tensor empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride,
                         std::optional<at::ScalarType> dtype,
                         std::optional<at::Layout> layout,
                         std::optional<at::Device> device,
                         std::optional<bool> pin_memory) {
  checkEmptyOptions(layout, pin_memory);
  at::ScalarType st = dtype.value_or(c10::get_default_dtype_as_scalartype());
  if (C10_UNLIKELY(st == at::kDouble) && fidelity::on()) fidelity::checkNewTensor(st);
  at::Tensor t = emptyOnDevice(size, stride, st, deviceIndex(device));
  if (C10_UNLIKELY(fillUninitializedMemory())) fillUninitialized(t);
  return t;
}

at::Tensor as_strided(const at::Tensor& self, c10::IntArrayRef size,
                      c10::IntArrayRef stride,
                      std::optional<int64_t> storage_offset) {
  return at::native::as_strided_tensorimpl(self, size, stride, storage_offset);
}

at::Tensor view(const at::Tensor& self, c10::IntArrayRef size) {
  return at::native::view(self, size);
}

at::Tensor reshape_alias(const at::Tensor& self, c10::IntArrayRef size,
                         c10::IntArrayRef stride) {
  return at::native::_reshape_alias(self, size, stride);
}

const at::Tensor& resize_(const at::Tensor& self, c10::IntArrayRef size,
                          std::optional<at::MemoryFormat> memory_format) {
  auto* impl = self.unsafeGetTensorImpl();
  if (impl->sizes() != size) {
    std::size_t needed = at::detail::computeStorageNbytesContiguous(
        size, self.dtype().itemsize(), self.storage_offset());
    std::size_t old_nbytes = self.storage().nbytes();
    if (needed > old_nbytes) {
      resizeStorageBytes(self.storage().unsafeGetStorageImpl(), needed);
      if (C10_UNLIKELY(fillUninitializedMemory())) {
        fillGrownStorage(self.storage(), self.dtype(), old_nbytes);
      }
    }
    impl->set_sizes_contiguous(size);
  }
  if (memory_format) {
    TORCH_CHECK(*memory_format != at::MemoryFormat::Preserve,
                "Unsupported memory format Preserve");
    impl->empty_tensor_restride(*memory_format);
  }
  return self;
}

at::Tensor& set_source_storage(at::Tensor& self, at::Storage source) {
  return at::native::set_(self, std::move(source));
}

at::Tensor& set_source_storage_offset(at::Tensor& self, at::Storage source,
                                      int64_t offset, c10::IntArrayRef size,
                                      c10::IntArrayRef stride) {
  return at::native::set_storage_cpu_(self, std::move(source), offset, size, stride);
}

at::Tensor& set_source_tensor(at::Tensor& self, const at::Tensor& source) {
  return at::native::set_tensor_(self, source);
}

at::Tensor& set_empty(at::Tensor& self) {
  c10::DeviceGuard guard(self.device());
  c10::Storage storage(c10::Storage::use_byte_size_t(), 0, &deviceAllocator(),
                       /*resizable=*/true);
  return at::native::set_storage_cpu_(self, std::move(storage), 0, {0}, {});
}

// A non_blocking copy between pinned host memory and the device, queued on
// the device's current stream (docs/streams.md). Only plain byte copies
// (same dtype, geometry and conj/neg bits, dense) are queued; false means
// "copy synchronously", which is also what CUDA does for pageable memory.
bool queueCopy(const at::Tensor& src, const at::Tensor& dst) {
  bool h2d = src.is_cpu() && dst.device().type() == kDev;
  bool d2h = src.device().type() == kDev && dst.is_cpu();
  if (!h2d && !d2h) return false;
  const at::Tensor& host = h2d ? src : dst;
  const at::Tensor& dev = h2d ? dst : src;
  if (!isPinnedPtr(host.storage().data())) return false;
  if (src.dtype() != dst.dtype() || src.sizes() != dst.sizes() ||
      src.strides() != dst.strides() || !src.is_non_overlapping_and_dense() ||
      src.is_conj() != dst.is_conj() || src.is_neg() != dst.is_neg()) {
    return false;
  }
  std::size_t n = static_cast<std::size_t>(src.numel()) * src.itemsize();
  if (n == 0) return true;
  int device = dev.device().index();
  std::int64_t stream = runtime::currentStreamId(device);
  // The pinned block may not be reused before the stream has done the copy.
  recordHostUse(host.storage().data(), device, stream);
  const void* from = src.const_data_ptr();
  void* to = dst.data_ptr();
  runtime::enqueue(device, stream, [to, from, n] { std::memcpy(to, from, n); });
  return true;
}

at::Tensor copy_from(const at::Tensor& self, const at::Tensor& dst,
                     bool non_blocking) {
  // MPS converts a device tensor's dtype on the device (a CPU source is
  // converted on the CPU before the upload): float64 and complex128 there
  // are refused in mps fidelity mode.
  if (C10_UNLIKELY(self.scalar_type() != dst.scalar_type()) && self.device().type() == kDev &&
      fidelity::on()) {
    fidelity::checkConversion(self.scalar_type(), dst.scalar_type(),
                              dst.device().type() == kDev);
  }
  if (non_blocking && queueCopy(self, dst)) return dst;
  at::Tensor src_h = self.device().type() == kDev ? hostView(self) : self;
  at::Tensor dst_h;
  if (dst.device().type() != kDev) {
    dst_h = dst;
  } else if (self.device().type() == kDev && self.storage().is_alias_of(dst.storage())) {
    dst_h = hostViewSharing(dst, src_h);  // CPU's overlap checks see the aliasing
  } else {
    dst_h = hostView(dst);
  }
  if (C10_UNLIKELY(src_h.is_neg() || dst_h.is_neg()) && src_h.scalar_type() != dst_h.scalar_type()) {
    // CPU's float32<->float16 conversion copy of a dense tensor ignores the
    // negative bit (torch 2.13: a `_neg_view` copied into a half tensor keeps
    // its sign). Convert a resolved copy, then copy within one dtype.
    src_h = src_h.resolve_neg().to(dst_h.scalar_type());
  }
  at::native::copy_(dst_h, src_h, false);
  return dst;
}

at::Tensor copy_from_and_resize(const at::Tensor& self, const at::Tensor& dst) {
  TORCH_CHECK(dst.device().type() == kDev || dst.is_cpu(),
              "_copy_from_and_resize: unsupported destination ", dst.device());
  if (dst.sizes() != self.sizes()) {
    dst.resize_(self.sizes());
  }
  return copy_from(self, dst, false);
}

at::Scalar local_scalar_dense(const at::Tensor& self) {
  return at::native::_local_scalar_dense_cpu(hostView(self));
}

// Whether `self.data = from` (and so Module.to/_apply keeping the same
// Parameter objects) is allowed. c10's TensorImpl rule lists the dense
// in-tree backends (CPU, CUDA, MPS, ...) but not PrivateUse1, so without this
// kernel CPU -> mps_ext conversion is "incompatible": Module._apply builds a
// new Parameter per module, which unties shared (tied) weights, and
// `cpu_param.data = mps_ext_tensor` raises. TensorImpl.h asks backends to
// override this operator. Dense strided tensors of CPU and mps_ext are
// interchangeable here, exactly as CPU and CUDA ones are.
bool has_compatible_shallow_copy_type(const at::Tensor& self, const at::Tensor& from) {
  auto dense = [](const at::Tensor& t) {
    return t.layout() == at::kStrided && !t.is_quantized() && !t.is_nested() &&
           (t.is_cpu() || t.device().type() == kDev);
  };
  if (dense(self) && dense(from)) return true;
  return self.unsafeGetTensorImpl()->has_compatible_shallow_copy_type(from.key_set());
}

} // namespace

at::Tensor emptyOnDevice(c10::IntArrayRef sizes, std::optional<c10::IntArrayRef> strides,
                         at::ScalarType dtype, int device,
                         std::optional<at::MemoryFormat> memory_format) {
  std::optional<c10::DeviceGuard> guard;
  if (runtime::currentDevice() != device) {
    guard.emplace(at::Device(kDev, static_cast<c10::DeviceIndex>(device)));
  }
  constexpr c10::DispatchKeySet ks(c10::DispatchKey::PrivateUse1);
  return strides ? at::detail::empty_strided_generic(sizes, *strides, &deviceAllocator(), ks,
                                                     dtype)
                 : at::detail::empty_generic(sizes, &deviceAllocator(), ks, dtype,
                                             memory_format);
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", TORCH_FN(empty_memory_format));
  m.impl("empty_strided", TORCH_FN(empty_strided));
  m.impl("as_strided", TORCH_FN(as_strided));
  m.impl("view", TORCH_FN(view));
  m.impl("_reshape_alias", TORCH_FN(reshape_alias));
  m.impl("resize_", TORCH_FN(resize_));
  m.impl("set_.source_Storage", TORCH_FN(set_source_storage));
  m.impl("set_.source_Storage_storage_offset", TORCH_FN(set_source_storage_offset));
  m.impl("set_.source_Tensor", TORCH_FN(set_source_tensor));
  m.impl("set_", TORCH_FN(set_empty));
  m.impl("_copy_from", TORCH_FN(copy_from));
  m.impl("_copy_from_and_resize", TORCH_FN(copy_from_and_resize));
  m.impl("_local_scalar_dense", TORCH_FN(local_scalar_dense));
  m.impl("_has_compatible_shallow_copy_type", TORCH_FN(has_compatible_shallow_copy_type));
}

} // namespace torch_mps_ext
