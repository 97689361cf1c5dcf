// Layer 3: MPS fidelity mode's checks (Fidelity.h).
//
// The texts are MPS's own, from the torch this package is built against:
//   - aten/src/ATen/mps/MPSFallback.mm: mps_error_fallback (NotImplementedError,
//     naming the build's commit hash, which caffe2::GetBuildOptions() gives
//     here as there) and mps_fallback's warning;
//   - aten/src/ATen/mps/EmptyTensor.cpp: MPS_ERROR_DOUBLE_NOT_SUPPORTED, raised
//     when a float64 tensor is created on MPS;
//   - aten/src/ATen/native/mps/OperationUtils.mm: getMPSDataType, raised when
//     an MPS kernel computes on float64 or complex128 (MPS creates and copies
//     complex128 tensors, but computes nothing on them).
#include "aten/Fidelity.h"

#include "aten/Fallback.h"
#include "core/Allocator.h"

#include <ATen/Context.h>
#include <ATen/ExpandUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/WrapDimUtils.h>
#include <ATen/ops/_cdist_forward.h>
#include <ATen/ops/sort.h>
#include <caffe2/core/common.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/function.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

namespace torch_mps_ext::fidelity {
namespace {

struct Entry {
  Verdict verdict = Verdict::Accept;
  std::string shown;  // the name MPS prints, if not the operator's own
};
using Table = std::unordered_map<c10::OperatorHandle, Entry>;

std::atomic<const Table*> g_table{nullptr};

struct DtypeRefusal {
  uint64_t mask = 0;  // bit i: c10::ScalarType i
  std::string reason;
  bool verbatim = false;  // reason is MPS's own message
};
using DtypeTable = std::unordered_map<c10::OperatorHandle, std::vector<DtypeRefusal>>;
std::atomic<const DtypeTable*> g_dtypes{nullptr};

std::mutex g_mu;  // g_warned, g_recorder, g_allowance
Allowance g_allowance;
std::mutex g_mode_mu;  // setMode, g_mps_kernels
// Kernels registered only while mps mode is on (see registerMpsKernels).
std::unique_ptr<torch::Library> g_mps_kernels, g_composite_kernels, g_composite_autograd;
std::unordered_set<c10::OperatorHandle> g_warned;
Recorder g_recorder;

constexpr const char* kDoubleNew =
    "Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support "
    "float64. Please use float32 instead.";
constexpr const char* kDoubleOperand =
    "Cannot convert a float64 Tensor to MPS as the MPS framework doesn't support float64. "
    "Please use float32 instead.";
constexpr const char* kComplexDoubleOperand =
    "Trying to convert ComplexDouble to the MPS backend but it does not have support for "
    "that dtype.";

std::string nameOf(const c10::OperatorHandle& op) {
  std::ostringstream os;
  os << op.operator_name();  // "aten::kthvalue.values", as MPS prints it
  return os.str();
}

const std::string& commitSha() {
  static const std::string sha = [] {
    const auto& options = caffe2::GetBuildOptions();
    auto it = options.find("COMMIT_SHA");
    return it == options.end() ? std::string("Unknown") : it->second;
  }();
  return sha;
}

bool recording() {
  return runtime::fidelity::options().record;
}

// ATen code that picks its accumulation type by device type
// (at::toAccumulateType(dtype, device)): float32 on MPS, float64 on every
// other device, PrivateUse1 included. A Mac never sees the float64
// intermediates it makes here, so mps mode lets them be: renorm's backward
// formula (an autograd node), and the composites runCheckedComposite marks
// (empty-batch batch_norm's statistics).
thread_local int t_device_typed_composite = 0;

bool inDeviceTypedCode() {
  if (t_device_typed_composite > 0) return true;
  const c10::intrusive_ptr<torch::autograd::Node> node = torch::autograd::get_current_node();
  return node && node->name() == "RenormBackward0";
}

bool excused() {
  if (inDeviceTypedCode()) return true;
  Allowance a;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    a = g_allowance;
  }
  if (!a) return false;
  try {
    return a();
  } catch (...) {
    return false;
  }
}

void record(const char* kind, const std::string& what, const std::string& op) {
  Recorder r;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    r = g_recorder;
  }
  if (!r) return;
  try {
    r(kind, what, op);
  } catch (...) {
    // The report never breaks the program it watches.
  }
}

