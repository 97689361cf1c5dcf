// Layer 4: bindings for compute-kernel launches (torch_mps_ext/shader/_library.py).
#include "aten/ShaderLaunch.h"
#include "python/Bindings.h"

#include <torch/csrc/autograd/python_variable.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

namespace py = pybind11;

namespace torch_mps_ext::python {

void initShaderBindings(py::module_& m) {
  // _launch_kernel(name, device, entry, finish, block, grid, group, groups,
  //                tensors, attrs): queues one launch (aten/ShaderLaunch.h).
  m.def("_launch_kernel",
        [](std::string name, int device, std::uintptr_t entry, std::uintptr_t finish,
           py::bytes block, std::array<std::uint32_t, 3> grid,
           std::array<std::uint32_t, 3> group, std::uint64_t groups, py::list tensors,
           std::string attrs) {
          if (entry == 0) throw std::invalid_argument("_launch_kernel: null kernel entry");
          KernelLaunch k;
          k.name = std::move(name);
          k.device = device;
          k.entry = reinterpret_cast<KernelEntry>(entry);
          k.finish = reinterpret_cast<KernelFinish>(finish);
          k.block = block;  // a copy: the caller's buffer may go at once
          k.grid = grid;
          k.group = group;
          k.groups = groups;
          k.tensors.reserve(tensors.size());
          for (py::handle t : tensors) {
            if (!THPVariable_Check(t.ptr())) {
              throw std::invalid_argument("_launch_kernel: tensors must be torch.Tensor");
            }
            k.tensors.push_back(THPVariable_Unpack(t.ptr()));
          }
          k.attrs = std::move(attrs);
          launchKernel(std::move(k));
        });
}

} // namespace torch_mps_ext::python
