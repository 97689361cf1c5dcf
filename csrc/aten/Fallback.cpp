// Layer 3: the zero-copy boxed fallback for every operator without a native
// mps_ext kernel.
//
// 1. Check that the tensors agree on a device (CPU 0-dim tensors are scalars;
//    CPU index tensors inside `Tensor?[]` lists are allowed, as on CUDA).
// 2. Replace each device tensor by a host view of the same memory, and a
//    `device=mps_ext` argument by `device=cpu`.
// 3. Run the CPU kernel inside a LendScope, so what it allocates comes from
//    the device pool.
// 4. Write back what the kernel did to the arguments (resize, restride), and
//    turn the results into device tensors: the original argument for
//    in-place/out= results, a device view for views of an argument, the
//    adopted lent memory for new outputs (a copy only for memory the kernel
//    did not get from the pool).
#include "aten/Fallback.h"
#include "aten/Fidelity.h"
#include "aten/HostView.h"
#include "aten/SparseFallback.h"
#include "core/Allocator.h"
#include "runtime/Device.h"
#include "runtime/Stream.h"

#include <ATen/NestedTensorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/op_registration/op_registration.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <sstream>
#include <string_view>
#include <vector>

namespace torch_mps_ext {
namespace {

constexpr auto kDev = c10::DeviceType::PrivateUse1;

struct Aliased {
  at::Tensor device;  // the caller's device tensor
  at::Tensor host;    // its host view, handed to the CPU kernel
  c10::StorageImpl* host_storage;
};

struct Context {
  const c10::OperatorHandle& op;
  std::optional<at::Device> device;  // the op's device, once known
  c10::SmallVector<Aliased, 4> aliased;
  // Sparse arguments (device tensor, its sparse host tensor): their members
  // are in `aliased` (SparseFallback.h).
  c10::SmallVector<std::pair<at::Tensor, at::Tensor>, 2> sparse;
  bool any_nested = false;  // a nested tensor among the arguments

  [[noreturn]] void mismatch(const std::string& what, at::Device other) const {
    TORCH_CHECK(false,
                "Expected all tensors to be on the same device, but found at "
                "least two devices, ", *device, " and ", other, "! (", what,
                " of ", op.schema().name(), ")");
  }

  void noteDevice(at::Device d, const std::string& what) {
    if (!device) {
      device = d;
    } else if (*device != d) {
      mismatch(what, d);
    }
  }

  at::Tensor toHost(const at::Tensor& t) {
    for (auto& a : aliased) {
      if (a.device.unsafeGetTensorImpl() == t.unsafeGetTensorImpl()) return a.host;
    }
    if (sparse::isSparse(t)) return toHostSparse(t);
    if (t.is_nested()) {
      at::Tensor h = hostNestedView(t);
      aliased.push_back({t, h, h.storage().unsafeGetStorageImpl()});
      any_nested = true;
      return h;
    }
    // Device tensors over one storage get host views over one CPU storage.
    c10::StorageImpl* dev_storage = t.storage().unsafeGetStorageImpl();
    at::Tensor h;
    for (auto& a : aliased) {
      if (a.device.storage().unsafeGetStorageImpl() == dev_storage) {
        h = hostViewSharing(t, a.host);
        break;
      }
    }
    if (!h.defined()) h = hostView(t);
    aliased.push_back({t, h, h.storage().unsafeGetStorageImpl()});
    return h;
  }

