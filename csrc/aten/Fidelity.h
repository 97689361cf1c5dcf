// Layer 3: the checks of MPS fidelity mode (docs/fidelity.md).
//
// In mps mode, what Apple's MPS backend refuses is refused here with MPS's
// error type and text (or, for the compatibility report, recorded):
//   - operators without an MPS kernel (the verdicts torch_mps_ext/fidelity
//     derives from torch's operator table): NotImplementedError, or with
//     PYTORCH_ENABLE_MPS_FALLBACK=1 a UserWarning once per operator;
//   - float64 tensors created on the device, and float64/complex128
//     operands of a computation: TypeError.
// Every call site asks runtime::fidelity::on() first (one relaxed load);
// nothing here runs in the default mode.
#pragma once

#include "runtime/Fidelity.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/ScalarType.h>

#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace torch_mps_ext::fidelity {

using runtime::fidelity::on;

enum class Verdict : int {
  Accept = 0,       // MPS has a kernel (every operator not listed)
  Refuse = 1,       // no MPS kernel: MPS's error fallback (or CPU fallback)
  CpuFallback = 2,  // MPS always runs it on the CPU, with the fallback warning
};

// Replaces the table of operators MPS does not run itself: ("aten::name" or
// "aten::name.overload", Verdict, the name MPS's error and warning print, or
// "" for the operator's own). A Mac names another operator where a composite
// kernel runs first: the functional variant of a structured operator runs its
// generated CompositeExplicitAutogradNonFunctional kernel, which calls the out
// variant (`_linalg_svd` -> 'aten::_linalg_svd.U'); mps_ext's fallback gets
// the functional itself. Names this torch does not register are ignored. Set
// before the mode is turned on.
void setOperatorVerdicts(const std::vector<std::tuple<std::string, int, std::string>>& verdicts);
Verdict verdictOf(const c10::OperatorHandle& op);

// Replaces the per-dtype refusals (issue 23; torch_mps_ext/fidelity/
// _commonmps.py, mps_kernel_dtypes.txt): ("aten::name.overload", dtype codes
// (c10::ScalarType), text, verbatim) for operators MPS has a kernel for that
// refuses those dtypes of its first tensor argument. verbatim: the text is
// MPS's own message (RuntimeError); otherwise it is the reason in our message
// (common_mps's UNIMPLEMENTED_XFAILLIST). An operator may have several.
void setDtypeRefusals(
    const std::vector<std::tuple<std::string, std::vector<int>, std::string, bool>>& refusals);
// An operator MPS runs itself, about to run with `self` (its first tensor
// argument; undefined if none) of that dtype: refused (or recorded) if listed.
void checkSelfDtype(const c10::OperatorHandle& op, at::ScalarType self);
// An MPS kernel's refusal found by the caller (a dtype with a shape, or a
// shape): raises `message` (RuntimeError, or NotImplementedError where MPS
// raises that), or records it in report mode as a refusal of that dtype.
void refuseKernel(const c10::OperatorHandle& op, at::ScalarType dtype, const std::string& message,
                  bool not_implemented = false);

// Turns mps mode on or off: the allocator's limits, then the switch.
void setMode(bool mps);
void setOptions(bool cpu_fallback, bool record);

// Where the report's records go: (kind, what, operator), kind one of
// "operator" (no MPS kernel), "cpu" (MPS runs it on the CPU), "dtype"
// (what: "float64" or "complex128"; operator: the op, or "" if unknown).
using Recorder =
    std::function<void(const std::string&, const std::string&, const std::string&)>;
void setRecorder(Recorder recorder);

// Asked before a dtype is refused or recorded: true when the code that
// computes it is one of torch's own that takes another branch on MPS
// (printing, GradScaler: `device.type == "mps"` checks), so the float64
// would not exist on a Mac. Unset: nothing is excused.
using Allowance = std::function<bool()>;
void setAllowance(Allowance allowance);

inline bool wideDtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kComplexDouble;
}

// For an operator MPS runs itself, after its dtype refusals: what MPS's kernel
// refuses for its arguments' shapes (3-D half transposed convolution,
// adaptive average pooling over sizes that do not divide), with its texts.
void checkKernelShapes(const c10::OperatorHandle& op, const torch::jit::Stack& stack,
                       std::size_t begin);

// The checks; call them only when on().
// An operator about to run on the device. Returns its verdict after acting
// on it (raised, warned, recorded); operands are MPS's to check only when
// Accept (with the CPU fallback, MPS computes on the CPU).
Verdict checkOperator(const c10::OperatorHandle& op);
// The same for a native kernel of this backend, by schema name.
void checkOperator(const char* name, const char* overload);
// The argument checks of MPS's kernels that run before anything else, with
// MPS's texts (mixed devices: isin, _slow_conv2d_forward; embedding_bag's
// index range, found inside the kernel on MPS: torch.AcceleratorError).
// `stack[begin..]` are the operator's arguments.
void checkKernelArguments(const c10::OperatorHandle& op, const torch::jit::Stack& stack,
                          std::size_t begin);
// Where MPS's kernel accepts arguments CPU's refuses and the difference is
// only a dtype CPU wants converted: converts them in `stack` (nll_loss's
// backward with a float32 total_weight for float16/bfloat16 input; MPS
// casts it inside its graph, CPU's kernel requires the input's dtype).
void adaptKernelArguments(const c10::OperatorHandle& op, torch::jit::Stack& stack,
                          std::size_t begin);
// The widened (float32) rerun of an operator whose arguments carry a result
// already rounded to the low dtype: recomputed in float32 in `args`
// (_cdist_backward's forward result).
void adaptWidenedArguments(const c10::OperatorHandle& op, std::vector<c10::IValue>& args);
// Operators whose MPS behaviour CPU's kernel does not give, run in mps mode
// as a Mac runs them: narrow_copy, which a Mac runs through its composite
// kernel (MPS has none of its own) whose argument checks differ from CPU's
// kernel (narrow, then a contiguous clone); sort without `stable=True`, whose
// ties MPS orders otherwise than CPU (reverse input order here). Returns true
// when it ran `op` (results on the stack in place of the arguments).
bool runAsMpsDoes(const c10::OperatorHandle& op, torch::jit::Stack& stack, std::size_t begin);
// CPU's IndexError from an indexing operator whose MPS kernel finds the bad
// index on the device (index.Tensor, index_put): on MPS a
// torch.AcceleratorError with the same text (raised at the next
// synchronization there, at the call here). Returns whether `op` is one.
bool indexErrorIsDeferred(const c10::OperatorHandle& op);
// A float64/complex128 operand that `op` (may be null) computes on.
void checkOperandDtype(at::ScalarType t, const c10::OperatorHandle* op);
// A tensor of dtype `t` created on the device (empty, empty_strided).
void checkNewTensor(at::ScalarType t);
// A copy from a device tensor converting `from` to `to` (computed on the
// device on MPS). A float64 device destination is not judged again: its
// creation was.
void checkConversion(at::ScalarType from, at::ScalarType to, bool to_device);

} // namespace torch_mps_ext::fidelity
