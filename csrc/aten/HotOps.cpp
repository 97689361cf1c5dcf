// Layer 3: device structured kernels for the hottest pointwise operators.
//
// The boxed fallback handles any schema, at the price of an IValue stack, a
// schema walk, host views of every argument and adoption of every output:
// a microsecond or more per call, as much as a small CPU kernel itself. The
// ops below instead run CPU's own structured kernel class (its meta: shapes,
// type promotion, checks and error texts; its impl: the DispatchStub kernel)
// directly on the device tensors, the way CUDA runs its structured kernels:
//   - the output is allocated on the device by our set_output (no lending,
//     no adoption), an in-place op writes `self` itself;
//   - the DispatchStubs those impls call get a PrivateUse1 entry that
//     forwards to CPU's kernel (the memory is host memory).
// TensorIterator converts mixed dtypes only when the common device is CPU,
// so the fast path takes calls whose operands all have one dtype after meta
// (a Python number operand is converted to it first, the conversion CPU's
// TensorIterator makes); any other call, tensors on different devices, and
// conj/neg tensors take the boxed fallback: its behaviour and errors.

// Calling a DispatchStub needs its declarations to match torch's build (the
// HAVE_*_CPU_DEFINITION flags CMakeLists.txt sets on x86-64); elsewhere the
// fast path is not built and these ops take the fallback.
#if defined(HAVE_AVX2_CPU_DEFINITION)
#define MPS_EXT_HOT_OPS 1
#endif

#include "aten/Fallback.h"
#include "aten/Fidelity.h"
#include "aten/HostView.h"
#include "aten/Ops.h"
#include "runtime/Device.h"
#include "runtime/Stream.h"

#include <ATen/ScalarOps.h>
#include <ATen/TensorIterator.h>
#include <ATen/core/stack.h>
#include <ATen/native/Activation.h>
#include <ATen/native/BinaryOps.h>
#include <ATen/native/TensorCompare.h>
#include <ATen/native/TypeProperties.h>
#include <ATen/native/UnaryOps.h>
#include <ATen/ops/_local_scalar_dense_native.h>
#include <ATen/ops/add_native.h>
#include <ATen/ops/clamp_min_native.h>
#include <ATen/ops/div_native.h>
#include <ATen/ops/mul_native.h>
#include <ATen/ops/neg_native.h>
#include <ATen/ops/relu_native.h>
#include <ATen/ops/sub_native.h>
#include <ATen/ops/threshold_backward_native.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>

namespace torch_mps_ext {
namespace {

constexpr auto kDev = c10::DeviceType::PrivateUse1;

// ---------------------------------------------------------------------------
// DispatchStubs: the PrivateUse1 entry runs CPU's kernel.

template <class Stub, Stub& S, class Fn = typename Stub::FnPtr>
struct OnCpu;

template <class Stub, Stub& S, class... A>
struct OnCpu<Stub, S, void (*)(A...)> {
  static void run(A... a) { S(c10::DeviceType::CPU, std::forward<A>(a)...); }
};

template <class Stub, Stub& S>
void forwardToCpu() {
  S.set_privateuse1_dispatch_ptr(&OnCpu<Stub, S>::run);
}

#define MPS_EXT_FORWARD_STUB(stub) forwardToCpu<decltype(stub), stub>()

// ---------------------------------------------------------------------------
// Which calls the fast path takes.

// The device all tensor arguments agree on; declines (fast() false) for
// anything the fallback should judge: tensors on two devices, a CPU tensor
// that is not a 0-dim scalar (or more than one of those), conj/neg bits.
struct Agreement {
  int device = -2;  // -2: no device tensor seen yet
  int cpu_scalars = 0;
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
    } else if (t.dim() != 0 || !t.is_cpu() || ++cpu_scalars > 1) {
      ok = false;
    }
  }
  template <class T>
  void see(const T&) {}

  bool fast() const { return ok && device >= 0; }
};

// A CPU 0-dim operand in the dtype of the device operand `like`, or
// undefined when type promotion would not give like's dtype. CPU's
// TensorIterator converts such an operand (`x * 0.5`: a double "wrapped
// number") to the common dtype before its kernel runs; this is that
// conversion, done before meta because a device TensorIterator does not.
at::Tensor scalarOperand(const at::Tensor& like, const at::Tensor& s) {
  if (!s.defined() || s.device().type() == kDev) return s;
  if (s.scalar_type() == like.scalar_type()) return s;
  // For half-precision types CPU's kernels read the scalar in float from
  // the operand before conversion (original_scalar_value): leave those to
  // the fallback.
  at::ScalarType to = like.scalar_type();
  if (at::isReducedFloatingType(to) || to == at::kComplexHalf || at::isFloat8Type(to)) {
    return at::Tensor();
  }
  at::native::ResultTypeState state;
  state = at::native::update_result_type_state(like, state);
  state = at::native::update_result_type_state(s, state);
  if (at::native::result_type(state) != like.scalar_type()) return at::Tensor();
  // A cast, as TensorIterator's (`u8 + 1000` wraps to 232 as on CPU; a
  // checked Scalar conversion would raise instead).
  at::Tensor t = s.to(like.scalar_type());
  if (s.unsafeGetTensorImpl()->is_wrapped_number()) {
    t.unsafeGetTensorImpl()->set_wrapped_number(true);
  }
  return t;
}

