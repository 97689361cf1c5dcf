// Layer 1: faults inside device code become device errors.
//
// On a GPU a kernel that dereferences a bad pointer, divides an integer by
// zero or runs away is an error of the device; the host process lives on.
// Kernels here run on host threads, so such a fault is a signal on that
// thread. runGuarded() runs device code so that SIGSEGV, SIGBUS, SIGFPE and
// SIGILL raised by it (and the kernel watchdog's timeout) abandon the code and
// come back as an error text, while the same signals anywhere else keep
// their previous disposition (Python's faulthandler, the default action).
// Guarded code runs on an alternate signal stack, so a stack overflow is
// caught too. What the abandoned code had written stays as it was, as on a
// GPU.
//
// The watchdog: TORCH_MPS_EXT_KERNEL_TIMEOUT_S (seconds, 0 = off, the
// default) bounds each guarded run; a run over it is stopped the same way.
#pragma once

#include <functional>
#include <string>

namespace torch_mps_ext::runtime {

// Runs fn(); returns true if it completed. On a fault or a timeout returns
// false with a description ("SIGSEGV (invalid memory access) at address
// 0x...", "ran longer than TORCH_MPS_EXT_KERNEL_TIMEOUT_S=2") in *what.
// Nests: an inner guarded run handles its own faults.
bool runGuarded(const std::function<void()>& fn, std::string* what);

} // namespace torch_mps_ext::runtime
