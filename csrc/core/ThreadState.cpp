// Layer 2: per-thread set-up on first device use (ThreadState.h).
#include "core/ThreadState.h"

#include <c10/core/AutogradState.h>
#include <c10/macros/Macros.h>

#include <atomic>

namespace torch_mps_ext {
namespace {

std::atomic<bool> g_backward_on_caller{false};
thread_local bool t_seen = false;

} // namespace

void setBackwardOnCallingThread(bool on) {
  g_backward_on_caller.store(on, std::memory_order_relaxed);
}

void noteDeviceThread() {
  if (C10_LIKELY(t_seen)) return;
  t_seen = true;
  if (g_backward_on_caller.load(std::memory_order_relaxed)) {
    c10::AutogradState::get_tls_state().set_multithreading_enabled(false);
  }
}

} // namespace torch_mps_ext
