// Layer 3: a compute-kernel launch as a device command.
//
// compile_shader's kernels (and load_metallib's, and the Metal kernels
// torch.compile generates) are compiled host functions that run a range of a
// grid's threadgroups. A launch is queued on the current stream of its
// device and returns at once, as a Metal dispatch does; the stream's worker
// runs the threadgroups across torch's intra-op threads, in stream order with
// the rest of the device's work (docs/shaders.md, "Execution").
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace torch_mps_ext {

// entry(block, grid, group, first_group, end_group): runs threadgroups
// [first_group, end_group) of the launch.
using KernelEntry = void (*)(const void*, const std::uint32_t*, const std::uint32_t*,
                             std::uint64_t, std::uint64_t);
// finish(block, out, cap): after the launch, what the kernel reported
// (TORCH_REPORT_ERROR, checked-mode faults) as text; its length, 0 if none.
using KernelFinish = std::size_t (*)(const void*, char*, std::size_t);

struct KernelLaunch {
  std::string name;               // the kernel's name (profiler, errors)
  int device = 0;
  KernelEntry entry = nullptr;
  KernelFinish finish = nullptr;
  std::string block;              // the argument block (relocatable: copied)
  std::array<std::uint32_t, 3> grid{1, 1, 1};
  std::array<std::uint32_t, 3> group{1, 1, 1};
  std::uint64_t groups = 0;       // number of threadgroups
  std::vector<at::Tensor> tensors;  // device tensors the kernel reads or writes
  std::string attrs = "{}";       // profiler attributes (JSON object text)
};

// Queues the launch on the current stream of launch.device. The tensors'
// memory is not handed to other streams before the kernel has run (as
// Tensor.record_stream). A kernel's report becomes the device's pending
// error, raised by the next synchronize() as torch.AcceleratorError.
void launchKernel(KernelLaunch launch);

} // namespace torch_mps_ext
