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

#include <caffe2/core/common.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

namespace torch_mps_ext::fidelity {
namespace {

using Table = std::unordered_map<c10::OperatorHandle, Verdict>;

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
std::unique_ptr<torch::Library> g_mps_kernels;
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

bool excused() {
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

void warnOnce(const c10::OperatorHandle& op) {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (!g_warned.insert(op).second) return;
  }
  // Verbatim: MPS's text, without the "(Triggered internally at <file>)"
  // that would name this file where a Mac names MPSFallback.mm.
  c10::warn(c10::Warning(
      c10::UserWarning(), {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
      "The operator '" + nameOf(op) +
          "' is not currently supported on the MPS backend and will fall back to run on "
          "the CPU. This may have performance implications.",
      /*verbatim=*/true));
}

const char* dtypeName(at::ScalarType t) {
  return t == at::kDouble ? "float64" : "complex128";
}

} // namespace

void setOperatorVerdicts(const std::vector<std::pair<std::string, int>>& verdicts) {
  auto table = std::make_unique<Table>();
  auto& d = c10::Dispatcher::singleton();
  for (const auto& [full, v] : verdicts) {
    auto dot = full.find('.');
    c10::OperatorName name{full.substr(0, dot),
                           dot == std::string::npos ? "" : full.substr(dot + 1)};
    if (auto op = d.findOp(name)) {
      TORCH_CHECK(v >= 0 && v <= 2, "bad fidelity verdict ", v, " for ", full);
      (*table)[*op] = static_cast<Verdict>(v);
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
  return it == t->end() ? Verdict::Accept : it->second;
}

namespace {

// MPS registers its CPU fallback as the MPS kernel of a few composite
// operators (MPSFallback.mm: linalg_svd, ...), so on a Mac they run whole on
// the CPU, with the warning, where the composite would have reached an
// operator MPS lacks. While mps mode is on, those operators (CpuFallback
// verdict, a composite kernel and no kernel of ours) get the boxed fallback
// as their PrivateUse1 kernel the same way: the fallback warns and runs
// CPU's composite on host views. Autograd then sees a backend kernel and no
// derivative, as on MPS. Removed when the mode goes off.
void registerMpsKernels(bool mps) {
  if (!mps) {
    g_mps_kernels.reset();
    return;
  }
  if (g_mps_kernels) return;
  const Table* table = g_table.load(std::memory_order_acquire);
  if (table == nullptr) return;
  std::vector<std::string> names;
  for (const auto& [op, v] : *table) {
    if (v == Verdict::CpuFallback &&
        !op.hasKernelForDispatchKey(c10::DispatchKey::PrivateUse1) &&
        op.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd)) {
      const auto& name = op.operator_name();
      std::string n = name.name.substr(name.name.find("::") + 2);
      if (!name.overload_name.empty()) n += "." + name.overload_name;
      names.push_back(std::move(n));
    }
  }
  if (names.empty()) return;
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "aten",
                                              c10::DispatchKey::PrivateUse1, __FILE__, __LINE__);
  for (const auto& n : names) {
    lib->impl(n.c_str(), torch::CppFunction::makeFromBoxedFunction<&runFallback>());
  }
  g_mps_kernels = std::move(lib);
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
    record(v == Verdict::Refuse ? "operator" : "cpu", "", nameOf(op));
    return v;
  }
  if (v == Verdict::Refuse && !options.cpu_fallback) refuse(nameOf(op));
  warnOnce(op);
  return v;
}

void checkOperator(const char* name, const char* overload) {
  auto op = c10::Dispatcher::singleton().findOp({name, overload});
  if (op) checkOperator(*op);
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
