// Layer 3½ (on top of ATen's host views): the "mps_ext" c10d backend.
//
// A c10d::Backend for mps_ext tensors that runs every collective on another
// backend, the engine (gloo's, which torch ships): each device tensor goes to
// the engine as a host alias (aten/HostView.h: a CPU tensor over the same
// memory that keeps it alive; taking it waits for the work queued on the
// current stream of the tensor's device), so results land in the device
// tensors without a copy. The works it returns report the device tensors.
// Documented in docs/distributed.md.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace torch_mps_ext::distributed {

// The process group torch_mps_ext.distributed hands to torch.distributed:
// `plain` is a ProcessGroup with the engine registered for CPU tensors; the
// result has the same store, rank and size, reports the name "mps_ext", and
// has the mps_ext backend over that engine for both CPU and mps_ext tensors
// (CPU tensors go to the engine as they are).
c10::intrusive_ptr<c10d::ProcessGroup> processGroupOver(
    const c10::intrusive_ptr<c10d::ProcessGroup>& plain);

} // namespace torch_mps_ext::distributed