[[noreturn]] void refuse(const std::string& name) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      false, "The operator '", name,
      "' is not currently implemented for the MPS device. If you want this op to be "
      "considered for addition please comment on "
      "https://github.com/pytorch/pytorch/issues/141287 and mention use-case, that resulted "
      "in missing op as well as commit hash ",
      commitSha(),
      ". As a temporary fix, you can set the environment variable "
      "`PYTORCH_ENABLE_MPS_FALLBACK=1` to use the CPU as a fallback for this op. WARNING: "
      "this will be slower than running natively on MPS.");
}

// The name MPS's error fallback prints for `op` (see setOperatorVerdicts).
std::string shownName(const c10::OperatorHandle& op) {
  const Table* t = g_table.load(std::memory_order_acquire);
  if (t != nullptr) {
    auto it = t->find(op);
    if (it != t->end() && !it->second.shown.empty()) return it->second.shown;
  }
  return nameOf(op);
}

void warnOnce(const c10::OperatorHandle& op) {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (!g_warned.insert(op).second) return;
  }
  // Verbatim: MPS's text, without the "(Triggered internally at <file>)"
  // that would name this file where a Mac names MPSFallback.mm.
  c10::warn(c10::Warning(
      c10::UserWarning(), {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
      "The operator '" + shownName(op) +
          "' is not currently supported on the MPS backend and will fall back to run on "
          "the CPU. This may have performance implications.",
      /*verbatim=*/true));
}

const char* dtypeName(at::ScalarType t) {
  return t == at::kDouble ? "float64" : "complex128";
}

} // namespace

void setOperatorVerdicts(
    const std::vector<std::tuple<std::string, int, std::string>>& verdicts) {
  auto table = std::make_unique<Table>();
  auto& d = c10::Dispatcher::singleton();
  for (const auto& [full, v, shown] : verdicts) {
    auto dot = full.find('.');
    c10::OperatorName name{full.substr(0, dot),
                           dot == std::string::npos ? "" : full.substr(dot + 1)};
    if (auto op = d.findOp(name)) {
      TORCH_CHECK(v >= 0 && v <= 2, "bad fidelity verdict ", v, " for ", full);
      (*table)[*op] = Entry{static_cast<Verdict>(v), shown};
    }
  }
  // Readers may still hold the previous table: it is kept (a few KiB, set
  // once or twice in a process).
  g_table.store(table.release(), std::memory_order_release);
}

void setDtypeRefusals(
    const std::vector<std::tuple<std::string, std::vector<int>, std::string, bool>>& refusals) {
  auto table = std::make_unique<DtypeTable>();
  auto& d = c10::Dispatcher::singleton();
  for (const auto& [full, dtypes, reason, verbatim] : refusals) {
    auto dot = full.find('.');
    c10::OperatorName name{full.substr(0, dot),
                           dot == std::string::npos ? "" : full.substr(dot + 1)};
    auto op = d.findOp(name);
    if (!op) continue;
    DtypeRefusal r{0, reason, verbatim};
    for (int t : dtypes) {
      TORCH_CHECK(t >= 0 && t < 64, "bad dtype code ", t, " for ", full);
      r.mask |= uint64_t{1} << t;
    }
    (*table)[*op].push_back(std::move(r));
  }
  // Kept like the operator table (readers may hold the previous one).
  g_dtypes.store(table.release(), std::memory_order_release);
}

void checkSelfDtype(const c10::OperatorHandle& op, at::ScalarType self) {
  const DtypeTable* t = g_dtypes.load(std::memory_order_acquire);
  if (t == nullptr) return;
  auto it = t->find(op);
  if (it == t->end()) return;
  const uint64_t bit = uint64_t{1} << static_cast<int>(self);
  for (const DtypeRefusal& r : it->second) {
    if (!(r.mask & bit)) continue;
    if (recording()) {
      record("dtype", c10::toString(self), nameOf(op));
      return;
    }
    // MPS's own text where it was read in its source; else one that names
    // the operator, the dtype and the common_mps list that says so.
    TORCH_CHECK(!r.verbatim, r.reason);
    TORCH_CHECK(false, "The operator '", nameOf(op), "' has no MPS kernel for dtype ",
                c10::toString(self), " (torch.testing._internal.common_mps: ", r.reason, ")");
  }
}

void refuseKernel(const c10::OperatorHandle& op, at::ScalarType dtype, const std::string& message,
                  bool not_implemented) {
  if (recording()) {
    record("dtype", c10::toString(dtype), nameOf(op));
    return;
  }
  TORCH_CHECK_NOT_IMPLEMENTED(!not_implemented, message);
  TORCH_CHECK(false, message);
}

Verdict verdictOf(const c10::OperatorHandle& op) {
  const Table* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) return Verdict::Accept;
  auto it = t->find(op);
  return it == t->end() ? Verdict::Accept : it->second.verdict;
}