// True when TensorIterator would not have converted anything on CPU: all
// operands (outputs included) have one dtype.
bool oneDtype(const at::TensorIteratorBase& it) {
  for (int i = 1; i < it.ntensors(); ++i) {
    if (it.dtype(i) != it.dtype(0)) return false;
  }
  return true;
}

// In MPS fidelity mode, float64/complex128 operands take the fallback, which
// refuses them as MPS does (aten/Fidelity.h). Asked only once the mode is on.
template <class... Args>
bool fidelityDeclines(const Args&... args) {
  auto wide = [](const auto& a) {
    if constexpr (std::is_same_v<std::decay_t<decltype(a)>, at::Tensor>) {
      return a.defined() && a.device().type() == kDev && fidelity::wideDtype(a.scalar_type());
    } else {
      return false;
    }
  };
  return (wide(args) || ...);
}

// ---------------------------------------------------------------------------
// The structured kernel wrappers (what torchgen writes per backend).

at::Tensor newOutput(c10::IntArrayRef sizes, c10::IntArrayRef strides,
                     const c10::TensorOptions& options) {
  // TensorIterator's "no strides" means contiguous.
  return emptyOnDevice(sizes, strides.empty() ? std::nullopt : std::optional(strides),
                       options.dtype().toScalarType(),
                       options.device().index(), options.memory_format_opt());
}

// Impl is a TensorIterator-based structured class of CPU's; its meta calls
// set_output_*, which Derived::output answers (a new device tensor, or a
// check of `self`) before TensorIterator records the output.
template <class Impl, class Derived>
struct Outputs : Impl {
  static_assert(std::is_base_of_v<at::TensorIteratorBase, Impl>);
  void set_output_strided(int64_t i, c10::IntArrayRef sizes, c10::IntArrayRef strides,
                          c10::TensorOptions options) override {
    set(i, sizes, strides, options);
  }
  void set_output_raw_strided(int64_t i, c10::IntArrayRef sizes,
                              c10::IntArrayRef strides,
                              c10::TensorOptions options) override {
    set(i, sizes, strides, options);
  }

 private:
  void set(int64_t i, c10::IntArrayRef sizes, c10::IntArrayRef strides,
           const c10::TensorOptions& options) {
    static_cast<Derived*>(this)->output(sizes, strides, options);
    Impl::set_output_raw_strided(i, sizes, strides, options);
  }
};

template <class Impl>
struct Functional final : Outputs<Impl, Functional<Impl>> {
  at::Tensor out;
  const at::Tensor& maybe_get_output(int64_t /*i*/) override { return out; }
  void output(c10::IntArrayRef sizes, c10::IntArrayRef strides,
              const c10::TensorOptions& options) {
    out = newOutput(sizes, strides, options);
  }
};

template <class Impl>
struct InPlace final : Outputs<Impl, InPlace<Impl>> {
  explicit InPlace(const at::Tensor& s) : self(s) {}
  const at::Tensor& self;
  const at::Tensor& maybe_get_output(int64_t /*i*/) override { return self; }
  // The checks torchgen's in-place wrappers make (TensorIterator has
  // usually refused such a call before).
  void output(c10::IntArrayRef sizes, c10::IntArrayRef /*strides*/,
              const c10::TensorOptions& options) {
    TORCH_CHECK(options.dtype() == self.dtype(), "Bad in-place call: ",
                "input tensor dtype ", self.dtype(), " and output tensor dtype ",
                options.dtype(), " should match");
    TORCH_CHECK(options.device() == self.device(), "Bad in-place call: ",
                "input tensor device ", self.device(), " and output tensor device ",
                options.device(), " should match");
    TORCH_CHECK(sizes == self.sizes(), "Bad in-place call: ", "input tensor size ",
                self.sizes(), " and output tensor size ", sizes, " should match");
  }
};

// ---------------------------------------------------------------------------
// Running an op: fast path, else the boxed fallback.

c10::OperatorHandle lookup(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
}

template <class... Args>
at::Tensor viaFallback(const c10::OperatorHandle& op, const Args&... args) {
  torch::jit::Stack stack;
  stack.reserve(sizeof...(Args));
  (stack.emplace_back(args), ...);
  runFallback(op, &stack);
  return std::move(stack.back()).toTensor();
}

struct OpName {
  const char* name;
  const char* overload;
};

// out = op(args...): CPU's structured Impl on device tensors.
template <class Impl, const OpName& Name, class... Args>
at::Tensor functional(const Args&... args) {
  Agreement a;
  (a.see(args), ...);
  if (a.fast() && !(C10_UNLIKELY(fidelity::on()) && fidelityDeclines(args...))) {
    Functional<Impl> op;
    op.meta(args...);
    if (oneDtype(op)) {
      runtime::awaitCurrentStream(a.device);
      op.impl(args..., op.out);
      return std::move(op.out);
    }
  }
  static const c10::OperatorHandle handle = lookup(Name.name, Name.overload);
  return viaFallback(handle, args...);
}

