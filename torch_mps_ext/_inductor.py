"""torch.compile on mps_ext: Inductor's Metal backend, compiled by ours.

torch.mps compiles graphs with Inductor's Metal code generator
(``torch/_inductor/codegen/mps.py``): fused Metal Shading Language kernels
that ``torch.mps.compile_shader`` builds, plus aten calls (matmuls,
convolutions) for what it does not generate. mps_ext runs the same code
generator and builds its kernels with ``torch.mps_ext.compile_shader``
(``docs/shaders.md``), so a compiled model on mps_ext runs the kernels it
would run on Apple silicon.

Inductor asks a PrivateUse1 backend's module for its code generators
(``torch.mps_ext.Scheduling``, ``PythonWrapperCodegen``, ...) the first time
it compiles; ``torch_mps_ext.__getattr__`` imports this module then, so
``import torch_mps_ext`` does not import Inductor. Importing it registers:

- the dynamo device interface for ``mps_ext`` (synchronize, device count,
  properties; dtype support as Metal's: no float64/complex128, which Inductor
  then leaves to aten);
- the device op overrides (as MPS's: one device, no guards);
- ``compile_mps_shader`` (what generated code calls) building with
  ``torch.mps_ext.compile_shader`` -- only where real MPS is unavailable: on a
  Mac, Metal kernels go to the GPU as before and Inductor is not registered
  for mps_ext.

The C++ wrapper (``torch._inductor.config.cpp_wrapper``) is MPS-specific
(Objective-C++); on mps_ext the Python wrapper serves that mode too.
"""

from __future__ import annotations

import os
from collections import namedtuple
from typing import Any

import torch

from ._compat import inductor

_I = inductor()
lowering, runtime_utils = _I.lowering, _I.runtime_utils

DEVICE = "mps_ext"
SUPPORTED = not torch.backends.mps.is_available()


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


def compile_mps_shader(source: str) -> Any:
    """What Inductor's generated code calls to build its Metal kernels."""
    try:
        return torch.mps_ext.compile_shader(source)
    except SyntaxError as err:  # the same message shape as Inductor's own
        raise SyntaxError(f"failed to compile {source} with {err.msg}") from err


_METAL_LACKS = (torch.float64, torch.complex128)
_unsupported_input_tensor = lowering.unsupported_input_tensor


def unsupported_input_tensor(t: torch.Tensor, node=None) -> bool:
    """Inductor's "leave this node to aten" test, plus: Metal has no double.
    MPS has no float64 tensors, so its code generator never meets them;
    mps_ext has them (CPU's kernels), and graphs using them run those."""
    if t.device.type == DEVICE and t.dtype in _METAL_LACKS:
        return True
    return _unsupported_input_tensor(t, node)


if SUPPORTED:
    _I.register_interface_for_device(DEVICE, MpsExtInterface)
    _I.register_device_op_overrides(DEVICE, _I.MPSDeviceOpOverrides())
    runtime_utils.compile_mps_shader = compile_mps_shader
    lowering.unsupported_input_tensor = unsupported_input_tensor

# What Inductor looks up on torch.mps_ext (torch_mps_ext.__getattr__).
CODEGEN = {
    "Scheduling": _I.MetalScheduling,
    "PythonWrapperCodegen": _I.PythonWrapperCodegen,
    "CppWrapperCodegen": _I.PythonWrapperCodegen,
    "WrapperFxCodegen": _I.WrapperFxCodegen,
} if SUPPORTED else {}