namespace {

// The operators whose MPS kernels check their arguments in ways CPU's do not
// (or with other texts), or that mps mode treats on their own; looked up once.
struct KernelChecks {
  std::optional<c10::OperatorHandle> isin, isin_out, slow_conv2d, embedding_bag,
      embedding_bag_fwd, index, index_put, index_put_impl, nll_backward, nll_backward_out,
      nll2d_backward, nll2d_backward_out, narrow_copy, convolution, adaptive_avg_pool2d,
      adaptive_avg_pool2d_backward, batch_norm_impl, cdist_backward, sort, sort_out, arange_out,
      range_out, range_out_;
  KernelChecks() {
    auto& d = c10::Dispatcher::singleton();
    isin = d.findOp({"aten::isin", "Tensor_Tensor"});
    isin_out = d.findOp({"aten::isin", "Tensor_Tensor_out"});
    slow_conv2d = d.findOp({"aten::_slow_conv2d_forward", ""});
    embedding_bag = d.findOp({"aten::_embedding_bag", ""});
    embedding_bag_fwd = d.findOp({"aten::_embedding_bag_forward_only", ""});
    index = d.findOp({"aten::index", "Tensor"});
    index_put = d.findOp({"aten::index_put_", ""});
    index_put_impl = d.findOp({"aten::_index_put_impl_", ""});
    nll_backward = d.findOp({"aten::nll_loss_backward", ""});
    nll_backward_out = d.findOp({"aten::nll_loss_backward", "grad_input"});
    nll2d_backward = d.findOp({"aten::nll_loss2d_backward", ""});
    nll2d_backward_out = d.findOp({"aten::nll_loss2d_backward", "grad_input"});
    narrow_copy = d.findOp({"aten::narrow_copy", ""});
    convolution = d.findOp({"aten::convolution_overrideable", ""});
    adaptive_avg_pool2d = d.findOp({"aten::_adaptive_avg_pool2d", ""});
    adaptive_avg_pool2d_backward = d.findOp({"aten::_adaptive_avg_pool2d_backward", ""});
    batch_norm_impl = d.findOp({"aten::_batch_norm_impl_index", ""});
    cdist_backward = d.findOp({"aten::_cdist_backward", ""});
    sort = d.findOp({"aten::sort", "stable"});
    sort_out = d.findOp({"aten::sort", "values_stable"});
    arange_out = d.findOp({"aten::arange", "start_out"});
    range_out = d.findOp({"aten::range", "out"});
    range_out_ = d.findOp({"aten::range", "out_"});
  }
};

const KernelChecks& kernelChecks() {
  static const KernelChecks checks;
  return checks;
}

bool is(const std::optional<c10::OperatorHandle>& h, const c10::OperatorHandle& op) {
  return h && *h == op;
}

std::string schemaName(const c10::OperatorHandle& op) {
  const auto& name = op.operator_name();
  std::string n = name.name.substr(name.name.find("::") + 2);
  if (!name.overload_name.empty()) n += "." + name.overload_name;
  return n;
}

template <void (*Kernel)(const c10::OperatorHandle&, torch::jit::Stack*)>
std::unique_ptr<torch::Library> registerBoxed(c10::DispatchKey key,
                                              const std::vector<std::string>& names) {
  if (names.empty()) return nullptr;
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", key, __FILE__,
                                              __LINE__);
  for (const auto& n : names) {
    lib->impl(n.c_str(), torch::CppFunction::makeFromBoxedFunction<Kernel>());
  }
  return lib;
}

bool isCompositeOnly(const c10::OperatorHandle& op) {
  return !op.hasKernelForDispatchKey(c10::DispatchKey::PrivateUse1) &&
         op.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd);
}

// MPS registers kernels of its own for a few composite operators
// (mps_max_pool2d for max_pool2d), and their dtype refusals sit there, not
// on the operator the composite reaches (max_pool2d_with_indices, which MPS
// runs for bool). ATen's empty-batch batch_norm (_batch_norm_impl_index)
// makes its statistics in toAccumulateType(dtype, device): float32 on MPS.
// While mps mode is on these composites get this kernel, on PrivateUse1 and
// AutogradPrivateUse1 alike: the check, then the composite itself (whose
// operators dispatch, and record autograd, as they would without it).
void runCheckedComposite(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const std::size_t begin = stack->size() - op.schema().arguments().size();
  const at::Tensor* self = nullptr;
  for (std::size_t i = begin; i < stack->size() && self == nullptr; ++i) {
    if ((*stack)[i].isTensor()) self = &(*stack)[i].toTensor();
  }
  if (self != nullptr) checkSelfDtype(op, self->scalar_type());
  const bool device_typed =
      self != nullptr && is(kernelChecks().batch_norm_impl, op) && self->sym_numel() == 0;
  if (device_typed) ++t_device_typed_composite;
  struct Leave {
    bool on;
    ~Leave() {
      if (on) --t_device_typed_composite;
    }
  } leave{device_typed};
  op.callBoxedForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd, *stack);
}

