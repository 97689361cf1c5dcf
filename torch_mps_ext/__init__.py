r"""torch_mps_ext: an emulated ``mps_ext`` accelerator for PyTorch.

Importing this package (or, once it is installed, a plain ``import torch``
through the ``torch.backends`` autoload entry point) registers the
PrivateUse1 backend under the name ``mps_ext`` and installs this module as
``torch.mps_ext``. Its API mirrors ``torch.mps``, plus torch.cuda's memory
functions.
"""

import torch

from . import _C

_C._init()  # validates TORCH_MPS_EXT_* / PYTORCH_MPS_EXT_* environment variables

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
    current_allocated_memory,
    driver_allocated_memory,
    empty_cache,
    max_memory_allocated,
    max_memory_reserved,
    mem_get_info,
    memory_allocated,
    memory_reserved,
    memory_stats,
    memory_summary,
    recommended_max_memory,
    reset_accumulated_memory_stats,
    reset_max_memory_allocated,
    reset_peak_memory_stats,
    set_per_process_memory_fraction,
    get_per_process_memory_fraction,
)
from . import _utils  # noqa: E402,F401  (torch.serialization looks for _utils)
from ._registration import register as _register  # noqa: E402


def _is_in_bad_fork() -> bool:
    """mps_ext survives fork: its state is plain host memory."""
    return False


__all__ = [
    "current_allocated_memory",
    "current_device",
    "device",
    "device_count",
    "device_of",
    "driver_allocated_memory",
    "empty_cache",
    "get_per_process_memory_fraction",
    "init",
    "is_available",
    "is_initialized",
    "max_memory_allocated",
    "max_memory_reserved",
    "mem_get_info",
    "memory_allocated",
    "memory_reserved",
    "memory_stats",
    "memory_summary",
    "recommended_max_memory",
    "reset_accumulated_memory_stats",
    "reset_max_memory_allocated",
    "reset_peak_memory_stats",
    "set_device",
    "set_per_process_memory_fraction",
    "synchronize",
]

_register()
