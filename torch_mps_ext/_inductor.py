"""torch.compile on mps_ext: Inductor's C++ (CPU) code generator by default,
its Metal code generator on request (docs/compile.md).

mps_ext memory is host memory, so the kernels CPU Inductor generates --
vectorized C++ loops parallelised with OpenMP, called through a pybind
binding that takes each tensor's data pointer -- run on mps_ext buffers as
they are, just as the eager fallback runs CPU's kernels on host views.
Which code generator builds a graph's kernels (:func:`generator`, asked each
time Inductor compiles a graph):

- ``"cpp"`` (default): Inductor's ``CppScheduling``, CPU's code generator.
  The wrapper (:class:`MpsExtWrapper`, Inductor's Python wrapper) allocates
  buffers on ``mps_ext`` (the device's caching allocator), calls aten for
  what is not generated (matmuls, convolutions: mps_ext's eager kernels) and,
  before the graph's first generated kernel, waits for the current stream
  (operators do the same; docs/streams.md), since generated kernels run
  inline on the calling thread.
- ``"metal"``: Inductor's Metal code generator (``codegen/mps.py``), the one
  torch.mps uses, its kernels built by ``torch.mps_ext.compile_shader``: a
  compiled model runs the kernels it would run on Apple silicon. Chosen with
  ``TORCH_MPS_EXT_INDUCTOR=metal``, and the default while MPS fidelity mode
  is on (``torch.mps_ext.get_fidelity() == "mps"``, read at compile time).

Inductor decides a few things by ``device.type == "cpu"`` where the C++
generator needs the CPU answer; with ``"cpp"`` those ask :func:`cpp_device`
instead (installed by :func:`_adapt_inductor`, listed in _compat.py):
``utils.get_current_backend`` ("cpp" for the graph's kernel language, where
Inductor says "triton" for devices it does not know), scheduler nodes' ``is_cpu`` (CPU loop-reordering is off: "does not work for
CPU codegen"), ``ir.is_cpu`` (realization heuristics tuned for C++ loops),
and the FX graph cache's thread count for graphs that may generate C++ (the
generated loops bake OpenMP's thread count in).

The generator in use is part of Inductor's FX graph cache key (a custom
backend pass whose ``uuid`` names it), so switching generators never reuses
the other's compiled graph.

Inductor asks a PrivateUse1 backend's module for its code generators the
first time it compiles; ``torch_mps_ext.__getattr__`` imports this module
then, so ``import torch_mps_ext`` does not import Inductor.
"""

from __future__ import annotations

import os
from collections import namedtuple
from typing import Any

import torch

from . import _C, _settings
from ._compat import inductor

_I = inductor()
lowering, runtime_utils = _I.lowering, _I.runtime_utils

DEVICE = "mps_ext"
# On a Mac with real MPS, Metal kernels belong to the GPU: Inductor is not
# registered for mps_ext there.
SUPPORTED = not torch.backends.mps.is_available()


def generator() -> str:
    """The code generator the next compiled graph uses: the
    ``TORCH_MPS_EXT_INDUCTOR`` setting, else ``"metal"`` while MPS fidelity
    mode is on, else ``"cpp"``."""
    chosen = _settings.get("TORCH_MPS_EXT_INDUCTOR")
    if chosen is not None:
        return chosen
    return "metal" if torch.mps_ext.get_fidelity() == "mps" else "cpp"


def _is_ours(device) -> bool:
    if device is None:
        return False
    kind = device if isinstance(device, str) else device.type
    return kind == DEVICE


def cpp_device(device) -> bool:
    """True for an mps_ext device whose graphs the C++ generator builds:
    there Inductor's CPU answers apply."""
    return _is_ours(device) and generator() == "cpp"


