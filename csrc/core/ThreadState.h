// Layer 2: what a host thread takes on when it first uses an mps_ext device.
//
// Backward passes of mps_ext graphs run on the thread that calls backward
// (torch_mps_ext/_autograd.py says why): torch's autograd engine keeps that
// choice per thread (AutogradState's multithreading flag), so each thread
// gets it when it first allocates device memory, not at import: a program
// that never uses the device, or a thread that does not, keeps torch's
// defaults.
#pragma once

namespace torch_mps_ext {

// Set once at import from TORCH_MPS_EXT_AUTOGRAD_DEVICE_THREAD (false keeps
// torch's per-device autograd threads).
void setBackwardOnCallingThread(bool on);

// Called on every device allocation; does its work once per thread (one
// thread-local load after that).
void noteDeviceThread();

} // namespace torch_mps_ext
