r"""torch_mps_ext: an emulated ``mps_ext`` accelerator for PyTorch.

Importing this package (or, once it is installed, a plain ``import torch``
through the ``torch.backends`` autoload entry point) registers the
PrivateUse1 backend under the name ``mps_ext`` and installs this module as
``torch.mps_ext``. Its API mirrors ``torch.mps``, plus torch.cuda's memory
functions.
"""

import torch

from . import _autograd, _C, _settings

_settings.validate_all()  # every TORCH_MPS_EXT_* / PYTORCH_MPS_EXT_* variable (_settings.py)
_device_thread = _autograd.device_thread_setting()
_C._init()  # the native core's own settings, validated alike (csrc/runtime/Settings.h)
_autograd.configure(_device_thread)  # backward on the calling thread (see _autograd.py)

from .fidelity import get_fidelity, set_fidelity  # noqa: E402

from ._device import (  # noqa: E402
    current_device,
    device,
    device_count,
    device_of,
    is_available,
    is_initialized,
    init,
    set_device,
    synchronize,
)
from .memory import (  # noqa: E402
    _host_alias_storage,
    current_allocated_memory,
    driver_allocated_memory,
    empty_cache,
    max_memory_allocated,
    max_memory_reserved,
    mem_get_info,
    memory_allocated,
    memory_reserved,
    memory_snapshot,
    memory_stats,
    memory_summary,
    recommended_max_memory,
    reset_accumulated_memory_stats,
    reset_max_memory_allocated,
    reset_peak_memory_stats,
    set_per_process_memory_fraction,
    get_per_process_memory_fraction,
)
from .streams import (  # noqa: E402
    Event,
    ExternalStream,
    Stream,
    StreamContext,
    current_stream,
    default_stream,
    host_memory_stats,
    set_stream,
    stream,
    _sleep,
)
from .random import (  # noqa: E402
    _get_default_mps_generator,
    default_generators,
    get_rng_state,
    get_rng_state_all,
    initial_seed,
    manual_seed,
    manual_seed_all,
    seed,
    seed_all,
    set_rng_state,
    set_rng_state_all,
)
from .storage import STORAGE_CLASSES as _STORAGE_CLASSES  # noqa: E402
globals().update(_STORAGE_CLASSES)  # torch.mps_ext.FloatStorage, ... (Tensor.storage_type())
from . import _utils  # noqa: E402,F401  (torch.serialization looks for _utils)
from . import profiler  # noqa: E402  (torch.mps_ext.profiler)
from . import event  # noqa: E402,F401  (torch.mps_ext.event.Event, as torch.mps.event)
from . import distributed  # noqa: E402  (the "mps_ext" c10d backend)
from ._registration import register as _register  # noqa: E402


def compile_shader(source: str, *, include_dirs=None):
    r"""Compiles Metal Shading Language compute kernels for the mps_ext device
    and returns a library whose attributes are its kernels (see
    ``docs/shaders.md``); ``include_dirs``: directories whose files the source
    may ``#include`` besides the Metal headers. Example::

        >>> lib = torch.mps_ext.compile_shader(
        ... "kernel void full(device float* out, constant float& val, uint idx [[thread_position_in_grid]]) { out[idx] = val; }"
        ...  )
        >>> x = torch.zeros(16, device="mps_ext")
        >>> lib.full(x, 3.14)
    """
    from .shader import compile_shader as _compile  # imported on first use

    return _compile(source, include_dirs=include_dirs)


def load_metallib(source):
    r"""Loads a library that :func:`compile_shader`'s cache produced, from its
    bytes or its path."""
    from .shader import load_metallib as _load

    return _load(source)


# torch.cuda's flag, which torch reads from any device module: activation
# checkpointing (torch.utils.checkpoint) saves and restores a device's RNG
# state only when `device_module._initialized` is true, so without it the
# recomputed forward draws other dropout masks than the original one.
_initialized = True


def _is_in_bad_fork() -> bool:
    """mps_ext survives fork: its state is plain host memory."""
    return False


from .amp import get_amp_supported_dtype  # noqa: E402

_INDUCTOR_CODEGEN = ("Scheduling", "PythonWrapperCodegen", "CppWrapperCodegen",
                     "WrapperFxCodegen")


def __getattr__(name):
    # Inductor asks torch.mps_ext for its code generators when it first
    # compiles for the device; importing _inductor registers mps_ext with
    # Inductor (C++ code generator by default, Metal with
    # TORCH_MPS_EXT_INDUCTOR=metal or in MPS fidelity mode; docs/compile.md).
    # Imported on demand so that importing torch_mps_ext does not import
    # Inductor.
    if name in _INDUCTOR_CODEGEN:
        from ._inductor import CODEGEN

        return CODEGEN.get(name)
    raise AttributeError(f"module 'torch.mps_ext' has no attribute '{name}'")


__all__ = [
    "get_amp_supported_dtype",
    "get_fidelity",
    "set_fidelity",
    "compile_shader",
    "load_metallib",
    "current_allocated_memory",
    "current_device",
    "current_stream",
    "default_stream",
    "default_generators",
    "device",
    "device_count",
    "device_of",
    "distributed",
    "driver_allocated_memory",
    "empty_cache",
    "Event",
    "ExternalStream",
    "get_rng_state",
    "get_rng_state_all",
    "get_per_process_memory_fraction",
    "host_memory_stats",
    "init",
    "initial_seed",
    "is_available",
    "is_initialized",
    "manual_seed",
    "manual_seed_all",
    "max_memory_allocated",
    "max_memory_reserved",
    "mem_get_info",
    "memory_allocated",
    "memory_reserved",
    "memory_snapshot",
    "memory_stats",
    "memory_summary",
    "profiler",
    "recommended_max_memory",
    "reset_accumulated_memory_stats",
    "reset_max_memory_allocated",
    "reset_peak_memory_stats",
    "seed",
    "seed_all",
    "set_device",
    "set_stream",
    "stream",
    "Stream",
    "StreamContext",
    "set_per_process_memory_fraction",
    "set_rng_state",
    "set_rng_state_all",
    "synchronize",
    *_STORAGE_CLASSES,
]

_register()
distributed._register()
fidelity._configure_from_environment()  # TORCH_MPS_EXT_FIDELITY=mps (docs/fidelity.md)