// MPS registers its CPU fallback as the MPS kernel of a few composite
// operators (MPSFallback.mm: linalg_svd, ...), so on a Mac they run whole on
// the CPU, with the warning, where the composite would have reached an
// operator MPS lacks. While mps mode is on, those operators (CpuFallback
// verdict, a composite kernel and no kernel of ours) get the boxed fallback
// as their PrivateUse1 kernel the same way: the fallback warns and runs
// CPU's composite on host views. Autograd then sees a backend kernel and no
// derivative, as on MPS. The composites with MPS's checks (above) get
// runCheckedComposite. Removed when the mode goes off.
void registerMpsKernels(bool mps) {
  if (!mps) {
    g_mps_kernels.reset();
    g_composite_kernels.reset();
    g_composite_autograd.reset();
    return;
  }
  if (g_mps_kernels || g_composite_kernels) return;
  const Table* table = g_table.load(std::memory_order_acquire);
  if (table == nullptr) return;
  std::vector<std::string> fallback, checked;
  for (const auto& [op, v] : *table) {
    if (v.verdict == Verdict::CpuFallback && isCompositeOnly(op)) {
      fallback.push_back(schemaName(op));
    }
  }
  if (const DtypeTable* dtypes = g_dtypes.load(std::memory_order_acquire)) {
    for (const auto& [op, refusals] : *dtypes) {
      if (isCompositeOnly(op)) checked.push_back(schemaName(op));
    }
  }
  if (const auto& op = kernelChecks().batch_norm_impl; op && isCompositeOnly(*op)) {
    checked.push_back(schemaName(*op));
  }
  g_mps_kernels = registerBoxed<&runFallback>(c10::DispatchKey::PrivateUse1, fallback);
  g_composite_kernels =
      registerBoxed<&runCheckedComposite>(c10::DispatchKey::PrivateUse1, checked);
  g_composite_autograd =
      registerBoxed<&runCheckedComposite>(c10::DispatchKey::AutogradPrivateUse1, checked);
}

} // namespace

void setMode(bool mps) {
  std::lock_guard<std::mutex> lock(g_mode_mu);
  applyFidelityWatermarks(mps);
  if (!mps) runtime::fidelity::setMode(runtime::fidelity::Mode::Off);
  registerMpsKernels(mps);
  if (mps) runtime::fidelity::setMode(runtime::fidelity::Mode::Mps);
}

void setOptions(bool cpu_fallback, bool record) {
  runtime::fidelity::setOptions({cpu_fallback, record});
}

void setRecorder(Recorder recorder) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_recorder = std::move(recorder);
}

void setAllowance(Allowance allowance) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_allowance = std::move(allowance);
}

Verdict checkOperator(const c10::OperatorHandle& op) {
  Verdict v = verdictOf(op);
  if (v == Verdict::Accept) return v;
  auto options = runtime::fidelity::options();
  if (options.record) {
    record(v == Verdict::Refuse ? "operator" : "cpu", "", shownName(op));
    return v;
  }
  if (v == Verdict::Refuse && !options.cpu_fallback) refuse(shownName(op));
  warnOnce(op);
  return v;
}

void checkOperator(const char* name, const char* overload) {
  auto op = c10::Dispatcher::singleton().findOp({name, overload});
  if (op) checkOperator(*op);
}

