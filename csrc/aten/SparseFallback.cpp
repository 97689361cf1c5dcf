// Layer 3: sparse tensors on mps_ext (SparseFallback.h).
//
// The members of a sparse mps_ext tensor are dense mps_ext tensors, so the
// dense fallback's machinery does the rest: it turns the members into host
// views (aliasing members share one CPU storage, as on CPU), runs CPU's
// SparseCPU/SparseCsrCPU kernel, and adopts what the kernel allocated. The
// metadata operators (members, dims, nnz, the coalesced flag) and the
// constructor from indices and values are torch's own kernels, which work on
// any device: they run here directly.
#include "aten/SparseFallback.h"

#include "aten/Fallback.h"

#include <ATen/SparseCsrTensorImpl.h>
#include <ATen/SparseTensorImpl.h>
#include <ATen/ops/_coalesced_native.h>
#include <ATen/ops/_indices_native.h>
#include <ATen/ops/_nnz_native.h>
#include <ATen/ops/_sparse_coo_tensor_with_dims_and_tensors_native.h>
#include <ATen/ops/_values_native.h>
#include <ATen/ops/ccol_indices_native.h>
#include <ATen/ops/col_indices_native.h>
#include <ATen/ops/crow_indices_native.h>
#include <ATen/ops/dense_dim_native.h>
#include <ATen/ops/indices_native.h>
#include <ATen/ops/is_coalesced_native.h>
#include <ATen/ops/row_indices_native.h>
#include <ATen/ops/sparse_dim_native.h>
#include <ATen/ops/values_native.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