// self = op(self, args...) in place.
template <class Impl, const OpName& Name, class... Args>
at::Tensor& inplace(at::Tensor& self, const Args&... args) {
  Agreement a;
  a.see(self);
  (a.see(args), ...);
  if (a.fast() && self.device().type() == kDev &&
      !(C10_UNLIKELY(fidelity::on()) && fidelityDeclines(self, args...))) {
    InPlace<Impl> op(self);
    op.meta(self, args...);
    if (oneDtype(op)) {
      runtime::awaitCurrentStream(a.device);
      op.impl(self, args..., self);
      return self;
    }
  }
  static const c10::OperatorHandle handle = lookup(Name.name, Name.overload);
  viaFallback(handle, self, args...);
  return self;
}

// Binary ops whose second operand may be a Python number (a CPU 0-dim
// tensor): converted to self's dtype first where CPU would convert it.
template <class Impl, const OpName& Name, class... Rest>
at::Tensor binary(const at::Tensor& self, const at::Tensor& other, const Rest&... rest) {
  if (self.device().type() == kDev) {
    at::Tensor o = scalarOperand(self, other);
    if (o.defined()) return functional<Impl, Name>(self, o, rest...);
  }
  return functional<Impl, Name>(self, other, rest...);
}

template <class Impl, const OpName& Name, class... Rest>
at::Tensor& binary_(at::Tensor& self, const at::Tensor& other, const Rest&... rest) {
  if (self.device().type() == kDev) {
    at::Tensor o = scalarOperand(self, other);
    if (o.defined()) return inplace<Impl, Name>(self, o, rest...);
  }
  return inplace<Impl, Name>(self, other, rest...);
}

constexpr OpName kAdd{"aten::add", "Tensor"}, kAdd_{"aten::add_", "Tensor"},
    kSub{"aten::sub", "Tensor"}, kSub_{"aten::sub_", "Tensor"},
    kMul{"aten::mul", "Tensor"}, kMul_{"aten::mul_", "Tensor"},
    kDiv{"aten::div", "Tensor"}, kDiv_{"aten::div_", "Tensor"},
    kNeg{"aten::neg", ""}, kNeg_{"aten::neg_", ""},
    kClampMin{"aten::clamp_min", ""}, kClampMin_{"aten::clamp_min_", ""},
    kThresholdBackward{"aten::threshold_backward", ""};

using T = at::Tensor;
using S = at::Scalar;
namespace an = at::native;

void installHotOpStubs() {
  // The stubs the impls below call. add_stub also serves sub.
  MPS_EXT_FORWARD_STUB(at::native::add_stub);
  MPS_EXT_FORWARD_STUB(at::native::mul_stub);
  MPS_EXT_FORWARD_STUB(at::native::div_true_stub);
  MPS_EXT_FORWARD_STUB(at::native::neg_stub);
  MPS_EXT_FORWARD_STUB(at::native::clamp_min_scalar_stub);
  MPS_EXT_FORWARD_STUB(at::native::threshold_stub);
}

} // namespace

#if MPS_EXT_HOT_OPS
TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  installHotOpStubs();
  m.impl("add.Tensor", TORCH_FN((binary<an::structured_ufunc_add_CPU, kAdd, S>)));
  m.impl("add_.Tensor", TORCH_FN((binary_<an::structured_ufunc_add_CPU, kAdd_, S>)));
  m.impl("sub.Tensor", TORCH_FN((binary<an::structured_sub_out, kSub, S>)));
  m.impl("sub_.Tensor", TORCH_FN((binary_<an::structured_sub_out, kSub_, S>)));
  m.impl("mul.Tensor", TORCH_FN((binary<an::structured_mul_out, kMul>)));
  m.impl("mul_.Tensor", TORCH_FN((binary_<an::structured_mul_out, kMul_>)));
  m.impl("div.Tensor", TORCH_FN((binary<an::structured_div_out, kDiv>)));
  m.impl("div_.Tensor", TORCH_FN((binary_<an::structured_div_out, kDiv_>)));
  m.impl("neg", TORCH_FN((functional<an::structured_neg_out, kNeg, T>)));
  m.impl("neg_", TORCH_FN((inplace<an::structured_neg_out, kNeg_>)));
  m.impl("clamp_min", TORCH_FN((functional<an::structured_clamp_min_out, kClampMin, T, S>)));
  m.impl("clamp_min_", TORCH_FN((inplace<an::structured_clamp_min_out, kClampMin_, S>)));
  m.impl("threshold_backward",
         TORCH_FN((functional<an::structured_threshold_backward_out, kThresholdBackward,
                              T, T, S>)));
  // CPU's relu/relu_ are clamp_min(self, 0) after a bool check: the same
  // composition here reaches the fast clamp_min.
  m.impl("relu", TORCH_FN(an::relu));
  m.impl("relu_", TORCH_FN(an::relu_));
}
#endif

} // namespace torch_mps_ext
