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
  // Raw Philox blocks, for tests: 4 words per block from (seed, first_block),
  // through the baseline (variant 0) or the AVX2 (variant 1) kernels.
  m.def("_philox_words", [](std::uint64_t seed, std::uint64_t first_block,
                            std::size_t nblocks, int variant) -> py::object {
    const rng::Kernels* k = rng::kernelVariant(variant);
    if (k == nullptr) return py::none();
    std::vector<std::uint32_t> out(4 * nblocks);
    k->philox(seed, first_block, nblocks, out.data());
    return py::cast(out);
  });
  // Which build of the random kernels runs: "baseline" or "avx2".
  m.def("_rng_kernels_isa", [] {
    return &rng::kernels() == rng::kernelVariant(0) ? "baseline" : "avx2";
  });
  m.def("_normal_float_kernel", [](std::vector<std::uint32_t> words, int variant) -> py::object {
    const rng::Kernels* k = rng::kernelVariant(variant);
    if (k == nullptr) return py::none();
    std::vector<float> out(words.size() & ~std::size_t{1});
    k->normalFloat(words.data(), out.size() / 2, 0.0f, 1.0f, out.data());
    return py::cast(out);
  });
}

} // namespace torch_mps_ext::python