  at::Tensor toHostSparse(const at::Tensor& t) {
    for (auto& [d, h] : sparse) {
      if (d.is_same(t)) return h;
    }
    at::Tensor h = sparse::hostSparse(t, [this](const at::Tensor& m) { return toHost(m); });
    sparse.emplace_back(t, h);
    return h;
  }
};

bool isScalarLike(const at::Tensor& t) {
  return t.dim() == 0;
}

// First pass: find the op's device and check every tensor against it.
void scanDevices(Context& ctx, const c10::FunctionSchema& schema,
                 torch::jit::Stack& stack, std::size_t begin) {
  std::optional<std::pair<std::string, at::Device>> host_tensor;
  std::optional<at::Device> host_out;
  std::optional<at::Device> index_device;  // device of index-list tensors only
  for (std::size_t i = 0; i < schema.arguments().size(); ++i) {
    const c10::IValue& v = stack[begin + i];
    const c10::Argument& arg = schema.arguments()[i];
    const std::string& name = arg.name();
    // A written argument (self of an in-place op, out=) on the host is never
    // a scalar: the kernel would resize or rebind the user's tensor.
    bool written = arg.alias_info() && arg.alias_info()->isWrite();
    auto visit = [&](const at::Tensor& t, bool index_list) {
      if (!t.defined()) return;
      if (t.device().type() == kDev && index_list && !ctx.device) {
        if (!index_device) index_device = t.device();
      } else if (t.device().type() == kDev) {
        ctx.noteDevice(t.device(), "argument " + name);
      } else if (arg.is_out()) {
        if (!host_out) host_out = t.device();
      } else if (!written && t.scalar_type() == at::kLong && !t.is_nested() &&
                 schema.name().rfind("aten::_nested_", 0) == 0) {
        // Nested tensors' metadata (sizes, strides, offsets) are CPU int64
        // tensors on every device: the _nested_* operators take them so
        // (autograd's backward of nested ops passes them), as CUDA's do.
      } else if (!index_list && (written || !isScalarLike(t)) && !host_tensor) {
        host_tensor.emplace(name, t.device());
      }
    };
    if (v.isTensor()) {
      visit(v.toTensor(), false);
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) visit(t, false);
    } else if (v.isList()) {
      for (const c10::IValue& e : v.toListRef()) {
        if (e.isTensor()) visit(e.toTensor(), true);
      }
    } else if (v.isDevice() && v.toDevice().type() == kDev) {
      at::Device d = v.toDevice();
      if (!d.has_index()) {
        d = at::Device(kDev, static_cast<c10::DeviceIndex>(runtime::currentDevice()));
      }
      ctx.noteDevice(d, "argument " + name);
    }
  }
  if (index_device) {
    // Device indices into a host tensor: aten's own refusal (only CPU
    // indices or indices on the indexed tensor's device are allowed), a
    // RuntimeError as aten raises it (TORCH_CHECK, not TORCH_CHECK_INDEX).
    TORCH_CHECK(ctx.device || !host_tensor, "indices should be either on ", c10::kCPU,
                      " or on the same device as the indexed tensor (", host_tensor->second,
                      ")");
    if (!ctx.device) {
      ctx.device = index_device;
    } else if (*ctx.device != *index_device) {
      ctx.mismatch("an index", *index_device);
    }
  }
  // Checked before anything runs: the user's tensors are left as they were.
  if (host_out && ctx.device) {
    TORCH_CHECK(false, "Expected out tensor to have device ", *ctx.device, ", but got ",
                *host_out, " instead");
  }
  if (host_tensor && ctx.device) {
    ctx.mismatch("argument " + host_tensor->first, host_tensor->second);
  }
}

// Second pass: device tensors -> host views, device arguments -> cpu.
void toHostArgs(Context& ctx, const c10::FunctionSchema& schema,
                torch::jit::Stack& stack, std::size_t begin) {
  for (std::size_t i = 0; i < schema.arguments().size(); ++i) {
    c10::IValue& v = stack[begin + i];
    if (v.isTensor()) {
      const at::Tensor& t = v.toTensor();
      if (t.defined() && t.device().type() == kDev) v = ctx.toHost(t);
    } else if (v.isTensorList()) {
      auto list = v.toTensorList();
      bool any = false;
      for (const at::Tensor& t : list) any |= t.defined() && t.device().type() == kDev;
      if (!any) continue;
      c10::List<at::Tensor> out;
      out.reserve(list.size());
      for (const at::Tensor& t : list) {
        out.push_back(t.defined() && t.device().type() == kDev ? ctx.toHost(t) : t);
      }
      v = std::move(out);
    } else if (v.isList()) {
      auto list = v.toList();
      bool any = false;
      for (const c10::IValue& e : list) {
        any |= e.isTensor() && e.toTensor().defined() &&
               e.toTensor().device().type() == kDev;
      }
      if (!any) continue;
      auto out = list.copy();
      for (std::size_t j = 0; j < out.size(); ++j) {
        c10::IValue e = out.get(j);
        if (e.isTensor() && e.toTensor().defined() &&
            e.toTensor().device().type() == kDev) {
          out.set(j, ctx.toHost(e.toTensor()));
        }
      }
      v = std::move(out);
    } else if (v.isDevice() && v.toDevice().type() == kDev) {
      v = at::Device(c10::kCPU);
    }
  }
}

// What the kernel did to an argument (resize, restride, new storage) is
// applied to the caller's device tensor.
void writeBack(Context& ctx, int device) {
  // Host storages whose grown memory has moved into their device storage
  // (arguments sharing a storage share its growth).
  c10::SmallVector<c10::StorageImpl*, 2> grown;
  for (auto& a : ctx.aliased) {
    if (a.device.is_nested()) continue;  // nested kernels leave their arguments' shape as is
    c10::TensorImpl* h = a.host.unsafeGetTensorImpl();
    c10::TensorImpl* d = a.device.unsafeGetTensorImpl();
    c10::StorageImpl* hs = h->storage().unsafeGetStorageImpl();
    c10::StorageImpl* ds = d->storage().unsafeGetStorageImpl();
    bool already = std::find(grown.begin(), grown.end(), hs) != grown.end();
    if (!already && (hs != a.host_storage || hs->data() != ds->data())) {
      if (hs == a.host_storage && isPoolMemory(hs->data_ptr())) {
        // The kernel grew the argument (resize_): its new memory was lent
        // from the pool. The device storage takes it in place, as CPU's
        // resize does, so every tensor over that storage sees it.
        std::size_t nbytes = hs->nbytes();
        c10::DataPtr dp = hs->set_data_ptr(c10::DataPtr(nullptr, c10::Device(c10::kCPU)));
        hs->set_nbytes(0);
        dp.unsafe_set_device(
            c10::Device(kDev, static_cast<c10::DeviceIndex>(device)));
        ds->set_data_ptr_noswap(std::move(dp));
        ds->set_nbytes(nbytes);
        grown.push_back(hs);
      } else {
        // The kernel pointed the argument at other memory (set_): adopt it
        // like a result and share the storage.
        at::Tensor adopted;
        for (auto& other : ctx.aliased) {
          if (other.host_storage == hs) adopted = other.device;
        }
        if (!adopted.defined()) {
          adopted = isPoolMemory(hs->data_ptr())
              ? deviceTensor(adoptLentStorage(hs, device), a.host)
              : copyToDevice(a.host, device);
        }
        d->set_storage_keep_dtype(adopted.storage());
      }
    }
    if (h->sizes() != d->sizes() || h->strides() != d->strides() ||
        h->storage_offset() != d->storage_offset()) {
      d->set_sizes_and_strides(h->sizes(), h->strides(), h->storage_offset());
    }
    // Math bits too: e.g. linalg_lu_solve(left=False, out=) leaves `out` as
    // a conjugate view of what it computed.
    if (h->is_conj() != d->is_conj()) d->_set_conj(h->is_conj());
    if (h->is_neg() != d->is_neg()) d->_set_neg(h->is_neg());
  }
}

struct Adopter {
  Context& ctx;
  int device;
  // New storages already adopted in this call, so results that share a
  // storage keep sharing it.
  c10::SmallVector<std::pair<c10::StorageImpl*, c10::Storage>, 2> adopted;
  std::size_t pending_refs = 0;