namespace {

constexpr auto kDev = c10::DeviceType::PrivateUse1;

// A tensor's type as ATen's convolution check prints it, for an MPS tensor
// where mps_ext's is on the device ("MPSFloatType", "torch.FloatTensor").
std::string convolutionTypeName(const at::Tensor& t) {
  if (t.device().type() != kDev) return t.toString();
  return std::string("MPS") + c10::toString(t.scalar_type()) + "Type";
}

const at::Tensor* tensorAt(const torch::jit::Stack& stack, std::size_t i) {
  if (i >= stack.size() || !stack[i].isTensor()) return nullptr;
  const at::Tensor& t = stack[i].toTensor();
  return t.defined() ? &t : nullptr;
}

// torch 2.13's MPS arange and range (RangeFactories.mm) hand start and step to
// their graph as scalars of the result's dtype (getMPSScalar, Scalar::to<T>),
// which refuses a value the dtype cannot hold: "value cannot be converted to
// type uint8_t without overflow" for arange(-8.001, -4.0, dtype=torch.uint8)
// (common_mps: ON_MPS_XFAILLIST arange uint8). CPU computes in its
// accumulate type and wraps. MPS converts after the size checks both share,
// and only for a non-empty result.
// arange.start_out(start, end, step, out) / range.out(...) / range.out_(start, end, out)
void checkRangeScalars(const torch::jit::Stack& stack, std::size_t begin, bool arange,
                       bool has_step) {
  const c10::Scalar start = stack[begin].toScalar();
  const c10::Scalar end = stack[begin + 1].toScalar();
  const c10::Scalar step = has_step ? stack[begin + 2].toScalar() : c10::Scalar(1);
  const at::Tensor* out = tensorAt(stack, begin + (has_step ? 3 : 2));
  if (!out || start.isComplex() || end.isComplex() || step.isComplex()) return;
  const double s = start.toDouble(), e = end.toDouble(), d = step.toDouble();
  if (d == 0 || !std::isfinite(s) || !std::isfinite(e) || !std::isfinite(d)) return;
  const double size = arange ? std::ceil((e - s) / d) : (e - s) / d + 1;
  if (!(size >= 1)) return;  // empty, or CPU's bounds error
  auto convert = [&](auto zero) {
    using T = decltype(zero);
    (void)start.to<T>();
    (void)step.to<T>();
  };
  switch (out->scalar_type()) {
    case at::kFloat:
    case at::kDouble: convert(float{}); break;
    case at::kHalf: convert(at::Half{}); break;
    case at::kBFloat16: convert(at::BFloat16{}); break;
    case at::kLong: convert(int64_t{}); break;
    case at::kInt: convert(int{}); break;
    case at::kShort: convert(int16_t{}); break;
    case at::kChar: convert(int8_t{}); break;
    case at::kByte: convert(uint8_t{}); break;
    case at::kBool: convert(bool{}); break;
    default: break;
  }
}

} // namespace

void checkKernelArguments(const c10::OperatorHandle& op, const torch::jit::Stack& stack,
                          std::size_t begin) {
  const KernelChecks& k = kernelChecks();
  if (is(k.arange_out, op) || is(k.range_out, op) || is(k.range_out_, op)) {
    checkRangeScalars(stack, begin, is(k.arange_out, op), !is(k.range_out_, op));
    return;
  }
  if (is(k.isin, op) || is(k.isin_out, op)) {
    // isin_Tensor_Tensor_out_mps (operations/TensorCompare.mm) runs for either
    // argument on MPS and checks both.
    const at::Tensor* elements = tensorAt(stack, begin);
    const at::Tensor* test = tensorAt(stack, begin + 1);
    if (elements && test) {
      TORCH_CHECK(elements->device().type() == kDev && test->device().type() == kDev,
                  "Expected elements.is_mps() && test_elements.is_mps(), got ",
                  elements->device(), " and ", test->device());
    }
  } else if (is(k.convolution, op)) {
    // On MPS, convolution selects its own backend and checks input, weight
    // and bias for one type (ATen's check_input_same_type_as_parameters);
    // PrivateUse1's convolution_overrideable is reached without that check.
    const at::Tensor* input = tensorAt(stack, begin);
    const at::Tensor* weight = tensorAt(stack, begin + 1);
    const at::Tensor* bias = tensorAt(stack, begin + 2);
    if (input && weight) {
      TORCH_CHECK(input->options().type_equal(weight->options()), "Input type (",
                  convolutionTypeName(*input), ") and weight type (", convolutionTypeName(*weight),
                  ") should be the same");
    }
    if (input && bias) {
      TORCH_CHECK(input->options().type_equal(bias->options()), "Input type (",
                  convolutionTypeName(*input), ") and bias type (", convolutionTypeName(*bias),
                  ") should be the same");
    }
  } else if (is(k.slow_conv2d, op)) {
    // MPSFallback.mm registers slow_conv2d_forward_mps, reached only when one
    // of input and weight is on the CPU (convolution picks CPU's slow path
    // for a CPU input): it names the devices.
    const at::Tensor* self = tensorAt(stack, begin);
    const at::Tensor* weight = tensorAt(stack, begin + 1);
    if (self && weight && self->device() != weight->device()) {
      TORCH_CHECK(false, "slow_conv2d_forward_mps: input(device='", self->device(),
                  "') and weight(device=", weight->device(), "')  must be on the same device");
    }
  } else if (is(k.embedding_bag, op) || is(k.embedding_bag_fwd, op)) {
    // MPS's embedding_bag kernel checks each index on the device and reports
    // through the stream's error buffer: torch.AcceleratorError at the next
    // synchronization. Here: at the call, before CPU's own check.
    const at::Tensor* weight = tensorAt(stack, begin);
    const at::Tensor* indices = tensorAt(stack, begin + 1);
    if (weight && indices && weight->dim() == 2 && indices->numel() > 0 &&
        at::isIntegralType(indices->scalar_type(), /*includeBool=*/false)) {
      const int64_t rows = weight->size(0);
      const at::Tensor flat = indices->to(at::kCPU, at::kLong).reshape({-1}).contiguous();
      const int64_t* data = flat.const_data_ptr<int64_t>();
      for (int64_t i = 0; i < flat.numel(); ++i) {
        if (data[i] < 0 || data[i] >= rows) {
          std::ostringstream os;
          os << "Index " << i << " is out of bounds: " << data[i] << ", range 0 to " << rows;
          throw c10::AcceleratorError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, 1,
                                      os.str());
        }
      }
    }
  }
}

