// Layer 1: the MPS fidelity mode's process-wide switch (docs/fidelity.md).
//
// In "mps" mode the device refuses what Apple's MPS backend refuses (float64
// tensors, operators without an MPS kernel) with MPS's texts, and its memory
// limit follows MPS's variables. The layers above ask `on()` where they
// check something: a single relaxed atomic load, so the default mode costs
// nothing else. The rest of the state is read only once the mode is on.
#pragma once

#include <atomic>

namespace torch_mps_ext::runtime::fidelity {

enum class Mode : int { Off = 0, Mps = 1 };

namespace detail {
extern std::atomic<int> mode;
} // namespace detail

inline bool on() noexcept {
  return detail::mode.load(std::memory_order_relaxed) != 0;
}

inline Mode mode() noexcept {
  return static_cast<Mode>(detail::mode.load(std::memory_order_acquire));
}

// Only aten/Fidelity.cpp calls this (after the operator table and the
// allocator's limits are in place).
void setMode(Mode m) noexcept;

// What mps mode does with an incompatibility.
struct Options {
  // PYTORCH_ENABLE_MPS_FALLBACK=1: operators without an MPS kernel run
  // (on the CPU, as MPS's fallback does) with a once-per-operator warning.
  bool cpu_fallback = false;
  // The compatibility report (python -m torch_mps_ext.fidelity): every
  // incompatibility is recorded instead of raised or warned about.
  bool record = false;
};

Options options() noexcept;
void setOptions(Options o) noexcept;

} // namespace torch_mps_ext::runtime::fidelity
