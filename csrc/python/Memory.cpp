// Layer 4: bindings for memory history and snapshots (core/Allocator.h), in
// torch.cuda.memory's snapshot format. Stacks are torch's CapturedTraceback
// (gathered by the allocator through the function set here, symbolized
// here with the GIL held).
#include "core/Allocator.h"
#include "python/Bindings.h"

#include <torch/csrc/Storage.h>
#include <torch/csrc/profiler/combined_traceback.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <unordered_map>

namespace py = pybind11;

namespace torch_mps_ext::python {
namespace {

using c10::CachingDeviceAllocator::RecordContext;

std::shared_ptr<c10::GatheredContext> gatherPython() {
  return torch::CapturedTraceback::gather(/*python=*/true, /*script=*/true, /*cpp=*/false);
}

std::shared_ptr<c10::GatheredContext> gatherAll() {
  return torch::CapturedTraceback::gather(/*python=*/true, /*script=*/true, /*cpp=*/true);
}

const char* blockState(MemoryBlockState s) {
  switch (s) {
    case MemoryBlockState::kAllocated: return "active_allocated";
    case MemoryBlockState::kAwaitingFree: return "active_pending_free";  // torch's name
    case MemoryBlockState::kInactive: return "inactive";
  }
  return "inactive";
}

// Collects the dicts that need "frames", then symbolizes all stacks at once
// (repeated stacks share their frame lists).
class FrameFiller {
 public:
  void add(py::dict d, const std::shared_ptr<c10::GatheredContext>& ctx) {
    auto* tb = dynamic_cast<torch::CapturedTraceback*>(ctx.get());
    if (tb == nullptr) {
      d["frames"] = py::list();
      return;
    }
    auto [it, fresh] = index_.emplace(tb, unique_.size());
    if (fresh) unique_.push_back(tb);
    pending_.emplace_back(std::move(d), it->second);
  }

  void fill() {
    if (unique_.empty()) return;
    torch::SymbolizedTracebacks s = torch::symbolize(unique_);
    std::vector<py::dict> frames;
    frames.reserve(s.all_frames.size());
    for (const auto& f : s.all_frames) {
      py::dict d;
      d["filename"] = f.filename;
      d["line"] = f.lineno;
      d["name"] = f.funcname;
      frames.push_back(std::move(d));
    }
    std::vector<py::list> lists;
    lists.reserve(s.tracebacks.size());
    for (const auto& t : s.tracebacks) {
      py::list l;
      for (auto i : t) l.append(frames.at(i));
      lists.push_back(std::move(l));
    }
    for (auto& [d, i] : pending_) d["frames"] = lists.at(i);
  }

 private:
  std::unordered_map<torch::CapturedTraceback*, std::size_t> index_;
  std::vector<torch::CapturedTraceback*> unique_;
  std::vector<std::pair<py::dict, std::size_t>> pending_;
};

py::dict snapshotDict(bool include_traces) {
  MemorySnapshot snap;
  {
    py::gil_scoped_release nogil;  // the allocator's threads may want the GIL
    snap = memorySnapshot(include_traces);
  }
  FrameFiller frames;
  py::list segments;
  for (const auto& s : snap.segments) {
    py::dict seg;
    seg["device"] = s.device;
    seg["address"] = s.address;
    seg["total_size"] = s.total_size;
    seg["allocated_size"] = s.allocated_size;
    seg["active_size"] = s.active_size;
    seg["requested_size"] = s.requested_size;
    seg["stream"] = s.stream;
    seg["segment_type"] = s.small ? "small" : "large";
    seg["segment_pool_id"] = py::make_tuple(0, 0);
    seg["is_expandable"] = s.expandable;
    seg["frames"] = py::list();
    py::list blocks;
    for (const auto& b : s.blocks) {
      py::dict block;
      block["address"] = b.address;
      block["size"] = b.size;
      block["requested_size"] = b.requested_size;
      block["state"] = blockState(b.state);
      frames.add(block, b.context);
      blocks.append(block);
    }
    seg["blocks"] = blocks;
    segments.append(seg);
  }
  py::list traces;
  for (const auto& trace : snap.device_traces) {
    py::list entries;
    for (const auto& e : trace) {
      py::dict entry;
      entry["action"] = memoryActionName(e.action);
      entry[e.action == MemoryAction::kOom ? "device_free" : "addr"] = e.addr;
      entry["size"] = e.size;
      entry["stream"] = e.stream;
      entry["time_us"] = e.time_us;
      frames.add(entry, e.context);
      entries.append(entry);
    }
    traces.append(entries);
  }
  frames.fill();
  py::dict out;
  out["segments"] = segments;
  out["device_traces"] = traces;
  return out;
}

} // namespace

void initMemoryBindings(py::module_& m) {
  // enabled, context (0 NEVER .. 3 ALL), cpp stacks, max_entries, clear_history,
  // skip_mask (bit i: _MEMORY_ACTIONS[i] not recorded)
  py::list actions;
  for (unsigned a = 0; a <= static_cast<unsigned>(MemoryAction::kOom); ++a) {
    actions.append(memoryActionName(static_cast<MemoryAction>(a)));
  }
  m.attr("_MEMORY_ACTIONS") = py::tuple(actions);
  m.def("_memory_record_history",
        [](bool enabled, int when, bool cpp, std::size_t max_entries, bool clear_history,
           unsigned skip_mask) {
          TORCH_CHECK(when >= 0 && when <= 3, "invalid record context ", when);
          auto fn = cpp ? &gatherAll : &gatherPython;
          py::gil_scoped_release nogil;
          recordMemoryHistory(enabled, fn, max_entries, static_cast<RecordContext>(when),
                              clear_history, skip_mask);
        });
  m.def("_memory_history_enabled", &memoryHistoryEnabled);
  m.def("_memory_snapshot", &snapshotDict, py::arg("include_traces") = true);
  // _host_alias_storage(storage): a CPU storage over the same bytes (device
  // memory is host memory). It holds a reference to the device storage, so
  // the bytes outlive the device tensors. Argument checks: memory.py.
  m.def("_host_alias_storage", [](py::handle obj) {
    if (!THPStorage_Check(obj.ptr())) throw py::type_error("expected a torch.UntypedStorage");
    const c10::Storage& src = THPStorage_Unpack(obj.ptr());
    auto* owner = new c10::Storage(src);
    c10::DataPtr alias(src.mutable_data(), owner,
                       [](void* ctx) { delete static_cast<c10::Storage*>(ctx); },
                       c10::Device(c10::DeviceType::CPU));
    c10::Storage host(c10::Storage::use_byte_size_t(), src.nbytes(), std::move(alias),
                      /*allocator=*/nullptr, /*resizable=*/false);
    return py::reinterpret_steal<py::object>(THPStorage_Wrap(std::move(host)));
  });
}

} // namespace torch_mps_ext::python
