// Layer 4: the "mps_ext" c10d backend's entry point from Python
// (torch_mps_ext/distributed.py), distributed/ProcessGroupMpsExt.h.
//
// A dispatcher operator rather than a pybind11 function: process groups are
// torch's pybind11 objects, which this module's pybind11 (another version,
// other internals) cannot take or return; as TorchScript custom-class
// values (ProcessGroup.boxed()/unbox()) they cross without it.
#include "distributed/ProcessGroupMpsExt.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mps_ext, m) {
  m.def(
      "_process_group(__torch__.torch.classes.c10d.ProcessGroup plain) -> "
      "__torch__.torch.classes.c10d.ProcessGroup",
      &torch_mps_ext::distributed::processGroupOver);
}
