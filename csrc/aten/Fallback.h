// Layer 3: the zero-copy boxed fallback (Fallback.cpp), for kernels of this
// layer that take the general path when their fast path does not apply.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <vector>

namespace torch_mps_ext {

void runFallback(const c10::OperatorHandle& op, std::vector<c10::IValue>* stack);

// The same, running the CPU kernel registered for `cpu_key` (SparseCPU,
// SparseCsrCPU: the sparse fallbacks of SparseFallback.cpp).
void runFallbackAt(const c10::OperatorHandle& op, std::vector<c10::IValue>* stack,
                   c10::DispatchKey cpu_key);

// Registers the fallback for the ops with both a CPU and a
// CompositeExplicitAutograd kernel (and the few listed in Fallback.cpp).
// Once, after static registration (initialize() in Init.h).
void preferCpuKernels();

} // namespace torch_mps_ext