// MPS's index_put kernel writes every element in parallel: with duplicate
// indices and accumulate=False, which write survives is undefined (a Mac
// keeps some other than the last; under use_deterministic_algorithms(True)
// the last). CPU's kernel writes in order, so the last one wins. mps mode
// applies the writes in reverse order, so the first one wins: code that
// counts on the last write fails here as it can on a Mac. Masks (bool
// indices) never repeat an element and are left as they are.
// (self, indices, values, accumulate, unsafe)
void reverseIndexPutWrites(torch::jit::Stack& stack, std::size_t begin) {
  if (stack[begin + 3].toBool() || at::globalContext().deterministicAlgorithms()) return;
  const at::Tensor& self = stack[begin].toTensor();
  // A list of optional tensors (TorchScript passes it as a generic list).
  c10::List<std::optional<at::Tensor>> indices;
  for (const c10::IValue& e : stack[begin + 1].toListRef()) {
    indices.push_back(e.isNone() ? std::nullopt : std::optional<at::Tensor>(e.toTensor()));
  }
  std::vector<int64_t> dims;
  at::DimVector shape_b;  // the indices broadcast together
  for (std::size_t i = 0; i < indices.size(); ++i) {
    const std::optional<at::Tensor> t = indices.get(i);
    if (!t.has_value() || !t->defined()) continue;
    if (t->scalar_type() == at::kBool || t->scalar_type() == at::kByte) return;
    dims.push_back(static_cast<int64_t>(i));
    shape_b = dims.size() == 1 ? at::DimVector(t->sizes()) : at::infer_size_dimvector(shape_b, t->sizes());
  }
  if (dims.empty() || shape_b.empty()) return;
  // Where the broadcast index dimensions sit in the indexed result: in place
  // of adjacent indexed dimensions, else first (NumPy's rule).
  const bool adjacent = dims.back() - dims.front() + 1 == static_cast<int64_t>(dims.size());
  const int64_t at_b = adjacent ? dims.front() : 0;
  at::DimVector shape;
  for (int64_t d = 0; d < self.dim(); ++d) {
    if (d == at_b) shape.append(shape_b.begin(), shape_b.end());
    if (std::find(dims.begin(), dims.end(), d) == dims.end()) shape.push_back(self.size(d));
  }
  const at::Tensor& values = stack[begin + 2].toTensor();
  // One value for every write (a scalar, perhaps a CPU one) has no order;
  // arguments CPU refuses keep CPU's error.
  if (values.dim() == 0 || values.device() != self.device() || dims.back() >= self.dim() ||
      !at::is_expandable_to(values.sizes(), shape)) {
    return;
  }
  std::vector<int64_t> flip_b(shape_b.size()), flip_v(shape_b.size());
  for (std::size_t i = 0; i < shape_b.size(); ++i) {
    flip_b[i] = static_cast<int64_t>(i);
    flip_v[i] = at_b + static_cast<int64_t>(i);
  }
  for (int64_t d : dims) {
    indices.set(d, indices.get(d)->expand(shape_b).flip(flip_b));
  }
  stack[begin + 1] = std::move(indices);
  stack[begin + 2] = values.expand(shape).flip(flip_v);
}

