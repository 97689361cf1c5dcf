// Layer 4: each area of the API binds its functions in its own file.
#pragma once

#include <c10/core/Allocator.h>
#include <pybind11/pybind11.h>

namespace torch_mps_ext::python {

void initDeviceBindings(pybind11::module_& m);   // Module.cpp

// {"current", "peak", "allocated", "freed"} of an allocator statistic.
pybind11::dict statDict(const c10::CachingAllocator::Stat& s);
void initStreamBindings(pybind11::module_& m);   // Streams.cpp
void initRandomBindings(pybind11::module_& m);   // Random.cpp
void initProfilerBindings(pybind11::module_& m);  // Profiler.cpp
void initShaderBindings(pybind11::module_& m);    // Shaders.cpp
void initTestingBindings(pybind11::module_& m);   // Testing.cpp (_C._testing)
void initFidelityBindings(pybind11::module_& m);  // Fidelity.cpp
void initMemoryBindings(pybind11::module_& m);    // Memory.cpp (history, snapshots)
// Areas added later declare theirs here and are called from Module.cpp.

} // namespace torch_mps_ext::python