  at::Tensor operator()(const at::Tensor& r, torch::jit::Stack& stack,
                        std::size_t ret_begin) {
    if (!r.defined()) return r;
    if (r.device().type() == kDev) return r;
    for (auto& a : ctx.aliased) {
      if (a.host.unsafeGetTensorImpl() == r.unsafeGetTensorImpl()) return a.device;
    }
    if (ctx.any_nested && isNestedMetadata(r)) return r;
    if (sparse::isSparse(r)) return sparseResult(r, stack, ret_begin);
    if (r.is_nested()) return nested(r);
    TORCH_CHECK(r.layout() == c10::kStrided, ctx.op.schema().name(),
                " returned a ", r.layout(),
                " tensor; mps_ext supports strided tensors only");
    c10::StorageImpl* s = r.storage().unsafeGetStorageImpl();
    for (auto& a : ctx.aliased) {
      if (a.host_storage == s) return deviceTensor(a.device.storage(), r);
    }
    for (auto& [impl, storage] : adopted) {
      if (impl == s) return deviceTensor(storage, r);
    }
    if (isPoolMemory(s->data_ptr()) &&
        c10::raw::intrusive_ptr::use_count(s) <= countRefs(s, stack, ret_begin)) {
      c10::Storage storage = adoptLentStorage(s, device);
      adopted.emplace_back(s, storage);
      return deviceTensor(storage, r);
    }
    return copyToDevice(r, device);
  }