class MpsExtInterface(_I.MpsInterface):
    """Dynamo's view of the device: torch.mps_ext's functions."""

    @staticmethod
    def is_available() -> bool:
        return torch.mps_ext.is_available()

    @staticmethod
    def current_device() -> int:
        return torch.mps_ext.current_device()

    @staticmethod
    def set_device(device) -> None:
        torch.mps_ext.set_device(device)

    @staticmethod
    def device_count() -> int:
        return torch.mps_ext.device_count()

    @staticmethod
    def synchronize(device=None) -> None:
        torch.mps_ext.synchronize(device)

    @staticmethod
    def get_raw_stream(device_idx: int = 0) -> int:
        return 0

    class Worker:
        @staticmethod
        def get_device_properties(device=None) -> Any:
            return namedtuple("MpsExtProperties", ["multi_processor_count"])(
                os.cpu_count() or 1)

        @staticmethod
        def current_device() -> int:
            return torch.mps_ext.current_device()

    @staticmethod
    def get_device_properties(device=None) -> Any:
        return MpsExtInterface.Worker.get_device_properties(device)


class MpsExtDeviceOpOverrides(_I.DeviceOpOverrides):
    """What Inductor's Python wrapper writes for device management. Inductor
    emits device guards only for GPU types, so these serve its debug modes
    (``config.triton.debug_sync_graph``) and generated benchmarks."""

    def import_get_raw_stream_as(self, name: str) -> str:
        return f"def {name}(index): return 0"

    def set_device(self, device_idx: int) -> str:
        return f"torch.mps_ext.set_device({device_idx})"

    def synchronize(self) -> str:
        return "torch.mps_ext.synchronize()"

    def device_guard(self, device_idx: int) -> str:
        return f"torch.mps_ext.device({device_idx})"


def await_stream(index: int) -> None:
    """Waits for the work queued on the device's current stream (non_blocking
    copies, shader launches): what every operator does before it runs, and
    what a compiled graph does before its first generated C++ kernel."""
    _C._stream_synchronize(index, _C._stream_current(index))


class _MpsExtKernelCalls:
    """Inductor's Python wrapper, plus calls of generated C++ kernels on
    mps_ext (Inductor writes them only for "cpu" and "mps")."""

    _awaited = False

    def write_header(self) -> None:
        super().write_header()
        self.imports.writeline(
            "from torch_mps_ext._inductor import await_stream as mps_ext_await_stream")

    def _generate_kernel_call_helper(self, kernel_name, call_args, *, device=None,
                                     triton=True, **kwargs):
        device = device or _I.V.graph.get_current_device_or_throw()
        if triton or device.type != DEVICE:
            return super()._generate_kernel_call_helper(
                kernel_name, call_args, device=device, triton=triton, **kwargs)
        if not self._awaited:
            self._awaited = True
            self.writeline(f"mps_ext_await_stream({device.index or 0})")
        self.writeline(self.wrap_kernel_call(kernel_name, call_args))


class MpsExtSubgraphWrapper(_MpsExtKernelCalls, _I.SubgraphPythonWrapperCodegen):
    """A subgraph's wrapper (torch.cond, while_loop, invoke_subgraph)."""

    def write_header(self) -> None:  # a subgraph writes into its parent's code
        _I.SubgraphPythonWrapperCodegen.write_header(self)


class MpsExtWrapper(_MpsExtKernelCalls, _I.PythonWrapperCodegen):
    """Inductor's Python wrapper for mps_ext graphs (both generators)."""

    @staticmethod
    def create(is_subgraph, subgraph_name, parent_wrapper, partition_signatures=None):
        if is_subgraph:
            return MpsExtSubgraphWrapper(subgraph_name, parent_wrapper, partition_signatures)
        return MpsExtWrapper()


class MpsExtScheduling:
    """Inductor's scheduling (code generator) for an mps_ext graph: makes a
    ``CppScheduling`` or a ``MetalScheduling`` (Inductor wants a class here:
    it asks ``issubclass(..., TritonScheduling)``)."""

    def __new__(cls, scheduler) -> Any:
        if generator() == "metal":
            return _I.MetalScheduling(scheduler)
        return _I.CppScheduling(scheduler)


class GeneratorInCacheKey(_I.CustomGraphModulePass):
    """Puts the code generator in Inductor's FX graph cache key (Inductor
    hashes each device's custom pass by its uuid). Changes nothing."""

    def __call__(self, gm) -> None:
        return None

    def uuid(self) -> str:
        return f"torch_mps_ext-inductor-{generator()}"


