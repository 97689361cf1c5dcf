"""Hooks torch_mps_ext into torch: the backend name, torch.mps_ext, tensor
methods, and torch.save/torch.load."""

import sys

import torch

from . import _compat
from ._utils import DEVICE_TYPE, _get_device_index

_done = False


def _tag(storage):
    """torch.save: the location string of an mps_ext storage."""
    if storage.device.type == DEVICE_TYPE:
        index = storage.device.index
        return DEVICE_TYPE if index is None else f"{DEVICE_TYPE}:{index}"
    return None


def _deserialize(storage, location):
    """torch.load: moves a storage saved on (or mapped to) mps_ext onto it.

    Registered ahead of torch's MPS handler, which claims every location that
    starts with "mps"."""
    if location == DEVICE_TYPE or location.startswith(DEVICE_TYPE + ":"):
        index = _get_device_index(location, optional=True)
        return storage.to(device=torch.device(DEVICE_TYPE, index))
    return None


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    module = sys.modules[__package__]
    torch.utils.rename_privateuse1_backend(DEVICE_TYPE)
    _compat.register_device_module(DEVICE_TYPE, module)
    torch.utils.generate_methods_for_privateuse1_backend(
        for_tensor=True, for_module=True, for_storage=True, for_packed_sequence=True)
    # Lower number = asked first: before MPS (21) and the generic
    # privateuse1 handler (23), after CPU (10).
    torch.serialization.register_package(19, _tag, _deserialize)