void adaptWidenedArguments(const c10::OperatorHandle& op, std::vector<c10::IValue>& args) {
  if (is(kernelChecks().cdist_backward, op)) {
    // _cdist_backward(grad, x1, x2, p, cdist) takes the forward's result,
    // rounded to the low dtype: the float32 backward needs the float32
    // forward (p=inf picks the elements whose distance equals it; p=2
    // divides by it), as MPS's kernel, computing in the low dtype
    // throughout, finds its own rounded values equal.
    args[4] = at::_cdist_forward(args[1].toTensor(), args[2].toTensor(), args[3].toDouble(),
                                 std::nullopt);
  }
}

void adaptKernelArguments(const c10::OperatorHandle& op, torch::jit::Stack& stack,
                          std::size_t begin) {
  const KernelChecks& k = kernelChecks();
  if (is(k.index_put_impl, op)) {
    reverseIndexPutWrites(stack, begin);
    return;
  }
  if (is(k.nll_backward, op) || is(k.nll_backward_out, op) || is(k.nll2d_backward, op) ||
      is(k.nll2d_backward_out, op)) {
    // (grad_output, self, target, weight, reduction, ignore_index, total_weight[, grad_input])
    const at::Tensor* self = tensorAt(stack, begin + 1);
    const at::Tensor* total = tensorAt(stack, begin + 6);
    if (self && total && total->scalar_type() != self->scalar_type() &&
        at::isFloatingType(self->scalar_type()) && at::isFloatingType(total->scalar_type())) {
      stack[begin + 6] = total->to(self->scalar_type());
    }
  }
}

void checkKernelShapes(const c10::OperatorHandle& op, const torch::jit::Stack& stack,
                       std::size_t begin) {
  const KernelChecks& k = kernelChecks();
  // MPS's transposed convolution has no 3-D half kernel (Convolution.mm,
  // _mps_convolution_transpose). convolution_overrideable(input, weight,
  // bias, stride, padding, dilation, transposed, ...).
  if (is(k.convolution, op) && stack[begin + 6].toBool()) {
    const at::Tensor& input = stack[begin].toTensor();
    if (input.dim() == 5 && (input.scalar_type() == at::kHalf ||
                             input.scalar_type() == at::kBFloat16)) {
      refuseKernel(op, input.scalar_type(),
                   "ConvTranspose 3D with BF16 or FP16 types is not supported on MPS");
    }
    return;
  }
  // MPS's adaptive average pooling is avg_pool2d with one kernel size and
  // stride: sizes that do not divide each other are NotImplementedError
  // (AdaptivePooling.mm, set_kernel_params), forward and backward.
  int64_t ih = 0, iw = 0, oh = 0, ow = 0;
  const at::Tensor* input = nullptr;
  if (is(k.adaptive_avg_pool2d, op)) {  // (self, output_size)
    input = &stack[begin].toTensor();
    auto out = stack[begin + 1].toIntVector();
    if (out.size() != 2) return;
    oh = out[0];
    ow = out[1];
  } else if (is(k.adaptive_avg_pool2d_backward, op)) {  // (grad_output, self)
    const at::Tensor& grad = stack[begin].toTensor();
    input = &stack[begin + 1].toTensor();
    if (grad.dim() < 2) return;
    oh = grad.size(-2);
    ow = grad.size(-1);
  } else {
    return;
  }
  if (input->dim() < 3) return;  // CPU's own checks speak first
  for (int64_t i = 1; i < input->dim(); ++i) {
    if (input->size(i) == 0) return;
  }
  ih = input->size(-2);
  iw = input->size(-1);
  if (oh <= 0 || ow <= 0) return;
  const char* tail =
      " Non-divisible input sizes are not implemented on MPS device yet. For now, you can "
      "manually transfer tensor to cpu in this case. Please refer to [this "
      "issue](https://github.com/pytorch/pytorch/issues/96056)";
  if (!((ih >= oh && iw >= ow) || (ih <= oh && iw <= ow))) {
    refuseKernel(op, input->scalar_type(),
                 "Adaptive pool MPS: Input height and width must both be greater than, "
                 "or equal to, or lesser than output height and width",
                 /*not_implemented=*/true);
  } else if (ih >= oh && (ih % oh != 0 || iw % ow != 0)) {
    refuseKernel(op, input->scalar_type(),
                 std::string("Adaptive pool MPS: input sizes must be divisible by output sizes.") +
                     tail,
                 /*not_implemented=*/true);
  } else if (ih < oh && (oh % ih != 0 || ow % iw != 0)) {
    refuseKernel(op, input->scalar_type(),
                 std::string("Adaptive pool MPS: output sizes must be divisible by input sizes.") +
                     tail,
                 /*not_implemented=*/true);
  }
}

