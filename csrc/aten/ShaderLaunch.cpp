// Layer 3: kernel launches as queued device commands (ShaderLaunch.h).
#include "aten/ShaderLaunch.h"

#include "core/Allocator.h"
#include "core/Profiler.h"
#include "runtime/Device.h"
#include "runtime/Fault.h"
#include "runtime/Stream.h"

#include <ATen/Parallel.h>
#include <c10/core/Stream.h>

#include <memory>
#include <mutex>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace torch_mps_ext {

void launchKernel(KernelLaunch launch) {
  runtime::checkDevice(launch.device);
  const std::int64_t stream = runtime::currentStreamId(launch.device);
  const c10::Stream on(c10::Stream::UNSAFE,
                       c10::Device(c10::DeviceType::PrivateUse1,
                                   static_cast<c10::DeviceIndex>(launch.device)),
                       stream);
  // Memory the kernel uses stays with this stream until the kernel has run;
  // the launch itself holds no tensor (no Python objects on the worker).
  for (const at::Tensor& t : launch.tensors) {
    if (t.defined() && t.has_storage() && t.device() == on.device()) {
      deviceAllocator().recordStream(t.storage().data_ptr(), on);
    }
  }
  launch.tensors.clear();
  const bool profiled = profiler::enabledConsumers() != 0;
  const profiler::IssueToken issued = profiled ? profiler::issueToken() : profiler::IssueToken{};
  // The launching thread's intra-op thread count (torch.set_num_threads) is
  // the kernel's: the worker's OpenMP setting is its own and was fixed when
  // it first ran a parallel loop.
  const int threads = at::get_num_threads();
  auto work = std::make_shared<KernelLaunch>(std::move(launch));
  runtime::enqueue(work->device, stream, [work, stream, profiled, issued, threads] {
    const KernelLaunch& k = *work;
    const std::int64_t start = profiled ? profiler::nowNs() : 0;
    const void* block = k.block.data();
#ifdef _OPENMP
    // This thread only (at::set_num_threads would also rewrite torch's
    // process-wide default, racing a later torch.set_num_threads).
    if (omp_get_max_threads() != threads) omp_set_num_threads(threads);
#endif
    // A fault in the kernel (bad pointer, integer division by zero, stack
    // overflow, the watchdog) abandons that thread's threadgroups and is
    // the device's error; the process lives on (runtime/Fault.h).
    std::mutex fault_mu;
    std::string fault;
    auto run = [&](std::uint64_t b, std::uint64_t e) {
      std::string what;
      if (!runtime::runGuarded([&] { k.entry(block, k.grid.data(), k.group.data(), b, e); },
                               &what)) {
        std::lock_guard<std::mutex> lock(fault_mu);
        if (fault.empty()) fault = std::move(what);
      }
    };
    if (threads > 1 && k.groups > 1) {
      // Contiguous ranges of threadgroups, one per intra-op thread.
      const std::int64_t n = static_cast<std::int64_t>(k.groups);
      const std::int64_t grain = (n + threads - 1) / threads;
      at::parallel_for(0, n, grain, [&](std::int64_t b, std::int64_t e) {
        run(static_cast<std::uint64_t>(b), static_cast<std::uint64_t>(e));
      });
    } else {
      run(0, k.groups);
    }
    if (!fault.empty()) {
      runtime::reportError(k.device, "kernel '" + k.name + "' faulted: " + fault +
                                         "; the launch was abandoned");
    }
    if (k.finish != nullptr) {
      char message[16384];
      std::size_t len = k.finish(block, message, sizeof(message));
      if (len > 0) runtime::reportError(k.device, std::string(message, len));
    }
    if (profiled) {
      profiler::recordCommand(k.name, k.device, stream, start, profiler::nowNs(), k.attrs, issued);
    }
  });
}

} // namespace torch_mps_ext
