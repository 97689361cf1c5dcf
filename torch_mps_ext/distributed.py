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

import datetime

import torch
import torch.distributed as dist

__all__ = ["BACKEND", "ProcessGroupMpsExt", "is_available"]

BACKEND = "mps_ext"


def is_available() -> bool:
    """True if torch was built with distributed support and gloo."""
    return dist.is_available() and dist.is_gloo_available()


if is_available():
    from torch._C._distributed_c10d import (
        AllgatherOptions,
        AllreduceCoalescedOptions,
        AllreduceOptions,
        AllToAllOptions,
        BarrierOptions,
        BroadcastOptions,
        GatherOptions,
        ProcessGroupGloo,
        ReduceOptions,
        ReduceScatterOptions,
        ScatterOptions,
    )

    def _host(t):
        """What gloo gets for `t`: a CPU alias of an mps_ext tensor."""
        if isinstance(t, torch.Tensor):
            if t.device.type == BACKEND:
                return torch.ops.mps_ext._host_alias(t)
            return t
        return [_host(x) for x in t]

    def _last(works):
        """Runs a list of collectives as one: waits for all but the last."""
        for w in works[:-1]:
            w.wait()
        return works[-1]

    class ProcessGroupMpsExt(dist.ProcessGroup):
        """A process group for mps_ext (and CPU) tensors over gloo."""

        def __init__(self, store, rank: int, size: int,
                     timeout: datetime.timedelta | None = None):
            super().__init__(rank, size)
            timeout = timeout or datetime.timedelta(minutes=30)
            self._gloo = ProcessGroupGloo(store, rank, size, timeout)

        def getBackendName(self) -> str:  # noqa: N802 (c10d's name)
            return BACKEND

        def __repr__(self) -> str:
            return f"ProcessGroupMpsExt(rank={self.rank()}, size={self.size()})"

        # Each collective: the same call on gloo, over host aliases.
        def allreduce(self, tensors, opts=None):
            if not isinstance(opts, AllreduceOptions):
                op = opts if opts is not None else dist.ReduceOp.SUM
                opts = AllreduceOptions()
                opts.reduceOp = op
            with torch.no_grad():
                return self._gloo.allreduce(_host(tensors), opts)

        def allreduce_coalesced(self, tensors, opts=AllreduceCoalescedOptions()):
            with torch.no_grad():
                return self._gloo.allreduce_coalesced(_host(tensors), opts)

        def broadcast(self, tensors, opts=None):
            if not isinstance(opts, BroadcastOptions):
                root = opts if opts is not None else 0
                opts = BroadcastOptions()
                opts.rootRank = root
            with torch.no_grad():
                return self._gloo.broadcast(_host(tensors), opts)

        def reduce(self, tensors, opts=ReduceOptions()):
            with torch.no_grad():
                return self._gloo.reduce(_host(tensors), opts)

        def allgather(self, output_tensors, input_tensors, opts=AllgatherOptions()):
            with torch.no_grad():
                return self._gloo.allgather(_host(output_tensors), _host(input_tensors), opts)

        def _allgather_base(self, output, input, opts=AllgatherOptions()):
            with torch.no_grad():
                return self._gloo._allgather_base(_host(output), _host(input), opts)

        def allgather_coalesced(self, output_lists, input_list, opts=AllgatherOptions()):
            with torch.no_grad():
                return self._gloo.allgather_coalesced(_host(output_lists), _host(input_list),
                                                      opts)

        def gather(self, output_tensors, input_tensors, opts=GatherOptions()):
            with torch.no_grad():
                return self._gloo.gather(_host(output_tensors), _host(input_tensors), opts)

        def scatter(self, output_tensors, input_tensors, opts=ScatterOptions()):
            with torch.no_grad():
                return self._gloo.scatter(_host(output_tensors), _host(input_tensors), opts)

        def reduce_scatter(self, output_tensors, input_tensors,
                           opts=ReduceScatterOptions()):
            with torch.no_grad():
                return self._gloo.reduce_scatter(_host(output_tensors), _host(input_tensors),
                                                 opts)

        def _reduce_scatter_base(self, output, input, opts=ReduceScatterOptions()):
            with torch.no_grad():
                return self._gloo._reduce_scatter_base(_host(output), _host(input), opts)

        def alltoall_base(self, output, input, output_split_sizes, input_split_sizes,
                          opts=AllToAllOptions()):
            with torch.no_grad():
                return self._gloo.alltoall_base(_host(output), _host(input),
                                                output_split_sizes, input_split_sizes, opts)

        def alltoall(self, output_tensors, input_tensors, opts=AllToAllOptions()):
            with torch.no_grad():
                return self._gloo.alltoall(_host(output_tensors), _host(input_tensors), opts)

        # The single-tensor forms dist.all_gather_into_tensor,
        # reduce_scatter_tensor and all_to_all_single call.
        def all_gather_single(self, output, input, opts=AllgatherOptions()):
            return self._allgather_base(output, input, opts)

        def reduce_scatter_single(self, output, input, opts=ReduceScatterOptions()):
            return self._reduce_scatter_base(output, input, opts)

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

        def allgather_into_tensor_coalesced(self, outputs, inputs, opts=AllgatherOptions()):
            return self.all_gather_single_coalesced(outputs, inputs, opts)

        def reduce_scatter_tensor_coalesced(self, outputs, inputs,
                                            opts=ReduceScatterOptions()):
            return self.reduce_scatter_single_coalesced(outputs, inputs, opts)

        def send(self, tensors, dst_rank, tag=0):
            with torch.no_grad():
                return self._gloo.send(_host(tensors), dst_rank, tag)

        def recv(self, tensors, src_rank, tag=0):
            with torch.no_grad():
                return self._gloo.recv(_host(tensors), src_rank, tag)

        def recv_anysource(self, tensors, tag=0):
            with torch.no_grad():
                return self._gloo.recv_anysource(_host(tensors), tag)

        def barrier(self, opts=BarrierOptions()):
            return self._gloo.barrier(opts)

        def monitored_barrier(self, timeout=None, wait_all_ranks=False):
            if timeout is None:
                return self._gloo.monitored_barrier(wait_all_ranks=wait_all_ranks)
            return self._gloo.monitored_barrier(timeout, wait_all_ranks)

    def _create(store, rank, size, timeout):
        return ProcessGroupMpsExt(store, rank, size, timeout)

    def _register() -> None:
        if BACKEND.upper() not in dist.Backend._plugins:
            dist.Backend.register_backend(BACKEND, _create, devices=["cpu", BACKEND])

else:  # pragma: no cover - torch without distributed/gloo

    def _register() -> None:
        pass
