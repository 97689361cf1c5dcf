// Layer 1: the fidelity mode's switch (Fidelity.h).
#include "runtime/Fidelity.h"

namespace torch_mps_ext::runtime::fidelity {

namespace detail {
std::atomic<int> mode{0};
} // namespace detail

namespace {
std::atomic<bool> cpu_fallback{false};
std::atomic<bool> record{false};
} // namespace

void setMode(Mode m) noexcept {
  detail::mode.store(static_cast<int>(m), std::memory_order_release);
}

Options options() noexcept {
  return {cpu_fallback.load(std::memory_order_acquire), record.load(std::memory_order_acquire)};
}

void setOptions(Options o) noexcept {
  cpu_fallback.store(o.cpu_fallback, std::memory_order_release);
  record.store(o.record, std::memory_order_release);
}

} // namespace torch_mps_ext::runtime::fidelity
