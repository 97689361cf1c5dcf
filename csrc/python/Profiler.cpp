// Layer 4: bindings for torch.mps_ext.profiler (csrc/core/Profiler.h). No logic.
#include "core/Profiler.h"
#include "python/Bindings.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace torch_mps_ext::python {

void initProfilerBindings(py::module_& m) {
  namespace p = torch_mps_ext::profiler;
  m.attr("_PROFILER_TRACE") = static_cast<unsigned>(p::kTrace);
  m.attr("_PROFILER_CAPTURE") = static_cast<unsigned>(p::kCapture);
  m.attr("_PROFILER_STATS") = static_cast<unsigned>(p::kStats);
  m.attr("_PROFILER_KINETO") = static_cast<unsigned>(p::kKineto);
  m.def("_profiler_enable", &p::enable, py::arg("consumers"),
        py::arg("wait_until_completed") = false);
  m.def("_profiler_disable", &p::disable);
  m.def("_profiler_consumers", &p::enabledConsumers);
  m.def("_profiler_set_log_options", &p::setLogOptions);
  m.def("_profiler_now_ns", &p::nowNs);
  // (name, kind, device, stream, start_ns, end_ns, thread, depth, leaf, args_json, kernel,
  //  overload)
  m.def("_profiler_take", [](unsigned consumer) {
    auto recs = p::take(static_cast<p::Consumer>(consumer));
    py::list out;
    for (auto& r : recs) {
      out.append(py::make_tuple(r.name, static_cast<int>(r.kind), r.device, r.stream,
                                r.start_ns, r.end_ns, r.thread, r.depth, r.leaf, r.args,
                                r.kernel, r.overload));
    }
    return out;
  });
  // (device, time_ns, allocated, reserved): the trace's memory counter track
  m.def("_profiler_take_memory", [] {
    py::list out;
    for (auto& s : p::takeMemorySamples()) {
      out.append(py::make_tuple(s.device, s.time_ns, s.allocated, s.reserved));
    }
    return out;
  });
  // (name, kind, count, total_ns, min_ns, max_ns)
  m.def("_profiler_stats", [] {
    py::list out;
    for (auto& s : p::stats()) {
      out.append(py::make_tuple(s.name, static_cast<int>(s.kind), s.count, s.total_ns,
                                s.min_ns, s.max_ns));
    }
    return out;
  });
  m.def("_profiler_record_command",
        [](const std::string& name, int device, std::int64_t stream, std::int64_t start_ns,
           std::int64_t end_ns, std::string attrs) {
          p::recordCommand(name, device, stream, start_ns, end_ns, std::move(attrs));
        },
        py::arg("name"), py::arg("device"), py::arg("stream"), py::arg("start_ns"),
        py::arg("end_ns"), py::arg("attrs") = "{}");
}

} // namespace torch_mps_ext::python
