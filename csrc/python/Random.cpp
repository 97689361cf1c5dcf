// Layer 4: bindings of the random-number API (torch_mps_ext/random.py).
#include "core/Generator.h"
#include "aten/RandomKernels.h"
#include "python/Bindings.h"

#include <torch/csrc/Generator.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

namespace py = pybind11;

namespace torch_mps_ext::python {

void initRandomBindings(py::module_& m) {
  // The device's default generator as a torch.Generator.
  m.def("_default_generator", [](int device) {
    const at::Generator& gen = defaultGenerator(static_cast<c10::DeviceIndex>(device));
    return py::reinterpret_steal<py::object>(THPGenerator_initDefaultGenerator(gen));
  });
  // Which build of the random kernels runs: "baseline" or "avx2".
  m.def("_rng_kernels_isa", [] {
    return &rng::kernels() == rng::kernelVariant(0) ? "baseline" : "avx2";
  });
}

} // namespace torch_mps_ext::python
