// Layer 3: unboxed fast paths for the hottest pointwise operators.
//
// The boxed fallback handles any schema, which costs a stack of IValues, a
// schema walk and a second dispatch per call: several microseconds, as much
// as a small CPU kernel itself. For the ops below, a typed kernel calls CPU's
// structured kernel (at::cpu::*) directly on host views, inside a LendScope,
// and adopts the output. Anything unusual (tensors on different devices, a
// CPU tensor that is not a scalar, conj/neg bits) takes the boxed fallback,
// so behaviour and error messages are the fallback's.
#include "aten/HostView.h"

#include <ATen/ops/add_cpu_dispatch.h>
#include <ATen/ops/div_cpu_dispatch.h>
#include <ATen/ops/mul_cpu_dispatch.h>
#include <ATen/ops/sub_cpu_dispatch.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

namespace torch_mps_ext {
namespace {

constexpr auto kDev = c10::DeviceType::PrivateUse1;

// The device all tensor arguments agree on, or -1 when the fast path does
// not apply.
struct Agreement {
  int device = -2;  // -2: no device tensor seen yet
  bool ok = true;

  void see(const at::Tensor& t) {
    if (!t.defined()) return;
    if (t.is_conj() || t.is_neg()) {
      ok = false;
    } else if (t.device().type() == kDev) {
      int d = t.device().index();
      if (device == -2) {
        device = d;
      } else if (device != d) {
        ok = false;
      }
    } else if (t.dim() != 0) {
      ok = false;
    }
  }
  template <class T>
  void see(const T&) {}

  bool fast() const { return ok && device >= 0; }
};

at::Tensor toHost(const at::Tensor& t) {
  return t.defined() && t.device().type() == kDev ? hostView(t) : t;
}
template <class T>
const T& toHost(const T& x) {
  return x;
}

c10::OperatorHandle lookup(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
}

// The general path for a call the fast path declined.
template <class Ret, class... Args>
Ret viaFallback(const c10::OperatorHandle& op, Args&&... args) {
  torch::jit::Stack stack;
  stack.reserve(sizeof...(Args));
  (stack.emplace_back(args), ...);
  runFallback(op, &stack);
  return std::move(stack.back()).toTensor();
}

// out = CpuFn(args...) for a functional op.
template <auto CpuFn, const char* Name, const char* Overload>
struct Functional;

template <class... Args, at::Tensor (*CpuFn)(Args...), const char* Name,
          const char* Overload>
struct Functional<CpuFn, Name, Overload> {
  static at::Tensor call(Args... args) {
    Agreement a;
    (a.see(args), ...);
    if (!a.fast()) {
      static const c10::OperatorHandle op = lookup(Name, Overload);
      return viaFallback<at::Tensor>(op, args...);
    }
    at::Tensor out;
    {
      LendScope lend(a.device);
      out = CpuFn(toHost(args)...);
    }
    return adoptResult(out, a.device);
  }
};

// self = CpuFn(self, args...) for an in-place op: returns the caller's self.
template <auto CpuFn, const char* Name, const char* Overload>
struct InPlace;

template <class... Args, at::Tensor& (*CpuFn)(at::Tensor&, Args...), const char* Name,
          const char* Overload>
struct InPlace<CpuFn, Name, Overload> {
  static at::Tensor& call(at::Tensor& self, Args... args) {
    Agreement a;
    a.see(self);
    (a.see(args), ...);
    if (!a.fast() || self.device().type() != kDev) {
      static const c10::OperatorHandle op = lookup(Name, Overload);
      viaFallback<at::Tensor>(op, self, args...);
      return self;
    }
    at::Tensor host = hostView(self);
    {
      LendScope lend(a.device);
      CpuFn(host, toHost(args)...);
    }
    return self;
  }
};

constexpr char kAdd[] = "aten::add", kSub[] = "aten::sub", kMul[] = "aten::mul",
               kDiv[] = "aten::div", kAdd_[] = "aten::add_", kSub_[] = "aten::sub_",
               kMul_[] = "aten::mul_", kDiv_[] = "aten::div_", kTensor[] = "Tensor";

} // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  using T = const at::Tensor&;
  using S = const at::Scalar&;
  m.impl("add.Tensor", TORCH_FN((Functional<static_cast<at::Tensor (*)(T, T, S)>(&at::cpu::add),
                                            kAdd, kTensor>::call)));
  m.impl("sub.Tensor", TORCH_FN((Functional<static_cast<at::Tensor (*)(T, T, S)>(&at::cpu::sub),
                                            kSub, kTensor>::call)));
  m.impl("mul.Tensor", TORCH_FN((Functional<static_cast<at::Tensor (*)(T, T)>(&at::cpu::mul),
                                            kMul, kTensor>::call)));
  m.impl("div.Tensor", TORCH_FN((Functional<static_cast<at::Tensor (*)(T, T)>(&at::cpu::div),
                                            kDiv, kTensor>::call)));
  m.impl("add_.Tensor", TORCH_FN((InPlace<static_cast<at::Tensor& (*)(at::Tensor&, T, S)>(
                                              &at::cpu::add_), kAdd_, kTensor>::call)));
  m.impl("sub_.Tensor", TORCH_FN((InPlace<static_cast<at::Tensor& (*)(at::Tensor&, T, S)>(
                                              &at::cpu::sub_), kSub_, kTensor>::call)));
  m.impl("mul_.Tensor", TORCH_FN((InPlace<static_cast<at::Tensor& (*)(at::Tensor&, T)>(
                                              &at::cpu::mul_), kMul_, kTensor>::call)));
  m.impl("div_.Tensor", TORCH_FN((InPlace<static_cast<at::Tensor& (*)(at::Tensor&, T)>(
                                              &at::cpu::div_), kDiv_, kTensor>::call)));
}

} // namespace torch_mps_ext