  // A nested tensor's metadata (sizes, strides, offsets) are CPU tensors on
  // every device, shared by the device tensor and its host view: returned
  // as they are (_nested_tensor_size, which autograd saves for backward), as
  // on CUDA. Adopting their memory would leave the nested argument's
  // metadata without data.
  bool isNestedMetadata(const at::Tensor& r) const {
    if (!r.has_storage()) return false;
    const c10::StorageImpl* s = r.storage().unsafeGetStorageImpl();
    auto same = [s](const at::Tensor& m) {
      return m.defined() && m.storage().unsafeGetStorageImpl() == s;
    };
    for (auto& a : ctx.aliased) {
      if (!a.host.is_nested()) continue;
      const at::native::NestedTensorImpl* nt = at::native::get_nested_tensor_impl(a.host);
      if (same(nt->get_nested_sizes()) || same(nt->get_nested_strides()) ||
          same(nt->get_storage_offsets())) {
        return true;
      }
    }
    return false;
  }

  // A nested CPU result as a nested device tensor: its buffer adopted when
  // it is lent memory nothing else holds, else copied.
  at::Tensor nested(const at::Tensor& r) {
    c10::StorageImpl* s = r.storage().unsafeGetStorageImpl();
    for (auto& a : ctx.aliased) {
      if (a.host_storage == s) return deviceNested(a.device.storage(), r);
    }
    c10::Storage storage;
    if (isPoolMemory(s->data_ptr()) && c10::raw::intrusive_ptr::use_count(s) == 1) {
      storage = adoptLentStorage(s, device);
    } else {
      c10::DeviceGuard guard(c10::Device(kDev, static_cast<c10::DeviceIndex>(device)));
      storage = c10::Storage(c10::Storage::use_byte_size_t(), s->nbytes(), &deviceAllocator(),
                             /*resizable=*/true);
      if (s->nbytes()) std::memcpy(storage.mutable_data(), s->data(), s->nbytes());
    }
    return deviceNested(std::move(storage), r);
  }

  // A sparse CPU result: the sparse argument it is (in-place, out=), or a
  // sparse device tensor over its members, adopted as results are.
  at::Tensor sparseResult(const at::Tensor& r, torch::jit::Stack& stack, std::size_t ret_begin) {
    for (auto& [d, h] : ctx.sparse) {
      if (h.is_same(r)) return d;
    }
    return sparse::deviceSparse(
        r, device, [&](const at::Tensor& m) { return (*this)(m, stack, ret_begin); });
  }

