// Layer 4: hooks for the test suite only, kept apart from the API's bindings
// as torch_mps_ext._C._testing. Nothing in the package calls them.
#include "aten/RandomKernels.h"
#include "python/Bindings.h"
#include "runtime/Stream.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace torch_mps_ext::python {

void initTestingBindings(py::module_& m) {
  py::module_ t = m.def_submodule("_testing", "Hooks for torch_mps_ext's own tests.");
  // Raw Philox blocks: 4 words per block from (seed, first_block), through
  // the baseline (variant 0) or the AVX2 (variant 1) kernels; None when the
  // variant is not built.
  t.def("philox_words", [](std::uint64_t seed, std::uint64_t first_block,
                           std::size_t nblocks, int variant) -> py::object {
    const rng::Kernels* k = rng::kernelVariant(variant);
    if (k == nullptr) return py::none();
    std::vector<std::uint32_t> out(4 * nblocks);
    k->philox(seed, first_block, nblocks, out.data());
    return py::cast(out);
  });
  // Standard normal floats from raw words, through one variant's kernel.
  t.def("normal_float_kernel", [](std::vector<std::uint32_t> words, int variant) -> py::object {
    const rng::Kernels* k = rng::kernelVariant(variant);
    if (k == nullptr) return py::none();
    std::vector<float> out(words.size() & ~std::size_t{1});
    k->normalFloat(words.data(), out.size() / 2, 0.0f, 1.0f, out.data());
    return py::cast(out);
  });
  // Queues work that fails with `message`: the path by which failing device
  // work reaches the next synchronize.
  t.def("stream_enqueue_failure", [](int device, std::int64_t stream, std::string message) {
    runtime::enqueue(device, stream, [message] { throw std::runtime_error(message); });
  });
}

} // namespace torch_mps_ext::python
