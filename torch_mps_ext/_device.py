"""Devices: count, current device, device context managers, synchronize."""

from typing import Any

import torch

from . import _C
from ._utils import _device_t, _get_device_index


def device_count() -> int:
    r"""Returns the number of mps_ext devices (``TORCH_MPS_EXT_DEVICE_COUNT``, default 1)."""
    return _C._device_count()


def is_available() -> bool:
    r"""Returns True: the emulated device is always present once the package loads."""
    return device_count() > 0


def is_initialized() -> bool:
    r"""mps_ext initialises eagerly at import; always True."""
    return True


def init() -> None:
    r"""Initialises mps_ext; a no-op, kept for parity with torch.cuda.init()."""


def current_device() -> int:
    r"""Returns the index of the calling thread's current mps_ext device."""
    return _C._current_device()


def set_device(device: _device_t) -> None:
    r"""Sets the calling thread's current mps_ext device."""
    index = _get_device_index(device, optional=True)
    if index >= 0:
        _C._set_device(index)


class device:
    r"""Context manager that changes the current mps_ext device.

    Args:
        device (torch.device or int or str): device to select; a negative int
            or ``None`` is a no-op.
    """

    def __init__(self, device: Any):
        if device is None or (isinstance(device, int) and device < 0):
            self.idx = -1
        else:
            self.idx = _get_device_index(device, optional=True)
        self.prev_idx = -1

    def __enter__(self):
        self.prev_idx = _C._current_device()
        if self.idx >= 0 and self.idx != self.prev_idx:
            _C._set_device(self.idx)

    def __exit__(self, *args: Any) -> bool:
        if self.idx >= 0 and self.idx != self.prev_idx:
            _C._set_device(self.prev_idx)
        return False


class device_of(device):
    r"""Context manager that makes the device of tensor ``obj`` current
    (no-op for a tensor that is not on mps_ext)."""

    def __init__(self, obj: torch.Tensor):
        idx = obj.get_device() if obj.device.type == "mps_ext" else -1
        super().__init__(idx)


def synchronize(device: _device_t = None) -> None:
    r"""Waits for all work on every stream of an mps_ext device (default: the
    current one) to finish.

    Raises ``torch.AcceleratorError`` carrying the first error that device
    work (a kernel's ``TORCH_REPORT_ERROR``, an async copy) reported since the
    last synchronization.
    """
    index = _get_device_index(device, optional=True)
    _C._synchronize(index)
    error = _C._take_error(index)
    if error is not None:
        raise torch.AcceleratorError(error)
