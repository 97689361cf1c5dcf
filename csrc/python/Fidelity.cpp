// Layer 4: bindings of MPS fidelity mode (aten/Fidelity.h).
#include "aten/Fidelity.h"
#include "python/Bindings.h"

#include <pybind11/functional.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace torch_mps_ext::python {

void initFidelityBindings(py::module_& m) {
  m.def("_fidelity_set_verdicts", &fidelity::setOperatorVerdicts);
  m.def("_fidelity_set_dtype_refusals", &fidelity::setDtypeRefusals);
  m.def("_fidelity_set_mode", &fidelity::setMode);
  m.def("_fidelity_on", [] { return runtime::fidelity::on(); });
  m.def("_fidelity_set_options", &fidelity::setOptions, py::arg("cpu_fallback"),
        py::arg("record"));
  // allowance() -> bool, called with the GIL before a dtype is refused.
  m.def("_fidelity_set_allowance", [](py::object fn) {
    if (fn.is_none()) {
      fidelity::setAllowance(nullptr);
      return;
    }
    auto* held = new py::object(std::move(fn));  // kept for the process's life
    fidelity::setAllowance([held]() {
      py::gil_scoped_acquire gil;
      try {
        return (*held)().cast<bool>();
      } catch (py::error_already_set& e) {
        e.discard_as_unraisable("torch_mps_ext fidelity allowance");
        return false;
      }
    });
  });
  // recorder(kind, what, op), called with the GIL from whichever thread met
  // the incompatibility; None removes it. The callable is kept alive for the
  // life of the process (never released without the GIL at exit).
  m.def("_fidelity_set_recorder", [](py::object fn) {
    if (fn.is_none()) {
      fidelity::setRecorder(nullptr);
      return;
    }
    auto* held = new py::object(std::move(fn));
    fidelity::setRecorder([held](const std::string& kind, const std::string& what,
                                 const std::string& op) {
      py::gil_scoped_acquire gil;
      try {
        (*held)(kind, what, op);
      } catch (py::error_already_set& e) {
        e.discard_as_unraisable("torch_mps_ext fidelity recorder");
      }
    });
  });
}

} // namespace torch_mps_ext::python
