"""Device-index parsing shared by the torch.mps_ext API (and torch.serialization)."""

from typing import Any, Optional, Union

import torch

DEVICE_TYPE = "mps_ext"

_device_t = Union[torch.device, str, int, None]


def _get_device_index(device: Any, optional: bool = False,
                      allow_cpu: bool = False) -> int:
    r"""The mps_ext device index that ``device`` names.

    ``device`` may be an int, a string (``"mps_ext"``, ``"mps_ext:1"``) or a
    ``torch.device``. ``None`` (or a device without index when ``optional``)
    means the current device.
    """
    from . import _C

    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if allow_cpu and device.type == "cpu":
            return -1
        if device.type != DEVICE_TYPE:
            raise ValueError(f"Expected a mps_ext device, but got: {device}")
        index: Optional[int] = device.index
    elif isinstance(device, bool):
        raise TypeError(f"Invalid device, expected an int, str or torch.device, got {device!r}")
    elif isinstance(device, int):
        index = device
    elif device is None:
        index = None
    else:
        raise TypeError(f"Invalid device, expected an int, str or torch.device, got {device!r}")
    if index is None:
        if not optional and device is not None:
            raise ValueError(
                f"Expected a torch.device with a specified index or an integer, but got:{device}")
        return _C._current_device()
    if index < 0 or index >= _C._device_count():
        raise ValueError(
            f"Invalid mps_ext device index {index}: valid indices are "
            f"0..{_C._device_count() - 1} (TORCH_MPS_EXT_DEVICE_COUNT sets the count)")
    return index