  // References to storage `s` held by the results on the stack (and by the
  // members of sparse results and of sparse arguments' host tensors): the
  // distinct tensors over it.
  std::size_t countRefs(c10::StorageImpl* s, torch::jit::Stack& stack, std::size_t begin) {
    c10::SmallVector<c10::TensorImpl*, 4> seen;
    auto count = [&](const at::Tensor& t) {
      if (t.defined() && t.has_storage() && t.storage().unsafeGetStorageImpl() == s &&
          std::find(seen.begin(), seen.end(), t.unsafeGetTensorImpl()) == seen.end()) {
        seen.push_back(t.unsafeGetTensorImpl());
      }
    };
    auto visit = [&](const at::Tensor& t) {
      if (sparse::isSparse(t)) {
        sparse::forEachMember(t, count);
      } else {
        count(t);
      }
    };
    for (std::size_t i = begin; i < stack.size(); ++i) {
      const c10::IValue& v = stack[i];
      if (v.isTensor()) {
        visit(v.toTensor());
      } else if (v.isTensorList()) {
        for (const at::Tensor& t : v.toTensorList()) visit(t);
      }
    }
    for (auto& [d, h] : ctx.sparse) visit(h);
    return seen.size();
  }
};

// Hooks that ATen calls only for out-of-tree backends ("*_overrideable"):
// CPU has no kernel for them (they raise "not implemented"), so the fallback
// runs what ATen runs on CPU instead, on the same host views. The
// replacement takes the hook's arguments, adapted in place on the stack.
struct Redirect {
  c10::OperatorHandle target;
  void (*adapt)(torch::jit::Stack& stack, std::size_t begin);
};

// convolution_backward takes bias_sizes (argument 3) where the hook has none.
void addBiasSizes(torch::jit::Stack& stack, std::size_t begin) {
  const at::Tensor& weight = stack[begin + 2].toTensor();
  bool transposed = stack[begin + 6].toBool();
  int64_t groups = stack[begin + 8].toInt();
  int64_t channels = transposed ? weight.size(1) * groups : weight.size(0);
  stack.insert(stack.begin() + static_cast<std::ptrdiff_t>(begin) + 3,
               c10::IValue(std::vector<int64_t>{channels}));
}

const Redirect* redirectFor(const c10::OperatorHandle& op) {
  static const auto table = [] {
    auto& d = c10::Dispatcher::singleton();
    std::vector<std::pair<c10::OperatorName, Redirect>> t;
    t.push_back({{"aten::convolution_overrideable", ""},
                 {d.findSchemaOrThrow("aten::convolution", ""), nullptr}});
    t.push_back({{"aten::convolution_backward_overrideable", ""},
                 {d.findSchemaOrThrow("aten::convolution_backward", ""), &addBiasSizes}});
    return t;
  }();
  const c10::OperatorName& name = op.operator_name();
  for (const auto& [n, r] : table) {
    if (n == name) return &r;
  }
  return nullptr;
}

// MPS fidelity mode (Fidelity.h): the operator's verdict first, as MPS's
// boxed fallback refuses before looking at arguments; then, for an operator
// MPS runs itself, what its kernel would refuse to compute on (view
// operators compute nothing: MPS makes them of any dtype).
void checkFidelity(const c10::OperatorHandle& op, const c10::FunctionSchema& schema,
                   const torch::jit::Stack& stack, std::size_t begin) {
  // Nested tensors reach mps_ext only through the inference fast paths of
  // nn.TransformerEncoder / MultiheadAttention, which torch takes for
  // PrivateUse1 devices and not for MPS: a Mac never runs these calls.
  // Sparse tensors are not modelled (docs/fidelity.md).
  for (std::size_t i = 0; i < schema.arguments().size(); ++i) {
    const c10::IValue& v = stack[begin + i];
    if (v.isTensor() && v.toTensor().defined() &&
        (v.toTensor().is_nested() || sparse::isSparse(v.toTensor()))) {
      return;
    }
  }
  fidelity::checkKernelArguments(op, stack, begin);
  if (fidelity::checkOperator(op) != fidelity::Verdict::Accept) return;
  for (std::size_t i = 0; i < schema.arguments().size(); ++i) {  // per-dtype refusals: `self`
    const c10::IValue& v = stack[begin + i];
    if (v.isTensor() && v.toTensor().defined()) {
      fidelity::checkSelfDtype(op, v.toTensor().scalar_type());
      break;
    }
  }
  fidelity::checkKernelShapes(op, stack, begin);
  auto wide = [](const at::Tensor& t) {
    return t.defined() && t.device().type() == kDev && fidelity::wideDtype(t.scalar_type());
  };
  for (std::size_t i = 0; i < schema.arguments().size(); ++i) {
    const c10::IValue& v = stack[begin + i];
    at::ScalarType found = at::kFloat;
    bool any = false;
    if (v.isTensor()) {
      if ((any = wide(v.toTensor()))) found = v.toTensor().scalar_type();
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) {
        if ((any = wide(t))) {
          found = t.scalar_type();
          break;
        }
      }
    }
    if (!any) continue;
    const auto& returns = schema.returns();
    bool view = !returns.empty() && std::all_of(returns.begin(), returns.end(), [](const auto& r) {
      return r.alias_info() && !r.alias_info()->isWrite();
    });
    if (!view) fidelity::checkOperandDtype(found, &op);
    return;
  }
}

// cpu_key: the CPU kernel to run when it is not the arguments' (SparseCPU for
// a sparse factory); else CPU's, NestedTensorCPU's or a sparse key's by the
// arguments.
// MPS fidelity mode: where CPU's kernel has no case for a dtype MPS computes
// (float16/bfloat16/complex32 special functions, integer histc, bool
// ceil/fmod/...), MPS computes in float32 and converts the result. The
// fallback does the same: arguments of the dtype CPU named are widened
// (float32, complex64 for complex32: MPS has no float64), the
// operator runs again on the device, written arguments get the converted
// values, and new results of the wide dtype are converted back.

// Set while runWidened reruns an operator MPS accepted in its own dtype: the
// rerun is not judged again (MPS may refuse float32 complex, say).
thread_local bool t_widened_rerun = false;

// The dtype in "... not implemented for 'Half'", if widening serves it.
std::optional<at::ScalarType> missingDtype(const char* what) {
  static const std::pair<const char*, at::ScalarType> kNames[] = {
      {"Half", at::kHalf},   {"BFloat16", at::kBFloat16}, {"ComplexHalf", at::kComplexHalf},
      {"Bool", at::kBool},   {"Byte", at::kByte},         {"Char", at::kChar},
      {"Short", at::kShort}, {"Int", at::kInt},           {"Long", at::kLong}};
  const std::string_view w(what);
  const std::string_view tag = "not implemented for '";
  const auto at = w.find(tag);
  if (at == std::string_view::npos) return std::nullopt;
  const std::string_view rest = w.substr(at + tag.size());
  const std::string_view name = rest.substr(0, rest.find('\''));
  for (const auto& [n, t] : kNames) {
    if (name == n) return t;
  }
  return std::nullopt;
}