namespace {

// MPS's sort is not stable unless asked to be: equal elements come out in an
// order of its own (common_mps's ON_MPS_XFAILLIST: argsort and sort fail for
// the dtypes whose samples have ties, "undefined behaviour"). CPU's kernel
// keeps them in input order, which hides code that counts on it. Unless
// `stable=True`, mps mode gives ties in reverse input order: a stable sort of
// the input flipped along `dim`, its indices mapped back. Every dtype: MPS's
// sort is the same for all, only the samples of int8, uint8, bool, float16
// and bfloat16 repeat values.
// sort.stable(self, stable, dim, descending[, values, indices])
bool sortTiesReversed(torch::jit::Stack& stack, std::size_t begin, bool out) {
  if (stack[begin + 1].toOptional<bool>().value_or(false)) return false;
  const at::Tensor self = stack[begin].toTensor();
  if (self.dim() == 0) return false;
  const int64_t dim = at::maybe_wrap_dim(stack[begin + 2].toInt(), self.dim());
  const bool descending = stack[begin + 3].toBool();
  const at::Tensor flipped = self.flip(dim);
  at::Tensor values, indices;
  if (out) {
    values = stack[begin + 4].toTensor();
    indices = stack[begin + 5].toTensor();
    at::sort_out(values, indices, flipped, /*stable=*/true, dim, descending);
  } else {
    std::tie(values, indices) = at::sort(flipped, /*stable=*/true, dim, descending);
  }
  indices.neg_().add_(self.size(dim) - 1);
  stack.resize(begin);
  stack.emplace_back(std::move(values));
  stack.emplace_back(std::move(indices));
  return true;
}

} // namespace

bool runAsMpsDoes(const c10::OperatorHandle& op, torch::jit::Stack& stack, std::size_t begin) {
  const KernelChecks& k = kernelChecks();
  if (is(k.sort, op)) return sortTiesReversed(stack, begin, /*out=*/false);
  if (is(k.sort_out, op)) return sortTiesReversed(stack, begin, /*out=*/true);
  if (is(k.narrow_copy, op)) {
    // narrow_copy has no MPS kernel: a Mac runs its
    // CompositeExplicitAutogradNonFunctional one, narrow() and a clone, with
    // narrow's checks (IndexError for the dimension and start, a negative
    // length refused) where CPU's kernel asserts its own.
    const at::Tensor self = stack[begin].toTensor();
    const int64_t dim = stack[begin + 1].toInt();
    const c10::SymInt start = stack[begin + 2].toSymInt();
    const c10::SymInt length = stack[begin + 3].toSymInt();
    at::Tensor out = self.narrow_symint(dim, start, length).clone(at::MemoryFormat::Contiguous);
    stack.resize(begin);
    stack.emplace_back(std::move(out));
    return true;
  }
  return false;
}

bool indexErrorIsDeferred(const c10::OperatorHandle& op) {
  const KernelChecks& k = kernelChecks();
  return is(k.index, op) || is(k.index_put, op) || is(k.index_put_impl, op);
}

void checkOperandDtype(at::ScalarType t, const c10::OperatorHandle* op) {
  if (!wideDtype(t) || excused()) return;
  if (recording()) {
    record("dtype", dtypeName(t), op ? nameOf(*op) : std::string());
    return;
  }
  TORCH_CHECK_TYPE(false, t == at::kDouble ? kDoubleOperand : kComplexDoubleOperand);
}

void checkNewTensor(at::ScalarType t) {
  if (t != at::kDouble) return;  // MPS creates complex128 tensors (EmptyTensor.cpp)
  if (excused()) return;
  if (recording()) {
    record("dtype", dtypeName(t), "tensor creation");
    return;
  }
  TORCH_CHECK_TYPE(false, kDoubleNew);
}

void checkConversion(at::ScalarType from, at::ScalarType to, bool to_device) {
  if (to_device && to == at::kDouble && !wideDtype(from)) return;
  if ((!wideDtype(from) && !wideDtype(to)) || excused()) return;
  at::ScalarType wide = wideDtype(to) ? to : from;
  if (recording()) {
    record("dtype", dtypeName(wide), "conversion");
    return;
  }
  if (to == at::kDouble) TORCH_CHECK_TYPE(false, kDoubleNew);
  TORCH_CHECK_TYPE(false, wide == at::kDouble ? kDoubleOperand : kComplexDoubleOperand);
}

} // namespace torch_mps_ext::fidelity
