"""torch.distributed on mps_ext: the ``"mps_ext"`` c10d backend.

Importing torch_mps_ext registers it::

    dist.init_process_group("mps_ext", rank=r, world_size=n)   # or
    dist.init_process_group()     # picks it: mps_ext is the accelerator

Collectives run on gloo, the collective library torch ships (TCP between
processes and machines). The device's memory is host memory, so gloo works
on CPU aliases of the device tensors (``torch.ops.mps_ext._host_alias``):
no copy to or from the device, results land in the device tensors. Before a
collective starts, the work queued on the current stream of the tensors'
device is finished (as a CUDA collective waits on the current stream);
``work.wait()`` returns once the result is in place. CPU tensors in the same
group go to gloo as they are.

The group is a ``ProcessGroup`` implemented in Python (as torch's own
``threaded`` test backend is), so ``dist.*`` collectives and
``DistributedDataParallel`` work; torch's functional collectives
(``torch.distributed._functional_collectives``, DTensor) look up C++
backends and are not supported.
"""

from __future__ import annotations

import atexit
import datetime
import weakref

import torch
import torch.distributed as dist

__all__ = ["BACKEND", "ProcessGroupMpsExt", "is_available"]

BACKEND = "mps_ext"


def is_available() -> bool:
    """True if torch was built with distributed support and gloo."""
    return dist.is_available() and dist.is_gloo_available()


if is_available():
    from . import _compat

    _gloo = _compat.gloo()
    AllgatherOptions, AllToAllOptions = _gloo.AllgatherOptions, _gloo.AllToAllOptions
    ProcessGroupGloo, ReduceScatterOptions = _gloo.ProcessGroupGloo, _gloo.ReduceScatterOptions

    def _host(x):
        """What gloo gets for an argument: CPU aliases for mps_ext tensors
        (in lists, lists of lists), everything else as it is."""
        if isinstance(x, torch.Tensor):
            return torch.ops.mps_ext._host_alias(x) if x.device.type == BACKEND else x
        if isinstance(x, (list, tuple)):
            return type(x)(_host(e) for e in x)
        return x

    def _flat(t):
        """A 1-D view of a contiguous tensor (others as they are)."""
        return t.view(-1) if t.is_contiguous() else t

    def _last(works):
        """Runs a list of collectives as one: waits for all but the last."""
        for w in works[:-1]:
            w.wait()
        return works[-1]

    class ProcessGroupMpsExt(dist.ProcessGroup):
        """A process group for mps_ext (and CPU) tensors over gloo. Each
        collective is gloo's, on host aliases of the tensors (the methods
        named in _GLOO_COLLECTIVES, added below)."""

        def __init__(self, store, rank: int, size: int,
                     timeout: datetime.timedelta | None = None):
            super().__init__(rank, size)
            timeout = timeout or datetime.timedelta(minutes=30)
            self._gloo = ProcessGroupGloo(store, rank, size, timeout)

        def getBackendName(self) -> str:  # noqa: N802 (c10d's name)
            return BACKEND

        def __repr__(self) -> str:
            return f"ProcessGroupMpsExt(rank={self.rank()}, size={self.size()})"

        # The single-tensor forms dist.all_gather_single/into_tensor,
        # reduce_scatter_single/tensor and all_to_all_single call.
        # gloo splits the big tensor along dim 0 into one chunk per rank, so
        # an output of shape (1, world * n) (nn.SyncBatchNorm's) would be one
        # chunk: both sides go as flat views, which is what the collective
        # means (NCCL's view of them).
        def all_gather_single(self, output, input, opts=AllgatherOptions()):
            return self._allgather_base(_flat(output), _flat(input), opts)

        def reduce_scatter_single(self, output, input, opts=ReduceScatterOptions()):
            return self._reduce_scatter_base(_flat(output), _flat(input), opts)

        def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes,
                              opts=AllToAllOptions()):
            return self.alltoall_base(output, input, output_split_sizes or [],
                                      input_split_sizes or [], opts)

        def all_gather_single_coalesced(self, outputs, inputs, opts=AllgatherOptions()):
            return _last([self._allgather_base(o, i, opts)
                          for o, i in zip(outputs, inputs, strict=True)])

        def reduce_scatter_single_coalesced(self, outputs, inputs,
                                            opts=ReduceScatterOptions()):
            return _last([self._reduce_scatter_base(o, i, opts)
                          for o, i in zip(outputs, inputs, strict=True)])

        allgather_into_tensor_coalesced = all_gather_single_coalesced
        reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    _GLOO_COLLECTIVES = (
        "allreduce", "allreduce_coalesced", "broadcast", "reduce", "allgather",
        "_allgather_base", "allgather_coalesced", "gather", "scatter", "reduce_scatter",
        "_reduce_scatter_base", "alltoall_base", "alltoall", "send", "recv",
        "recv_anysource", "barrier", "monitored_barrier")

    def _on_gloo(name):
        def collective(self, *args, **kwargs):
            with torch.no_grad():
                return getattr(self._gloo, name)(*_host(args), **kwargs)
        collective.__name__ = collective.__qualname__ = name
        collective.__doc__ = f"gloo's {name}, on host aliases of mps_ext tensors."
        return collective

    for _name in _GLOO_COLLECTIVES:
        setattr(ProcessGroupMpsExt, _name, _on_gloo(_name))

    _live_groups: "weakref.WeakSet[ProcessGroupMpsExt]" = weakref.WeakSet()

    def _release_groups() -> None:
        # gloo's worker threads drop each finished work's tensors; a host
        # alias made here has a Python object, so dropping it takes the GIL.
        # A group still alive when the interpreter finalizes (DDP keeps its
        # group) would have its threads do that during finalization, and a
        # thread that takes the GIL then is ended by pthread_exit: the process
        # aborts ("terminate called without an active exception"). Releasing
        # the gloo groups at exit joins their threads while Python still runs.
        for group in list(_live_groups):
            group.__dict__.pop("_gloo", None)

    def _create(store, rank, size, timeout):
        group = ProcessGroupMpsExt(store, rank, size, timeout)
        if not _live_groups:
            atexit.register(_release_groups)  # once, with the first group
        _live_groups.add(group)
        return group

    def _register() -> None:
        if BACKEND.upper() not in _compat.distributed_backend_plugins():
            dist.Backend.register_backend(BACKEND, _create, devices=["cpu", BACKEND])

else:  # pragma: no cover - torch without distributed/gloo

    def _register() -> None:
        pass
