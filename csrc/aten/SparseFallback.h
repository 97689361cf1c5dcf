// Layer 3: sparse tensors (COO, and the compressed layouts CSR/CSC/BSR/BSC)
// on mps_ext, through the boxed fallback (Fallback.cpp).
//
// A sparse mps_ext tensor is torch's own SparseTensorImpl (or
// SparseCsrTensorImpl) whose indices and values are dense mps_ext tensors.
// For a CPU kernel, each sparse argument becomes a sparse CPU tensor over the
// host views of its members (hostSparse); a sparse CPU result becomes a
// sparse mps_ext tensor whose members are the results adopted as the dense
// fallback adopts them (deviceSparse); what an in-place kernel did to a
// sparse argument (new members, new shape, the coalesced flag) is applied to
// the caller's tensor (writeBackSparse).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/FunctionRef.h>

#include <string>

namespace torch_mps_ext::sparse {

// Sparse COO or one of the compressed layouts.
inline bool isSparse(const at::Tensor& t) {
  return t.defined() && t.layout() != c10::kStrided && t.layout() != c10::kJagged &&
         t.layout() != c10::kMkldnn && !t.is_nested();
}

using Map = c10::function_ref<at::Tensor(const at::Tensor&)>;

// The dense members of a sparse tensor, in order: COO indices, values;
// compressed: compressed indices, plain indices, values.
void forEachMember(const at::Tensor& t, c10::function_ref<void(const at::Tensor&)> f);

// A sparse CPU tensor with t's layout, shape and flags over toHost(member).
at::Tensor hostSparse(const at::Tensor& t, Map toHost);

// A sparse tensor on mps_ext `device` with the CPU tensor cpu's layout,
// shape and flags over toDevice(member).
at::Tensor deviceSparse(const at::Tensor& cpu, int device, Map toDevice);

// Applies to the device tensor `dev` what a kernel did to its sparse host
// argument `host` (members replaced, shape, coalesced flag); toDevice maps
// the host's members (host views of dev's members map back to them).
void writeBackSparse(const at::Tensor& dev, const at::Tensor& host, Map toDevice);

// For an operator without an mps_ext kernel of its own: registers the
// fallback on SparsePrivateUse1 / SparseCsrPrivateUse1 when CPU has a
// SparseCPU / SparseCsrCPU kernel for it (so that it outranks a composite
// kernel of the operator, as nested tensors do). `name` is the schema name
// without "aten::" (with ".overload").
void registerSparseFallbackFor(const c10::OperatorHandle& op, const std::string& name);

} // namespace torch_mps_ext::sparse
