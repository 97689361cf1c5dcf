r"""Random numbers on mps_ext: the per-device Philox generators.

Each mps_ext device has one default generator (``torch.Generator`` objects of
device ``mps_ext:i``). Its state is a 16-byte CPU ``torch.uint8`` tensor:
bytes 0-7 the seed, bytes 8-15 the offset (both little-endian uint64); see
``docs/random.md`` for how much each random op advances the offset.
"""

from typing import Iterable, List, Union

import torch

from . import _C
from ._compat import DisableFuncTorch
from ._utils import _get_device_index

__all__ = [
    "default_generators",
    "get_rng_state",
    "get_rng_state_all",
    "initial_seed",
    "manual_seed",
    "manual_seed_all",
    "seed",
    "seed_all",
    "set_rng_state",
    "set_rng_state_all",
]

_generators: dict = {}


def _default_generator(index: int) -> torch.Generator:
    gen = _generators.get(index)
    if gen is None:
        gen = _C._default_generator(index)
        _generators[index] = gen
    return gen


class _DefaultGenerators:
    """``torch.mps_ext.default_generators``: a read-only sequence of the
    devices' default generators (as ``torch.cuda.default_generators``)."""

    def __len__(self) -> int:
        return _C._device_count()

    def __getitem__(self, index: int) -> torch.Generator:
        n = len(self)
        if not isinstance(index, int):
            raise TypeError("default_generators indices must be integers")
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("default_generators index out of range")
        return _default_generator(index)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return repr(tuple(self))


default_generators = _DefaultGenerators()


def _index(device) -> int:
    return _get_device_index(device, optional=True)


def get_rng_state(device: Union[int, str, torch.device] = "mps_ext") -> torch.Tensor:
    r"""Returns the random number generator state of the given mps_ext device
    (default: the current one) as a CPU ``torch.ByteTensor`` of 16 bytes
    (seed, offset; little-endian uint64 each)."""
    return _default_generator(_index(device)).get_state()


def get_rng_state_all() -> List[torch.Tensor]:
    r"""Returns a list of the random number generator states of all devices."""
    return [get_rng_state(i) for i in range(_C._device_count())]


def set_rng_state(new_state: torch.Tensor,
                  device: Union[int, str, torch.device] = "mps_ext") -> None:
    r"""Sets the random number generator state of the given mps_ext device.

    Args:
        new_state (torch.ByteTensor): the desired state (from ``get_rng_state``)
        device (torch.device or int, optional): the device (default: current)

    Raises ``TypeError("RNG state must be a torch.ByteTensor")`` for anything
    but a CPU ``torch.uint8`` tensor, ``RuntimeError("RNG state is wrong
    size")`` for a tensor of the wrong size.
    """
    if (not isinstance(new_state, torch.Tensor) or new_state.dtype != torch.uint8
            or new_state.device.type != "cpu"):
        raise TypeError("RNG state must be a torch.ByteTensor")
    index = _index(device)
    with DisableFuncTorch():
        state = new_state.clone(memory_format=torch.contiguous_format)
    _default_generator(index).set_state(state)


def set_rng_state_all(new_states: Iterable[torch.Tensor]) -> None:
    r"""Sets the random number generator state of all devices (one state per
    device, in device order)."""
    for i, state in enumerate(new_states):
        set_rng_state(state, i)


def manual_seed(seed: int) -> None:
    r"""Sets the seed of the current mps_ext device's generator (its offset
    goes back to 0)."""
    seed = int(seed)
    _default_generator(_C._current_device()).manual_seed(seed)


def manual_seed_all(seed: int) -> None:
    r"""Sets the seed of every mps_ext device's generator
    (``torch.manual_seed`` calls this)."""
    seed = int(seed)
    for i in range(_C._device_count()):
        _default_generator(i).manual_seed(seed)


def seed() -> None:
    r"""Sets the seed of the current mps_ext device's generator to a
    non-deterministic random number."""
    _default_generator(_C._current_device()).seed()


def seed_all() -> None:
    r"""Sets the seed of every mps_ext device's generator to one
    non-deterministic random number."""
    n = _C._device_count()
    random_seed = _default_generator(0).seed()
    for i in range(1, n):
        _default_generator(i).manual_seed(random_seed)


def initial_seed() -> int:
    r"""Returns the current seed of the current mps_ext device's generator."""
    return _default_generator(_C._current_device()).initial_seed()


def _get_default_mps_generator() -> torch.Generator:
    r"""The current device's default generator (torch.mps's name; the one
    ``torch.accelerator`` and ``torch.mps_ext.manual_seed`` use)."""
    return _default_generator(_C._current_device())
