r"""Streams and events on mps_ext, with torch.cuda's API.

A stream is an in-order queue of device work; ``torch.mps_ext.Stream`` and
``torch.mps_ext.Event`` are ``torch.Stream`` / ``torch.Event`` subclasses, so
they work wherever torch's generic objects do (``torch.accelerator``,
``Tensor.record_stream``, ``torch.Stream.wait_event``). The execution model is
described in ``docs/streams.md``.
"""

from typing import Any, Optional

import torch

from . import _C
from ._utils import DEVICE_TYPE, _device_t, _get_device_index

_DEVICE_TYPE_INT = _C._device_type_int()


def _device_index(device: _device_t) -> int:
    return _get_device_index(device, optional=True)


class Stream(torch.Stream):
    r"""Wrapper around an mps_ext stream: an in-order queue of device work.

    Streams come from a pool per device (32 per priority, handed out round
    robin, as on CUDA).

    Args:
        device (torch.device or int, optional): device of the stream (default:
            the current device).
        priority (int, optional): 0 (normal, default) or a negative number for
            high priority; lower numbers are higher priorities, as on CUDA.
            Values outside :meth:`priority_range` are clamped.
    """

    def __new__(cls, device: _device_t = None, priority: int = 0, **kwargs: Any):
        if "stream_id" in kwargs:
            return super().__new__(
                cls,
                stream_id=kwargs["stream_id"],
                device_index=kwargs["device_index"],
                device_type=kwargs.get("device_type", _DEVICE_TYPE_INT),
            )
        idx = _device_index(device)
        return super().__new__(cls, device=torch.device(DEVICE_TYPE, idx), priority=priority)

    @staticmethod
    def priority_range() -> tuple[int, int]:
        r"""``(lowest, highest)`` stream priority: ``(0, -1)``."""
        return tuple(_C._stream_priority_range())

    @property
    def priority(self) -> int:
        r"""The stream's priority (0 normal, -1 high)."""
        return _C._stream_priority(self.device_index, self.stream_id)

    @property
    def native_handle(self) -> int:
        r"""An opaque handle for the stream; :class:`ExternalStream` takes it."""
        return _C._stream_handle(self.device_index, self.stream_id)

    mps_ext_stream = native_handle

    def wait_event(self, event: torch.Event) -> None:
        r"""Makes all future work submitted to this stream wait for ``event``'s
        latest record. Returns at once."""
        super().wait_event(event)

    def wait_stream(self, stream: torch.Stream) -> None:
        r"""Makes all future work submitted to this stream wait for all work
        submitted to ``stream`` so far. Returns at once."""
        super().wait_stream(stream)

    def record_event(self, event: Optional[torch.Event] = None) -> torch.Event:
        r"""Records ``event`` (a new :class:`Event` if None) on this stream and
        returns it."""
        if event is None:
            event = Event()
        event.record(self)
        return event

    def query(self) -> bool:
        r"""True if all work submitted to the stream has completed."""
        return super().query()

    def synchronize(self) -> None:
        r"""Waits for all work submitted to the stream to complete."""
        _C._stream_synchronize(self.device_index, self.stream_id)

    def __repr__(self) -> str:
        return (f"<torch_mps_ext.Stream device={self.device} "
                f"stream_id={self.stream_id} priority={self.priority}>")


class ExternalStream(Stream):
    r"""Wraps a stream given by its native handle (``Stream.native_handle``),
    e.g. one passed through a C++ extension as ``void*``.

    Args:
        stream_ptr (int): the handle.
        device (optional): ignored beyond a consistency check; the handle
            knows its device.
    """

    def __new__(cls, stream_ptr: int, device: _device_t = None, **kwargs: Any):
        dev, sid = _C._stream_from_handle(int(stream_ptr))
        if device is not None and _device_index(device) != dev:
            raise ValueError(f"stream handle belongs to {DEVICE_TYPE}:{dev}, not {device}")
        return super().__new__(cls, stream_id=sid, device_index=dev,
                               device_type=_DEVICE_TYPE_INT)


def _wrap(device_index: int, stream_id: int) -> Stream:
    return Stream(stream_id=stream_id, device_index=device_index,
                  device_type=_DEVICE_TYPE_INT)


def current_stream(device: _device_t = None) -> Stream:
    r"""The calling thread's current stream on ``device`` (default: current device)."""
    idx = _device_index(device)
    return _wrap(idx, _C._stream_current(idx))


def default_stream(device: _device_t = None) -> Stream:
    r"""The default stream (id 0) of ``device`` (default: current device)."""
    return _wrap(_device_index(device), 0)


def set_stream(stream: Optional[torch.Stream]) -> None:
    r"""Makes ``stream`` the calling thread's current stream on its device, and
    its device the current device (as ``torch.cuda.set_stream``). ``None`` is a
    no-op."""
    if stream is None:
        return
    if stream.device.type != DEVICE_TYPE:
        raise ValueError(f"Expected a {DEVICE_TYPE} stream, but got a stream on {stream.device}")
    _C._stream_check(stream.device_index, stream.stream_id)
    if _C._current_device() != stream.device_index:
        _C._set_device(stream.device_index)
    _C._stream_set(stream.device_index, stream.stream_id)