def compile_mps_shader(source: str) -> Any:
    """What Inductor's generated Metal code calls to build its kernels."""
    try:
        return torch.mps_ext.compile_shader(source)
    except SyntaxError as err:  # the same message shape as Inductor's own
        raise SyntaxError(f"failed to compile {source} with {err.msg}") from err


_METAL_LACKS = (torch.float64, torch.complex128)


def _adapt_inductor() -> None:
    """Inductor's ``device.type == "cpu"`` decisions the C++ generator needs
    on mps_ext too (module docstring), and Metal's missing doubles."""
    ir, scheduler, codecache = _I.ir, _I.scheduler, _I.codecache

    cpu_is_cpu = ir.is_cpu

    def is_cpu(x) -> bool:
        return cpu_is_cpu(x) or cpp_device(ir.get_device_type(x))
    ir.is_cpu = is_cpu

    node_is_cpu = scheduler.BaseSchedulerNode.is_cpu

    def node_is_cpu_or_cpp(self) -> bool:
        return node_is_cpu(self) or cpp_device(self.get_device())
    scheduler.BaseSchedulerNode.is_cpu = node_is_cpu_or_cpp

    # Which kernel language a graph's device has ("cpp", "triton", "mps"):
    # Inductor answers "triton" for any device it does not know, and the C++
    # generator's dtype propagation (among others) asks it.
    backend_of = _I.utils.get_current_backend

    def get_current_backend(device_type=None) -> str:
        kind = device_type or _I.V.graph.get_current_device_or_throw().type
        if kind == DEVICE:
            return "cpp" if generator() == "cpp" else "mps"
        return backend_of(device_type)
    for module in _I.imports_of(backend_of):
        module.get_current_backend = get_current_backend

    hash_details = codecache.FxGraphHashDetails
    may_generate_cpp = hash_details._may_generate_cpu_cpp_code.__func__

    def _may_generate_cpu_cpp_code(cls, gm, example_inputs) -> bool:
        return (may_generate_cpp(cls, gm, example_inputs)
                or (generator() == "cpp" and any(
                    isinstance(t, torch.Tensor) and _is_ours(t.device) for t in example_inputs)))
    hash_details._may_generate_cpu_cpp_code = classmethod(_may_generate_cpu_cpp_code)

    unsupported = lowering.unsupported_input_tensor

    def unsupported_input_tensor(t: torch.Tensor, node=None) -> bool:
        # Inductor's "leave this node to aten" test, plus, for the Metal
        # generator: Metal has no double. MPS has no float64 tensors, so its
        # generator never meets them; mps_ext has them (CPU's kernels).
        if (t.device.type == DEVICE and t.dtype in _METAL_LACKS
                and generator() == "metal"):
            return True
        return unsupported(t, node)
    lowering.unsupported_input_tensor = unsupported_input_tensor


def register() -> None:
    """Registers mps_ext with Dynamo and Inductor (once, on import)."""
    _I.register_interface_for_device(DEVICE, MpsExtInterface)
    _I.register_device_op_overrides(DEVICE, MpsExtDeviceOpOverrides())
    _I.register_backend_for_device(DEVICE, MpsExtScheduling, MpsExtWrapper, MpsExtWrapper,
                                   _I.WrapperFxCodegen, GeneratorInCacheKey())
    runtime_utils.compile_mps_shader = compile_mps_shader
    _adapt_inductor()


if SUPPORTED:
    register()

# What Inductor looks up on torch.mps_ext (torch_mps_ext.__getattr__). The
# registration above is complete (it carries the cache-key pass, which the
# lookup cannot): "CppWrapperCodegen" is None, so that Inductor's lookup
# leaves it in place instead of registering the device a second time.
CODEGEN = {
    "Scheduling": MpsExtScheduling,
    "PythonWrapperCodegen": MpsExtWrapper,
    "CppWrapperCodegen": None,
    "WrapperFxCodegen": _I.WrapperFxCodegen,
} if SUPPORTED else {}
