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
#include "aten/HostView.h"
#include "runtime/Device.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/op_registration/op_registration.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <optional>
#include <sstream>

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
    at::Tensor h = hostView(t);
    aliased.push_back({t, h, h.storage().unsafeGetStorageImpl()});
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
  for (std::size_t i = 0; i < schema.arguments().size(); ++i) {
    const c10::IValue& v = stack[begin + i];
    const std::string& name = schema.arguments()[i].name();
    auto visit = [&](const at::Tensor& t, bool index_list) {
      if (!t.defined()) return;
      if (t.device().type() == kDev) {
        ctx.noteDevice(t.device(), "argument " + name);
      } else if (!index_list && !isScalarLike(t) && !host_tensor) {
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
        any |= e.isTensor() && e.toTensor().device().type() == kDev;
      }
      if (!any) continue;
      auto out = list.copy();
      for (std::size_t j = 0; j < out.size(); ++j) {
        c10::IValue e = out.get(j);
        if (e.isTensor() && e.toTensor().device().type() == kDev) {
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
  for (auto& a : ctx.aliased) {
    c10::TensorImpl* h = a.host.unsafeGetTensorImpl();
    c10::TensorImpl* d = a.device.unsafeGetTensorImpl();
    c10::StorageImpl* hs = h->storage().unsafeGetStorageImpl();
    if (hs != a.host_storage || hs->data() != d->storage().unsafeGetStorageImpl()->data()) {
      if (hs == a.host_storage && isPoolMemory(hs->data_ptr())) {
        // The kernel grew the argument: its new memory was lent from the pool.
        d->set_storage_keep_dtype(adoptLentStorage(hs, device));
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

  // References to storage `s` held by the results on the stack.
  static std::size_t countRefs(c10::StorageImpl* s, torch::jit::Stack& stack,
                               std::size_t begin) {
    std::size_t n = 0;
    auto count = [&](const at::Tensor& t) {
      if (t.defined() && t.has_storage() && t.storage().unsafeGetStorageImpl() == s) ++n;
    };
    for (std::size_t i = begin; i < stack.size(); ++i) {
      const c10::IValue& v = stack[i];
      if (v.isTensor()) {
        count(v.toTensor());
      } else if (v.isTensorList()) {
        for (const at::Tensor& t : v.toTensorList()) count(t);
      }
    }
    return n;
  }
};

void fallback(const c10::OperatorHandle& op, c10::DispatchKeySet /*ks*/,
              torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const std::size_t nargs = schema.arguments().size();
  const std::size_t begin = stack->size() - nargs;
  Context ctx{op, std::nullopt, {}};
  scanDevices(ctx, schema, *stack, begin);
  int device = ctx.device ? ctx.device->index() : runtime::currentDevice();
  toHostArgs(ctx, schema, *stack, begin);
  {
    LendScope lend(device);
    op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);
  }
  writeBack(ctx, device);
  const std::size_t nret = schema.returns().size();
  const std::size_t ret_begin = stack->size() - nret;
  Adopter adopt{ctx, device, {}};
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

} // namespace

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

} // namespace torch_mps_ext
