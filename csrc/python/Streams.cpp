// Layer 4: bindings for streams and pinned memory (torch_mps_ext/streams.py).
// Events go through torch.Event and the device guard (core/DeviceGuard.cpp).
#include "core/HostAllocator.h"
#include "python/Bindings.h"
#include "runtime/Device.h"
#include "runtime/Stream.h"

#include <c10/core/DeviceType.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>

namespace py = pybind11;

namespace torch_mps_ext::python {
namespace {

// Waits with the GIL released in slices of 100 ms, and between slices lets
// Python run its signal handlers: Ctrl-C (KeyboardInterrupt) interrupts a
// wait for device work within a slice. `done(ms)` waits at most ms.
template <class F>
void waitInterruptibly(F done) {
  for (;;) {
    {
      py::gil_scoped_release nogil;
      if (done(100)) return;
    }
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  }
}

} // namespace

void initStreamBindings(py::module_& m) {
  using namespace torch_mps_ext::runtime;
  m.def("_device_type_int", [] { return static_cast<int>(c10::DeviceType::PrivateUse1); });
  m.def("_stream_current", &currentStreamId);
  m.def("_stream_set", &setCurrentStreamId);
  m.def("_stream_check", &checkStream);
  m.def("_stream_priority", [](int device, std::int64_t stream) {
    checkStream(device, stream);
    return streamPriority(stream);
  });
  m.def("_stream_priority_range", [] {
    return py::make_tuple(kLowestPriority, kHighestPriority);
  });
  m.def("_stream_synchronize", [](int device, std::int64_t stream) {
    waitInterruptibly([&](std::int64_t ms) { return awaitStreamFor(device, stream, ms); });
  });
  m.def("_stream_handle", [](int device, std::int64_t stream) {
    return reinterpret_cast<std::uintptr_t>(streamHandle(device, stream));
  });
  m.def("_stream_from_handle", [](std::uintptr_t handle) {
    int device = -1;
    std::int64_t stream = -1;
    if (!streamFromHandle(reinterpret_cast<const void*>(handle), &device, &stream)) {
      throw std::invalid_argument(
          "not an mps_ext stream handle (pass a Stream's native_handle)");
    }
    return py::make_tuple(device, stream);
  });
  // Waits for every stream of the device; errors are taken by the caller.
  m.def("_synchronize", [](int device) {
    waitInterruptibly([&](std::int64_t ms) { return synchronizeStreamsFor(device, ms); });
  });
  // torch_mps_ext.Event.synchronize, by the event's event_id.
  m.def("_event_synchronize", [](std::uintptr_t event) {
    if (event == 0) return;
    const auto* e = reinterpret_cast<const Event*>(event);
    waitInterruptibly([&](std::int64_t ms) { return synchronizeEventFor(e, ms); });
  });
  // Queues `ns` nanoseconds of device time on a stream (torch.cuda._sleep's
  // counterpart: gives tests and examples work that is still pending).
  m.def("_stream_sleep", [](int device, std::int64_t stream, std::int64_t ns) {
    enqueue(device, stream, [ns] {
      std::this_thread::sleep_for(std::chrono::nanoseconds(ns));
    });
  });
  // torch.Event.elapsed_time only pairs exact torch.Event objects, so
  // torch_mps_ext.Event times its records here, by their event_id (the
  // runtime::Event the device guard created on first record).
  m.def("_event_elapsed_ms", [](std::uintptr_t start, std::uintptr_t end) {
    if (start == 0 || end == 0) {
      throw std::runtime_error(
          "Both events must be recorded before calculating elapsed time");
    }
    return elapsedMs(reinterpret_cast<const Event*>(start),
                     reinterpret_cast<const Event*>(end));
  });
  m.def("_host_memory_stats", [] {
    at::HostStats st = hostAllocator().get_stats();
    py::dict d;
    auto stat = &statDict;
    d["allocations"] = stat(st.allocations);
    d["allocated_bytes"] = stat(st.allocated_bytes);
    d["active_requests"] = stat(st.active_requests);
    d["active_bytes"] = stat(st.active_bytes);
    d["num_host_alloc"] = st.num_host_alloc;
    d["num_host_free"] = st.num_host_free;
    return d;
  });
}

} // namespace torch_mps_ext::python
