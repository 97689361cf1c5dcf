// Layer 4: pybind11 bindings. Thin: argument conversion only, no logic.
#include "aten/Init.h"
#include "core/Allocator.h"
#include "core/Hooks.h"
#include "core/ThreadState.h"
#include "runtime/Device.h"
#include "python/Bindings.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;
using namespace torch_mps_ext;

namespace {

py::dict statArray(const c10::CachingAllocator::StatArray& a) {
  static const char* names[] = {"all", "small_pool", "large_pool"};
  py::dict out;
  for (std::size_t i = 0; i < a.size(); ++i) out[names[i]] = python::statDict(a[i]);
  return out;
}

} // namespace

namespace torch_mps_ext::python {

py::dict statDict(const c10::CachingAllocator::Stat& s) {
  py::dict d;
  d["current"] = s.current;
  d["peak"] = s.peak;
  d["allocated"] = s.allocated;
  d["freed"] = s.freed;
  return d;
}

void initDeviceBindings(py::module_& m) {
  m.def("_init", &initialize);
  m.def("_set_backward_on_calling_thread", &setBackwardOnCallingThread);
  m.def("_device_count", &runtime::deviceCount);
  m.def("_current_device", &runtime::currentDevice);
  m.def("_set_device", &runtime::setCurrentDevice);
  m.def("_recommended_max_memory", &runtime::deviceMemoryBytes);

  m.def("_current_allocated_memory", &currentAllocated);
  m.def("_driver_allocated_memory", &driverAllocated);
  m.def("_set_memory_fraction", &setMemoryFraction);
  m.def("_memory_fraction", &memoryFraction);
  m.def("_empty_cache", [] {
    py::gil_scoped_release nogil;
    deviceAllocator().emptyCache();
  });
  m.def("_mem_get_info", [](int device) {
    runtime::checkDevice(device);
    return deviceAllocator().getMemoryInfo(static_cast<c10::DeviceIndex>(device));
  });
  m.def("_reset_peak_memory_stats", [](int device) {
    runtime::checkDevice(device);
    deviceAllocator().resetPeakStats(static_cast<c10::DeviceIndex>(device));
  });
  m.def("_reset_accumulated_memory_stats", [](int device) {
    runtime::checkDevice(device);
    deviceAllocator().resetAccumulatedStats(static_cast<c10::DeviceIndex>(device));
  });
  m.def("_memory_stats", [](int device) {
    runtime::checkDevice(device);
    auto s = deviceStats(device);
    py::dict d;
    d["allocation"] = statArray(s.allocation);
    d["segment"] = statArray(s.segment);
    d["active"] = statArray(s.active);
    d["inactive_split"] = statArray(s.inactive_split);
    d["allocated_bytes"] = statArray(s.allocated_bytes);
    d["reserved_bytes"] = statArray(s.reserved_bytes);
    d["active_bytes"] = statArray(s.active_bytes);
    d["inactive_split_bytes"] = statArray(s.inactive_split_bytes);
    d["requested_bytes"] = statArray(s.requested_bytes);
    d["num_alloc_retries"] = s.num_alloc_retries;
    d["num_ooms"] = s.num_ooms;
    d["oversize_allocations"] = python::statDict(s.oversize_allocations);
    d["oversize_segments"] = python::statDict(s.oversize_segments);
    d["num_sync_all_streams"] = s.num_sync_all_streams;
    d["num_device_alloc"] = s.num_device_alloc;
    d["num_device_free"] = s.num_device_free;
    d["max_split_size"] = s.max_split_size;
    return d;
  });

  m.def("_report_error", &runtime::reportError);
  m.def("_take_error", &runtime::takeError);
}

} // namespace torch_mps_ext::python

PYBIND11_MODULE(_C, m) {
  m.doc() = "Native core of torch_mps_ext (the mps_ext device).";
  torch_mps_ext::python::initDeviceBindings(m);
  torch_mps_ext::python::initStreamBindings(m);
  torch_mps_ext::python::initRandomBindings(m);
  torch_mps_ext::python::initProfilerBindings(m);
  torch_mps_ext::python::initShaderBindings(m);
  torch_mps_ext::python::initTestingBindings(m);
  torch_mps_ext::python::initFidelityBindings(m);
  torch_mps_ext::python::initMemoryBindings(m);
}