namespace torch_mps_ext::sparse {
namespace {

constexpr auto kDev = c10::DeviceType::PrivateUse1;

bool isCoo(const at::Tensor& t) {
  return t.layout() == c10::kSparse;
}

at::SparseTensorImpl* cooImpl(const at::Tensor& t) {
  return static_cast<at::SparseTensorImpl*>(t.unsafeGetTensorImpl());
}

at::SparseCsrTensorImpl* compressedImpl(const at::Tensor& t) {
  return static_cast<at::SparseCsrTensorImpl*>(t.unsafeGetTensorImpl());
}

// An empty sparse tensor of `like`'s layout and dtype for `key` on `device`
// (its members are then set; the placeholder members it starts with are
// allocated on `device`, hence the guard).
at::Tensor emptyOf(const at::Tensor& like, c10::DispatchKey key, c10::Device device) {
  if (isCoo(like)) {
    c10::OptionalDeviceGuard guard;
    if (device.type() == kDev) guard.reset_device(device);
    return at::Tensor(c10::make_intrusive<at::SparseTensorImpl>(c10::DispatchKeySet(key),
                                                                like.dtype()));
  }
  return at::Tensor(c10::make_intrusive<at::SparseCsrTensorImpl>(
      c10::DispatchKeySet(key), device, like.layout(), like.dtype()));
}

// `to` takes from's shape and flags over the given members.
void setMembers(const at::Tensor& to, const at::Tensor& from, const at::Tensor* members) {
  if (isCoo(from)) {
    at::SparseTensorImpl* t = cooImpl(to);
    t->raw_resize_(from.sparse_dim(), from.dense_dim(), from.sizes());
    t->set_indices_and_values_unsafe(members[0], members[1]);
    t->set_coalesced(cooImpl(from)->coalesced());
  } else {
    compressedImpl(to)->set_member_tensors(members[0], members[1], members[2], from.sizes());
  }
}

at::Tensor withMembers(const at::Tensor& like, c10::DispatchKey key, c10::Device device,
                       Map map) {
  at::Tensor members[3];
  int n = 0;
  forEachMember(like, [&](const at::Tensor& m) { members[n++] = map(m); });
  at::Tensor out = emptyOf(like, key, device);
  setMembers(out, like, members);
  return out;
}

c10::DispatchKey keyFor(const at::Tensor& t, bool device) {
  if (isCoo(t)) return device ? c10::DispatchKey::SparsePrivateUse1 : c10::DispatchKey::SparseCPU;
  return device ? c10::DispatchKey::SparseCsrPrivateUse1 : c10::DispatchKey::SparseCsrCPU;
}

} // namespace

void forEachMember(const at::Tensor& t, c10::function_ref<void(const at::Tensor&)> f) {
  if (isCoo(t)) {
    f(cooImpl(t)->indices());
    f(cooImpl(t)->values());
  } else {
    f(compressedImpl(t)->compressed_indices());
    f(compressedImpl(t)->plain_indices());
    f(compressedImpl(t)->values());
  }
}

at::Tensor hostSparse(const at::Tensor& t, Map toHost) {
  return withMembers(t, keyFor(t, false), c10::Device(c10::kCPU), toHost);
}

at::Tensor deviceSparse(const at::Tensor& cpu, int device, Map toDevice) {
  return withMembers(cpu, keyFor(cpu, true),
                     c10::Device(kDev, static_cast<c10::DeviceIndex>(device)), toDevice);
}

void writeBackSparse(const at::Tensor& dev, const at::Tensor& host, Map toDevice) {
  TORCH_INTERNAL_ASSERT(dev.layout() == host.layout());
  at::Tensor members[3];
  int n = 0;
  bool changed = dev.sizes() != host.sizes() || dev.sparse_dim() != host.sparse_dim();
  forEachMember(host, [&](const at::Tensor& m) { members[n++] = toDevice(m); });
  n = 0;
  forEachMember(dev, [&](const at::Tensor& m) {
    changed = changed || !m.is_same(members[n]);
    ++n;
  });
  if (isCoo(host)) {
    changed = changed || cooImpl(dev)->coalesced() != cooImpl(host)->coalesced();
  }
  if (changed) setMembers(dev, host, members);
}

namespace {

// copy_ between sparse tensors of two devices copies across, as on CUDA: the
// source is first brought to the destination's device. True when done here
// (a host destination: CPU's kernel on CPU tensors).
bool crossDeviceCopy(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  static const c10::OperatorName copy{"aten::copy_", ""};
  if (op.operator_name() != copy) return false;
  const std::size_t n = stack->size();
  const at::Tensor self = (*stack)[n - 3].toTensor();
  const at::Tensor src = (*stack)[n - 2].toTensor();
  if (!isSparse(self) || !isSparse(src) || self.device() == src.device()) return false;
  (*stack)[n - 2] = src.to(self.device());
  if (self.device().type() == kDev) return false;
  op.redispatchBoxed(c10::DispatchKeySet(keyFor(self, false)), stack);
  return true;
}

void sparseFallback(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  if (crossDeviceCopy(op, stack)) return;
  runFallbackAt(op, stack, c10::DispatchKey::SparseCPU);
}

void sparseCompressedFallback(const c10::OperatorHandle& op, c10::DispatchKeySet,
                              torch::jit::Stack* stack) {
  if (crossDeviceCopy(op, stack)) return;
  runFallbackAt(op, stack, c10::DispatchKey::SparseCsrCPU);
}

} // namespace

void registerSparseFallbackFor(const c10::OperatorHandle& op, const std::string& name) {
  static torch::Library* coo = new torch::Library(
      torch::Library::IMPL, "aten", c10::DispatchKey::SparsePrivateUse1, __FILE__, __LINE__);
  static torch::Library* compressed = new torch::Library(
      torch::Library::IMPL, "aten", c10::DispatchKey::SparseCsrPrivateUse1, __FILE__, __LINE__);
  if (op.hasKernelForDispatchKey(c10::DispatchKey::SparseCPU) &&
      !op.hasKernelForDispatchKey(c10::DispatchKey::SparsePrivateUse1)) {
    coo->impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&sparseFallback>());
  }
  if (op.hasKernelForDispatchKey(c10::DispatchKey::SparseCsrCPU) &&
      !op.hasKernelForDispatchKey(c10::DispatchKey::SparseCsrPrivateUse1)) {
    compressed->impl(name.c_str(),
                     torch::CppFunction::makeFromBoxedFunction<&sparseCompressedFallback>());
  }
}

