"""Backward passes of mps_ext graphs run on the calling thread.

torch's autograd engine gives every non-CPU device type a worker thread of
its own and runs the backward of that device's nodes there, while the
calling thread waits. For a GPU that thread overlaps host-side bookkeeping
with kernels running elsewhere; mps_ext's kernels run on the host's cores,
so the thread only adds a hand-off each way, a second OpenMP thread team
competing with the caller's for the same cores, and a cold cache for the
activations the forward left in the caller's core. With the engine's
multithreading disabled on every thread that uses the device (from its first
device allocation on), the backward runs where the forward ran, like on CPU (bench: the MLP training step goes from about
1.3× CPU's time to below it on this 2-core machine).

`TORCH_MPS_EXT_AUTOGRAD_DEVICE_THREAD=1` keeps torch's default. It is also
kept on torch builds with CUDA, ROCm or XPU, whose backward needs the
device threads.
"""

import torch

from . import _settings

ENV = "TORCH_MPS_EXT_AUTOGRAD_DEVICE_THREAD"


def device_thread_setting() -> bool:
    """TORCH_MPS_EXT_AUTOGRAD_DEVICE_THREAD (validated by _settings)."""
    return _settings.get(ENV, False)


def configure(device_thread: bool) -> None:
    # Applied per thread, by the device allocator, when a thread first
    # allocates device memory (csrc/core/ThreadState.h): importing changes
    # nothing for threads and programs that do not use the device.
    from . import _C

    _C._set_backward_on_calling_thread(not (device_thread or _other_accelerator_built()))


def _other_accelerator_built() -> bool:
    xpu = getattr(torch, "xpu", None)
    return bool(torch.version.cuda or torch.version.hip or
                (xpu is not None and xpu._is_compiled()))