class StreamContext:
    r"""Context manager that makes ``stream`` current (and its device current)
    inside the block, and restores the previous streams and device on exit.
    ``None`` is a no-op."""

    def __init__(self, stream: Optional[torch.Stream]):
        self.stream = stream
        self.src_prev_stream: Optional[Stream] = None
        self.dst_prev_stream: Optional[Stream] = None

    def __enter__(self):
        cur = self.stream
        if cur is None:
            return
        self.src_prev_stream = current_stream(None)
        if self.src_prev_stream.device != cur.device:
            self.dst_prev_stream = current_stream(cur.device_index)
        set_stream(cur)

    def __exit__(self, *args: Any) -> None:
        cur = self.stream
        if cur is None:
            return
        if self.dst_prev_stream is not None:
            set_stream(self.dst_prev_stream)
        set_stream(self.src_prev_stream)


def stream(stream: Optional[torch.Stream]) -> StreamContext:
    r"""``with torch.mps_ext.stream(s):`` runs the block with ``s`` current."""
    return StreamContext(stream)


class Event(torch.Event):
    r"""A marker in a stream, to synchronize streams and to time device work.

    Args:
        enable_timing (bool): record device timestamps, for
            :meth:`elapsed_time` (default False).
        blocking (bool): accepted for torch.cuda parity; :meth:`synchronize`
            always blocks the calling thread.
        interprocess (bool): not supported on mps_ext (default False).
    """

    def __new__(cls, enable_timing: bool = False, blocking: bool = False,
                interprocess: bool = False):
        if interprocess:
            raise RuntimeError("mps_ext events cannot be shared between processes "
                               "(interprocess=True is not supported)")
        self = super().__new__(cls, device=DEVICE_TYPE, enable_timing=enable_timing,
                               blocking=blocking)
        self.enable_timing = bool(enable_timing)
        return self

    def record(self, stream: Optional[torch.Stream] = None) -> None:
        r"""Records the event on ``stream`` (default: the current stream). It
        completes when the stream reaches it."""
        if stream is None:
            stream = current_stream()
        super().record(stream)

    def wait(self, stream: Optional[torch.Stream] = None) -> None:
        r"""Makes all future work on ``stream`` (default: the current stream)
        wait for this event. Returns at once."""
        if stream is None:
            stream = current_stream()
        super().wait(stream)

    def query(self) -> bool:
        r"""True if the event's latest record has completed (or it was never
        recorded)."""
        return super().query()

    def synchronize(self) -> None:
        r"""Waits until the event's latest record has completed (Ctrl-C
        interrupts the wait)."""
        _C._event_synchronize(self.event_id)

    def elapsed_time(self, end_event: torch.Event) -> float:
        r"""Milliseconds of device time between this event's record and
        ``end_event``'s. Waits for both to complete (as torch.mps does).

        Raises RuntimeError if either event was created without
        ``enable_timing=True``, was never recorded, or if ``end_event`` was
        reached before this one.
        """
        if not isinstance(end_event, torch.Event):
            raise TypeError(f"elapsed_time expects an Event, got {type(end_event).__name__}")
        if not (self.enable_timing and getattr(end_event, "enable_timing", True)):
            raise RuntimeError("Events were not created with argument 'enable_timing=True'")
        for name, ev in (("start", self), ("end", end_event)):
            if ev.event_id == 0:
                raise RuntimeError(
                    f"Both events must be recorded before calculating elapsed time "
                    f"(the {name} event was never recorded)")
        if type(end_event) is torch.Event:
            # A generic torch.Event("mps_ext"): torch pairs only exact types.
            if end_event.device.type != DEVICE_TYPE:
                raise RuntimeError(f"Event device type {DEVICE_TYPE} does not match "
                                   f"other's device type {end_event.device.type}.")
        elif not isinstance(end_event, Event):
            raise TypeError(f"elapsed_time expects an Event, got {type(end_event).__name__}")
        self.synchronize()
        end_event.synchronize()
        return _C._event_elapsed_ms(self.event_id, end_event.event_id)

    def __repr__(self) -> str:
        state = "recorded" if self.event_id else "unrecorded"
        return f"<torch_mps_ext.Event {state} enable_timing={self.enable_timing}>"


def host_memory_stats() -> dict:
    r"""Statistics of the pinned host allocator, flattened as
    ``torch.cuda.host_memory_stats``: ``allocations.*`` / ``allocated_bytes.*``
    (blocks held from the system, cached ones included), ``active_requests.*``
    / ``active_bytes.*`` (blocks in use), each with ``current``, ``peak``,
    ``allocated``, ``freed``; ``num_host_alloc`` / ``num_host_free`` (system
    allocations and frees)."""
    out = {}
    for key, value in sorted(_C._host_memory_stats().items()):
        if isinstance(value, dict):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    return out


def _sleep(nanoseconds: int, stream: Optional[torch.Stream] = None) -> None:
    r"""Queues ``nanoseconds`` of device time on ``stream`` (default: current)
    and returns at once; the counterpart of ``torch.cuda._sleep`` for tests
    and examples that need work still pending on a stream."""
    if stream is None:
        stream = current_stream()
    _C._stream_sleep(stream.device_index, stream.stream_id, int(nanoseconds))