at::ScalarType wideOf(at::ScalarType t) {
  return t == at::kComplexHalf ? at::kComplexFloat : at::kFloat;
}

bool isScalarTypeArg(const c10::Argument& arg) {
  c10::TypePtr t = arg.type();
  if (t->kind() == c10::TypeKind::OptionalType) {
    t = t->castRaw<c10::OptionalType>()->getElementType();
  }
  return t->kind() == c10::TypeKind::ScalarTypeType;
}

// v = f(v) for a tensor, each element for a tensor list; other values stay.
template <class F>
void mapTensors(c10::IValue& v, const F& f) {
  if (v.isTensor()) {
    v = f(v.toTensor());
  } else if (v.isTensorList()) {
    c10::List<at::Tensor> out;
    for (const at::Tensor& t : v.toTensorList()) out.push_back(f(t));
    v = std::move(out);
  }
}

void runWidened(const c10::OperatorHandle& op, torch::jit::Stack* stack,
                std::vector<c10::IValue> args, at::ScalarType low) {
  const c10::FunctionSchema& schema = op.schema();
  // half and complex32 travel together (polar: half in, complex32 out)
  const bool halves = low == at::kHalf || low == at::kComplexHalf;
  auto narrowed = [&](at::ScalarType t) {
    return t == low || (halves && (t == at::kHalf || t == at::kComplexHalf));
  };
  c10::SmallVector<std::pair<at::Tensor, at::Tensor>, 2> written;  // (argument, widened)
  for (std::size_t i = 0; i < args.size(); ++i) {
    const c10::Argument& arg = schema.arguments()[i];
    const bool writes = arg.alias_info() && arg.alias_info()->isWrite();
    auto widen = [&](const at::Tensor& t) -> at::Tensor {
      if (!t.defined() || t.device().type() != kDev || !narrowed(t.scalar_type())) return t;
      at::Tensor f = t.to(wideOf(t.scalar_type()));
      if (writes) written.emplace_back(t, f);
      return f;
    };
    c10::IValue& v = args[i];
    if (v.isInt() && isScalarTypeArg(arg) && narrowed(static_cast<at::ScalarType>(v.toInt()))) {
      v = static_cast<int64_t>(wideOf(static_cast<at::ScalarType>(v.toInt())));
    } else {
      mapTensors(v, widen);
    }
  }
  fidelity::adaptWidenedArguments(op, args);
  for (c10::IValue& v : args) stack->push_back(std::move(v));
  {
    struct Rerun {
      bool outer = t_widened_rerun;
      Rerun() { t_widened_rerun = true; }
      ~Rerun() { t_widened_rerun = outer; }
    } rerun;
    op.callBoxed(stack);
  }
  for (auto& [orig, w] : written) {
    if (orig.sizes() != w.sizes()) orig.resize_(w.sizes());  // out= grown by the kernel
    orig.copy_(w);
  }
  auto narrow = [&](const at::Tensor& t) -> at::Tensor {
    if (!t.defined()) return t;
    for (auto& [orig, w] : written) {
      if (t.is_same(w)) return orig;
    }
    if (halves) {
      if (t.scalar_type() == at::kFloat) return t.to(at::kHalf);
      if (t.scalar_type() == at::kComplexFloat) return t.to(at::kComplexHalf);
      return t;
    }
    return t.scalar_type() == at::kFloat ? t.to(low) : t;
  };
  const std::size_t nret = schema.returns().size();
  for (std::size_t i = stack->size() - nret; i < stack->size(); ++i) mapTensors((*stack)[i], narrow);
}