namespace {

// The backend fallbacks: an operator without a kernel of CPU's for the
// layout is refused as CPU refuses it, naming this backend's key.
void checkCpuHas(const c10::OperatorHandle& op, c10::DispatchKey cpu_key, const char* functionality) {
  TORCH_CHECK_NOT_IMPLEMENTED(op.hasKernelForDispatchKey(cpu_key), "Could not run '",
                              op.schema().name(), "' with arguments from the '", functionality,
                              c10::get_privateuse1_backend(),
                              "' backend: CPU has no kernel for this layout either (mps_ext "
                              "runs CPU's sparse kernels)");
}

void sparseBackendFallback(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                           torch::jit::Stack* stack) {
  checkCpuHas(op, c10::DispatchKey::SparseCPU, "Sparse");
  sparseFallback(op, ks, stack);
}

void sparseCompressedBackendFallback(const c10::OperatorHandle& op, c10::DispatchKeySet ks,
                                     torch::jit::Stack* stack) {
  checkCpuHas(op, c10::DispatchKey::SparseCsrCPU, "SparseCsr");
  sparseCompressedFallback(op, ks, stack);
}

} // namespace

TORCH_LIBRARY_IMPL(_, SparsePrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&sparseBackendFallback>());
}

TORCH_LIBRARY_IMPL(_, SparseCsrPrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&sparseCompressedBackendFallback>());
}

namespace {

// torch's constructor, on the device of the members (the placeholder members
// it starts from are made on the current device), as a CUDA kernel runs
// under its device guard.
at::Tensor newCoo(int64_t sparse_dim, int64_t dense_dim, c10::SymIntArrayRef size,
                  const at::Tensor& indices, const at::Tensor& values,
                  std::optional<at::ScalarType> dtype, std::optional<at::Layout> layout,
                  std::optional<at::Device> device, std::optional<bool> pin_memory,
                  std::optional<bool> is_coalesced) {
  c10::OptionalDeviceGuard guard;
  if (values.defined() && values.device().type() == kDev) guard.reset_device(values.device());
  return at::native::new_with_dims_and_tensor_sparse_symint(
      sparse_dim, dense_dim, size, indices, values, dtype, layout, device, pin_memory,
      is_coalesced);
}

} // namespace

// Metadata and construction: torch's device-generic kernels, no host views.
// Registered on the sparse keys only: sparse operators are outside MPS
// fidelity mode (docs/fidelity.md), whose operator table is the dense one.
TORCH_LIBRARY_IMPL(aten, SparsePrivateUse1, m) {
  m.impl("_sparse_coo_tensor_with_dims_and_tensors", TORCH_FN(newCoo));
  m.impl("_indices", TORCH_FN(at::native::_indices_sparse));
  m.impl("_values", TORCH_FN(at::native::_values_sparse));
  m.impl("indices", TORCH_FN(at::native::indices_sparse));
  m.impl("values", TORCH_FN(at::native::values_sparse));
  m.impl("sparse_dim", TORCH_FN(at::native::sparse_dim_sparse));
  m.impl("dense_dim", TORCH_FN(at::native::dense_dim_sparse));
  m.impl("_nnz", TORCH_FN(at::native::_nnz_sparse));
  m.impl("is_coalesced", TORCH_FN(at::native::is_coalesced_sparse));
  m.impl("_coalesced_", TORCH_FN(at::native::_coalesced_sparse_));
}

TORCH_LIBRARY_IMPL(aten, SparseCsrPrivateUse1, m) {
  m.impl("crow_indices", TORCH_FN(at::native::crow_indices_sparse_csr));
  m.impl("col_indices", TORCH_FN(at::native::col_indices_sparse_csr));
  m.impl("ccol_indices", TORCH_FN(at::native::ccol_indices_sparse_csr));
  m.impl("row_indices", TORCH_FN(at::native::row_indices_sparse_csr));
  m.impl("values", TORCH_FN(at::native::values_sparse_csr));
  m.impl("sparse_dim", TORCH_FN(at::native::sparse_dim_sparse_csr));
  m.impl("dense_dim", TORCH_FN(at::native::dense_dim_sparse_csr));
  m.impl("_nnz", TORCH_FN(at::native::_nnz_sparse_csr));
}

} // namespace torch_mps_ext::sparse
