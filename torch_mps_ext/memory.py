"""The mps_ext memory API: torch.mps's functions plus torch.cuda's statistics."""

import collections
import pickle
import sys
from typing import Any

from . import _C, _compat, _private_files
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


# --- memory history and snapshots (torch.cuda.memory's formats) ---------------

_CONTEXTS = {None: 0, "state": 1, "alloc": 2, "all": 3}  # c10's RecordContext
# torch.cuda's action names; "snapshot" is accepted in skip_actions (mps_ext
# records no snapshot events).
_SKIPPABLE = (*_C._MEMORY_ACTIONS, "segment_unmap", "snapshot")


def _record_memory_history(enabled: str | None = "all", context: str | None = "all",
                           stacks: str = "all", max_entries: int = sys.maxsize,
                           device: _device_t = None, clear_history: bool = False,
                           skip_actions: list[str] | None = None) -> None:
    r"""Start (or stop) recording the caching allocator's history, as
    :func:`torch.cuda.memory._record_memory_history` does for CUDA.

    While recording, every allocator action on every mps_ext device --
    ``alloc``, ``free_requested``, ``free_completed``, ``segment_alloc``,
    ``segment_free``, ``segment_map`` (a segment grown in place) and ``oom`` --
    goes into a ring of the newest ``max_entries`` entries per device, and
    live blocks remember the stack that allocated them.
    :func:`_snapshot` / :func:`_dump_snapshot` return both.

    Args:
        enabled: ``None`` stops recording and drops the history; ``"state"``
            keeps stacks of live blocks only (the history keeps just the last
            entry, as on CUDA); ``"all"`` also keeps the history of actions.
        context: which entries carry a stack: ``None`` none, ``"state"`` live
            blocks, ``"alloc"`` + ``alloc`` (and segment, oom) events, ``"all"``
            + free events.
        stacks: ``"python"`` (Python frames) or ``"all"`` (+ C++ frames; slower
            to record and to symbolize).
        max_entries: history entries kept per device (the newest).
        device: accepted for torch.cuda's signature; recording covers every
            mps_ext device.
        clear_history: drop the history recorded so far.
        skip_actions: action names not to record (e.g. ``["free_requested"]``).

    Recording off costs one relaxed atomic load per allocation and free.
    """
    if isinstance(enabled, bool):
        raise TypeError("enabled must be 'all', 'state' or None (the legacy boolean form of "
                        "torch.cuda.memory._record_memory_history is not supported)")
    if enabled not in (None, "state", "all"):
        raise RuntimeError("expected state to be 'state', 'all', or None")
    if context not in _CONTEXTS:
        raise RuntimeError("expected context to be 'state', 'alloc', 'all', or None")
    if stacks not in ("python", "all"):
        raise RuntimeError("expected stacks to be 'python', or 'all'")
    if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
        raise ValueError(f"max_entries must be a positive integer, got {max_entries!r}")
    if device is not None:
        _get_device_index(device, optional=True)  # a bad device still raises
    mask = 0
    for action in skip_actions or ():
        if action not in _SKIPPABLE:
            raise RuntimeError(f"Unknown TraceEntry action: {action}")
        if action in _C._MEMORY_ACTIONS:
            mask |= 1 << _C._MEMORY_ACTIONS.index(action)
    entries = min(max_entries, sys.maxsize) if enabled == "all" else 1
    _C._memory_record_history(enabled is not None, _CONTEXTS[context], stacks == "all",
                              entries, bool(clear_history), mask)


def _snapshot(device: _device_t = None, augment_with_fx_traces: bool = False) -> dict[str, Any]:
    r"""The allocator's state and recorded history, in torch.cuda's snapshot
    format (:func:`torch.cuda.memory._snapshot`)::

        {"segments": [{"device", "address", "total_size", "allocated_size",
                       "active_size", "requested_size", "stream",
                       "segment_type": "small" | "large", "segment_pool_id",
                       "is_expandable", "frames",
                       "blocks": [{"address", "size", "requested_size",
                                   "state": "active_allocated" |
                                            "active_pending_free" | "inactive",
                                   "frames": [{"filename", "line", "name"}, ...]}]}],
         "device_traces": [[{"action", "addr" (or "device_free" for "oom"),
                             "size", "stream", "time_us", "frames"}, ...]
                           for each device]}

    Every device is included, as on CUDA (``device`` is only checked).
    Block sizes add up to each segment's
    ``total_size``; the segments' to :func:`memory_reserved`, the
    ``active_allocated`` blocks' to :func:`memory_allocated`.
    ``augment_with_fx_traces=True`` adds the original source lines of
    frames in FX-generated code (torch.compile), as torch.cuda does.
    """
    if device is not None:
        _get_device_index(device, optional=True)
    snapshot = _C._memory_snapshot(True)
    if augment_with_fx_traces:
        snapshot = _compat.augment_memory_snapshot_stack_traces()(snapshot)
    return snapshot


def _dump_snapshot(filename: str = "dump_snapshot.pickle",
                   augment_with_fx_traces: bool = False) -> None:
    r"""Pickles :func:`_snapshot` into ``filename`` (written to a fresh name
    and renamed into place, mode 0600), for ``python -m torch.cuda._memory_viz``
    and https://pytorch.org/memory_viz."""
    snapshot = _snapshot(augment_with_fx_traces=augment_with_fx_traces)
    _private_files.write_file(filename, pickle.dumps(snapshot))


def memory_snapshot(mempool_id=None, include_traces: bool = True) -> list[dict[str, Any]]:
    r"""The allocator's segments on every mps_ext device (the ``segments`` of
    :func:`_snapshot`), as :func:`torch.cuda.memory_snapshot`. mps_ext has one
    pool per device: ``mempool_id`` must be ``None`` or ``(0, 0)``."""
    if mempool_id is not None and tuple(mempool_id) != (0, 0):
        raise ValueError(f"mps_ext has no private memory pools: mempool_id must be None or "
                         f"(0, 0), got {mempool_id!r}")
    return _C._memory_snapshot(bool(include_traces))["segments"]


def _host_alias_storage(storage: "torch.UntypedStorage") -> "torch.UntypedStorage":
    r"""A CPU :class:`torch.UntypedStorage` over the same bytes as the mps_ext
    ``storage`` (torch.mps's name; the device's memory is host memory, as on
    Apple silicon). Writes through it land in the device storage without a
    copy; it keeps the device storage alive for as long as it lives.

    As with torch.mps, ordering is the caller's: call
    :func:`torch.mps_ext.synchronize` before reading or writing through the
    alias (queued device work may still use the bytes) and before device work
    that depends on the host writes.
    """
    import torch

    if not isinstance(storage, torch.UntypedStorage):
        raise TypeError(f"_host_alias_storage expects a torch.UntypedStorage, got {type(storage).__name__}")
    if storage.device.type != "mps_ext":
        raise ValueError(f"_host_alias_storage expects an MPS storage (device mps_ext), "
                         f"got a storage on {storage.device.type}")
    return _C._host_alias_storage(storage)