void fallbackAt(const c10::OperatorHandle& op, torch::jit::Stack* stack,
                std::optional<c10::DispatchKey> cpu_key) {
  const c10::FunctionSchema& schema = op.schema();
  const std::size_t nargs = schema.arguments().size();
  const std::size_t begin = stack->size() - nargs;
  // Sparse operators are not modelled (docs/fidelity.md).
  const bool fidelity_on = C10_UNLIKELY(fidelity::on()) && !cpu_key;
  if (fidelity_on && !t_widened_rerun) {
    checkFidelity(op, schema, *stack, begin);
    if (fidelity::runAsMpsDoes(op, *stack, begin)) return;
    fidelity::adaptKernelArguments(op, *stack, begin);
  }
  // Kept for a widened rerun (runWidened); only in fidelity mode.
  std::vector<c10::IValue> saved;
  if (fidelity_on) saved.assign(stack->begin() + static_cast<std::ptrdiff_t>(begin), stack->end());
  Context ctx{op, std::nullopt, {}};
  scanDevices(ctx, schema, *stack, begin);
  int device = ctx.device ? ctx.device->index() : runtime::currentDevice();
  // Inline on the current stream: after what is queued on it (factories that
  // reuse a block a queued copy still reads included).
  runtime::awaitCurrentStream(device);
  toHostArgs(ctx, schema, *stack, begin);
  try {
    LendScope lend(device);
    if (const Redirect* r = redirectFor(op)) {
      if (r->adapt) r->adapt(*stack, begin);
      r->target.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);
    } else if (cpu_key) {
      op.redispatchBoxed(c10::DispatchKeySet(*cpu_key), stack);
    } else if (!ctx.sparse.empty()) {
      const at::Tensor& s = ctx.sparse.front().second;
      op.redispatchBoxed(c10::DispatchKeySet(s.layout() == c10::kSparse
                                                 ? c10::DispatchKey::SparseCPU
                                                 : c10::DispatchKey::SparseCsrCPU),
                         stack);
    } else if (ctx.any_nested) {
      // Nested host views: CPU's nested kernels.
      op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::NestedTensorCPU), stack);
    } else {
      op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);
    }
  } catch (const c10::IndexError& e) {
    // MPS's indexing kernels find a bad index on the device: AcceleratorError.
    // An index into an empty dimension is refused before any kernel runs
    // (ATen's own check, IndexError on MPS too).
    if (!fidelity_on || !fidelity::indexErrorIsDeferred(op) ||
        std::string_view(e.msg()).find("for dimension with size 0") != std::string_view::npos) {
      throw;
    }
    throw c10::AcceleratorError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, 1, e.msg());
  } catch (const c10::NotImplementedError& e) {
    const auto low = fidelity_on ? missingDtype(e.what_without_backtrace()) : std::nullopt;
    if (!low) throw;
    stack->resize(begin);
    try {
      runWidened(op, stack, std::move(saved), *low);
    } catch (...) {
      throw e;  // the float32 run failed too: the caller sees their dtype's error
    }
    return;
  }
  writeBack(ctx, device);
  const std::size_t nret = schema.returns().size();
  const std::size_t ret_begin = stack->size() - nret;
  Adopter adopt{ctx, device, {}};
  for (auto& [d, h] : ctx.sparse) {
    sparse::writeBackSparse(
        d, h, [&](const at::Tensor& m) { return adopt(m, *stack, ret_begin); });
  }
  for (std::size_t i = ret_begin; i < stack->size(); ++i) {
    c10::IValue& v = (*stack)[i];
    if (v.isTensor()) {
      v = adopt(v.toTensor(), *stack, ret_begin);
    } else if (v.isTensorList()) {
      auto list = v.toTensorList();
      c10::List<at::Tensor> out;
      out.reserve(list.size());
      for (const at::Tensor& t : list) out.push_back(adopt(t, *stack, ret_begin));
      v = std::move(out);
    }
  }
}

void fallback(const c10::OperatorHandle& op, c10::DispatchKeySet /*ks*/,
              torch::jit::Stack* stack) {
  fallbackAt(op, stack, std::nullopt);
}

} // namespace

void runFallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  fallbackAt(op, stack, std::nullopt);
}

void runFallbackAt(const c10::OperatorHandle& op, torch::jit::Stack* stack,
                   c10::DispatchKey cpu_key) {
  fallbackAt(op, stack, cpu_key);
}

