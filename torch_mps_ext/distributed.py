"""torch.distributed on mps_ext: the ``"mps_ext"`` c10d backend.

Importing torch_mps_ext registers it::

    dist.init_process_group("mps_ext", rank=r, world_size=n)   # or
    dist.init_process_group()     # picks it: mps_ext is the accelerator

The backend is a C++ ``c10d::Backend`` (``csrc/distributed/``) over gloo, the
collective library torch ships (TCP between processes and machines). The
device's memory is host memory, so gloo works on CPU aliases of the device
tensors (``torch.ops.mps_ext._host_alias``): no copy to or from the device,
results land in the device tensors. Before a collective starts, the work
queued on the current stream of the tensors' device is finished (as a CUDA
collective waits on the current stream); ``work.wait()`` returns once the
result is in place. CPU tensors in the same group go to gloo itself.

Being a C++ backend, it is found wherever torch looks one up by device type:
``dist.*`` collectives, DDP, torch's functional collectives
(``torch.distributed._functional_collectives``), so DTensor, FSDP2 and
tensor parallelism, and DeviceMesh. Two checks in torch that would refuse it
by name are adapted in ``_compat`` (``init_device_mesh``'s device-type check,
``monitored_barrier``'s gloo-only check). See ``docs/distributed.md``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["BACKEND", "is_available"]

BACKEND = "mps_ext"


def is_available() -> bool:
    """True if torch was built with distributed support and gloo."""
    return dist.is_available() and dist.is_gloo_available()


if is_available():
    from . import _compat

    def _create(opts, backend_options=None):
        """c10d's creator for the "mps_ext" backend (its extended form: `opts`
        has the store, rank, size, timeout, group name and global ranks): a
        process group whose CPU tensors go to a gloo backend and whose
        mps_ext tensors go to the mps_ext backend over that same gloo backend
        (csrc/distributed)."""
        plain = _compat.gloo_process_group(opts)
        return _compat.process_group_through(torch.ops.mps_ext._process_group, plain)

    def _register() -> None:
        if BACKEND.upper() not in _compat.distributed_backend_plugins():
            dist.Backend.register_backend(BACKEND, _create, extended_api=True,
                                          devices=["cpu", BACKEND])
        _compat.adapt_distributed_checks(BACKEND)

else:  # pragma: no cover - torch without distributed/gloo

    def _register() -> None:
        pass
