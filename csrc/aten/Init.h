// Layer 3: bringing the backend up, layer by layer, in order.
#pragma once

namespace torch_mps_ext {

// Reads and validates the native settings (runtime), registers the device
// allocator and PrivateUse1 hooks (core), then this layer's registrations
// that must follow every static one (the fallback's CPU preferences).
// Throws std::invalid_argument for a bad setting; retried on the next call.
// Nothing here changes what a CPU-only program does: the CPU allocator is
// wrapped on the first CPU kernel run on device memory (HostView.cpp), and
// autograd's per-thread choice on a thread's first device allocation
// (core/ThreadState.h).
void initialize();

} // namespace torch_mps_ext