void preferCpuKernels() {
  // A few ops have both a CPU kernel and a CompositeExplicitAutograd one
  // (native_layer_norm, native_group_norm, addr, _stack, any/all.dims...).
  // The composite kernel outranks a backend fallback, so mps_ext would run a
  // decomposition with other numerics (and more passes over memory) than
  // CPU. Registering the fallback for them makes mps_ext run CPU's kernel.
  // Done at init, after every static registration, and only for ops with no
  // mps_ext kernel of their own.
  static torch::Library* lib = nullptr;
  if (lib) return;
  lib = new torch::Library(torch::Library::IMPL, "aten",
                           c10::DispatchKey::PrivateUse1, __FILE__, __LINE__);
  auto& d = c10::Dispatcher::singleton();
  // CompositeExplicitAutograd kernels that call a DispatchStub directly
  // (so they only work on CPU/CUDA: "DispatchStub: missing kernel for
  // mps_ext": kaiser_window) or CPU's kernel function itself
  // (_batch_norm_no_update calls batch_norm_cpu): run them on host views.
  // Likewise out= overloads that check the device type themselves
  // ("mode only supports CPU, CUDA and XPU device type"). And addr_, whose
  // kernel passes `self` as both input and out to addr_out and the CPU kernel
  // tells them apart by address: boxed, they are two references, and a 0-D
  // `self` would be resized instead of refused as on CPU.
  for (const char* n : {"conj_physical_", "mode.values", "addr_", "kaiser_window",
                        "kaiser_window.periodic", "kaiser_window.beta",
                        "_batch_norm_no_update"}) {
    std::string full = n;
    auto dot = full.find('.');
    c10::OperatorName opname{"aten::" + full.substr(0, dot),
                             dot == std::string::npos ? "" : full.substr(dot + 1)};
    auto op = d.findOp(opname);
    if (op && !op->hasKernelForDispatchKey(c10::DispatchKey::PrivateUse1)) {
      lib->impl(n, torch::CppFunction::makeFromBoxedFunction<&fallback>());
    }
  }
  // Nested tensors: an op with a NestedTensorCPU kernel would otherwise run
  // its CompositeImplicitAutograd decomposition for NestedTensorPrivateUse1
  // (a composite outranks a backend fallback), which nested tensors do not
  // support (nn.Linear on a nested tensor: "doesn't support sizes"); CPU's
  // nested kernel it is, on nested host views.
  static torch::Library* nested = new torch::Library(
      torch::Library::IMPL, "aten", c10::DispatchKey::NestedTensorPrivateUse1, __FILE__, __LINE__);
  // One pass over the operators for all registrations (sparse ones:
  // SparseFallback.h).
  for (const c10::OperatorName& name : d.getAllOpNames()) {
    if (name.name.rfind("aten::", 0) != 0) continue;
    auto op = d.findOp(name);
    if (!op) continue;
    bool nested_cpu = op->hasKernelForDispatchKey(c10::DispatchKey::NestedTensorCPU) &&
                      !op->hasKernelForDispatchKey(c10::DispatchKey::NestedTensorPrivateUse1);
    bool prefer_cpu =
        op->hasKernelForDispatchKey(c10::DispatchKey::CPU) &&
        !op->hasKernelForDispatchKey(c10::DispatchKey::PrivateUse1) &&
        (op->hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd) ||
         op->hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutogradNonFunctional));
    bool sparse_cpu = op->hasKernelForDispatchKey(c10::DispatchKey::SparseCPU) ||
                      op->hasKernelForDispatchKey(c10::DispatchKey::SparseCsrCPU);
    if (!nested_cpu && !prefer_cpu && !sparse_cpu) continue;
    std::string n = name.name.substr(6);
    if (!name.overload_name.empty()) n += "." + name.overload_name;
    if (nested_cpu) nested->impl(n.c_str(), torch::CppFunction::makeFromBoxedFunction<&fallback>());
    if (sparse_cpu) sparse::registerSparseFallbackFor(*op, n);
    if (prefer_cpu) lib->impl(n.c_str(), torch::CppFunction::makeFromBoxedFunction<&fallback>());
  }
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

// Nested tensors on mps_ext (torch.nested's strided layout) run CPU's nested
// kernels on nested host views the same way: the fast paths of
// nn.TransformerEncoder / MultiheadAttention in inference (which torch takes
// for PrivateUse1 devices) build and consume them.
TORCH_LIBRARY_IMPL(_, NestedTensorPrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

// The redirected hooks have a CompositeExplicitAutograd default kernel (the
// "not implemented" error), which wins over a backend fallback: register the
// fallback for them explicitly.
TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("convolution_overrideable",
         torch::CppFunction::makeFromBoxedFunction<&fallback>());
  m.impl("convolution_backward_overrideable",
         torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

// The conjugate/negative math-bit fallbacks materialize a tensor with the bit
// set by cloning it, and a clone on the device copies through `_copy_from`:
// without these fallthroughs, copying a conj/neg view to or from the device
// recursed until the stack overflowed. `_copy_from` resolves the bits itself
// (the host views keep them and at::native::copy_ applies them), as `copy_`
// does on other devices.
TORCH_LIBRARY_IMPL(aten, Conjugate, m) {
  m.impl("_copy_from", torch::CppFunction::makeFallthrough());
  m.impl("_copy_from_and_resize", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(aten, Negative, m) {
  m.impl("_copy_from", torch::CppFunction::makeFallthrough());
  m.impl("_copy_from_and_resize", torch::CppFunction::makeFallthrough());
}

} // namespace torch_mps_ext
