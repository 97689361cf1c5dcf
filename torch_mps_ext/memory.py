"""The mps_ext memory API: torch.mps's functions plus torch.cuda's statistics."""

import collections
from typing import Any

from . import _C
from ._utils import _device_t, _get_device_index


def _current() -> int:
    return _C._current_device()


def current_allocated_memory() -> int:
    r"""Bytes occupied by live tensors on the current device (blocks at their
    rounded sizes; cached free blocks are not counted)."""
    return _C._current_allocated_memory(_current())


def driver_allocated_memory() -> int:
    r"""Bytes the allocator holds from the system for the current device,
    cached free blocks included."""
    return _C._driver_allocated_memory(_current())


def recommended_max_memory() -> int:
    r"""The device's memory size in bytes: ``TORCH_MPS_EXT_MEMORY_BYTES`` if set,
    else three quarters of the host's physical memory."""
    return _C._recommended_max_memory()


def empty_cache() -> None:
    r"""Waits for queued work, then returns every cached free block of every
    mps_ext device to the system."""
    _C._empty_cache()


def set_per_process_memory_fraction(fraction, device: _device_t = None) -> None:
    r"""Limits the memory this process may allocate on an mps_ext device to
    ``fraction * recommended_max_memory()``.

    Args:
        fraction (float): in [0, 2]; 0 means unlimited (may cause system
            failure if memory runs out); above 1 allows more than
            ``recommended_max_memory()``.
        device (optional): the device (default: current).
    """
    if not isinstance(fraction, float):
        raise TypeError("Invalid type for fraction argument, must be `float`")
    if not 0 <= fraction <= 2:  # NaN fails this too (it compares false both ways)
        raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~2")
    _C._set_memory_fraction(_get_device_index(device, optional=True), fraction)


def get_per_process_memory_fraction(device: _device_t = None) -> float:
    r"""The memory fraction in force for a device (see
    :func:`set_per_process_memory_fraction`)."""
    return _C._memory_fraction(_get_device_index(device, optional=True))


def memory_stats(device: _device_t = None) -> "collections.OrderedDict[str, Any]":
    r"""The caching allocator's statistics for a device, with the keys of
    ``torch.cuda.memory_stats`` (``allocated_bytes.all.current``,
    ``reserved_bytes.large_pool.peak``, ``num_ooms``, ...)."""
    nested = _C._memory_stats(_get_device_index(device, optional=True))
    flat = []

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat.append((prefix, value))

    flatten("", nested)
    flat.sort()
    return collections.OrderedDict(flat)


def memory_allocated(device: _device_t = None) -> int:
    r"""Bytes occupied by tensors on the device (``allocated_bytes.all.current``)."""
    return memory_stats(device).get("allocated_bytes.all.current", 0)


def max_memory_allocated(device: _device_t = None) -> int:
    r"""Peak of :func:`memory_allocated` since start or the last
    :func:`reset_peak_memory_stats`."""
    return memory_stats(device).get("allocated_bytes.all.peak", 0)


def memory_reserved(device: _device_t = None) -> int:
    r"""Bytes held by the caching allocator (``reserved_bytes.all.current``)."""
    return memory_stats(device).get("reserved_bytes.all.current", 0)


def max_memory_reserved(device: _device_t = None) -> int:
    r"""Peak of :func:`memory_reserved`."""
    return memory_stats(device).get("reserved_bytes.all.peak", 0)


def reset_peak_memory_stats(device: _device_t = None) -> None:
    r"""Resets the "peak" statistics to their current values."""
    _C._reset_peak_memory_stats(_get_device_index(device, optional=True))


def reset_accumulated_memory_stats(device: _device_t = None) -> None:
    r"""Resets the "allocated"/"freed" counters and event counts."""
    _C._reset_accumulated_memory_stats(_get_device_index(device, optional=True))


def reset_max_memory_allocated(device: _device_t = None) -> None:
    r"""Same as :func:`reset_peak_memory_stats` (torch.cuda compatibility)."""
    reset_peak_memory_stats(device)


def mem_get_info(device: _device_t = None) -> tuple[int, int]:
    r"""``(free, total)`` bytes of the device: total is
    :func:`recommended_max_memory`, free is what the allocator has not
    reserved from it."""
    free, total = _C._mem_get_info(_get_device_index(device, optional=True))
    return int(free), int(total)


def _format_size(n: int) -> str:
    # Switch units at 1000 so every cell fits in 10 characters.
    for unit in ("B  ", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1000 or unit == "TiB":
            return f"{n:6d} {unit}" if unit == "B  " else f"{n:6.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _format_count(n: int) -> str:
    for unit in (" ", "K", "M"):
        if abs(n) < 1000 or unit == "M":
            return f"{n:7d} {unit}" if unit == " " else f"{n:7.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def memory_summary(device: _device_t = None, abbreviated: bool = False) -> str:
    r"""A table of the allocator's statistics for a device, in the layout of
    ``torch.cuda.memory_summary``."""
    index = _get_device_index(device, optional=True)
    stats = memory_stats(index)
    rows = [
        ("allocated_bytes", "Allocated memory", _format_size),
        ("active_bytes", "Active memory", _format_size),
        ("requested_bytes", "Requested memory", _format_size),
        ("reserved_bytes", "Device reserved memory", _format_size),
        ("inactive_split_bytes", "Non-releasable memory", _format_size),
        ("allocation", "Allocations", _format_count),
        ("active", "Active allocs", _format_count),
        ("segment", "Device reserved segments", _format_count),
        ("inactive_split", "Non-releasable allocs", _format_count),
    ]
    width = 78
    line = "|" + "=" * width + "|"
    thin = "|" + "-" * width + "|"
    out = [line, "|{:^78}|".format(f"mps_ext memory summary, device ID {index}"), thin,
           "|{:<78}|".format(f"  OOMs: {stats.get('num_ooms', 0):<12} "
                             f"|  alloc retries: {stats.get('num_alloc_retries', 0)}"),
           line,
           "| {:<24} | {:>10} | {:>10} | {:>10} | {:>10} |".format(
               "Metric", "Cur Usage", "Peak Usage", "Tot Alloc", "Tot Freed"),
           thin]
    pools = [("all", "")] if abbreviated else [
        ("all", ""), ("large_pool", "  from large pool"), ("small_pool", "  from small pool")]
    for key, title, fmt in rows:
        for i, (pool, suffix) in enumerate(pools):
            name = title if i == 0 else suffix
            vals = [stats.get(f"{key}.{pool}.{m}", 0)
                    for m in ("current", "peak", "allocated", "freed")]
            out.append("| {:<24} | {} | {} | {} | {} |".format(
                name, *(fmt(v).rjust(10) for v in vals)))
        out.append(thin)
    out.append("| {:<24} | {:>49} |".format(
        "Device allocs / frees",
        f"{stats.get('num_device_alloc', 0)} / {stats.get('num_device_free', 0)}"))
    out.append(line)
    return "\n".join(out) + "\n"
