r"""torch.mps_ext.profiler: device traces, command capture and per-op logging.

Mirrors ``torch.mps.profiler``; see ``docs/profiler.md`` for the file formats.

* :func:`start` / :func:`stop` / :func:`profile` record every device operation
  (aten op on mps_ext tensors, copy, shader launch, event) and write a
  Chrome/Perfetto trace at :func:`stop`.
* :func:`metal_capture` writes a complete record of the device commands issued
  in its block (arguments' shapes, dtypes, strides, timings) when the process
  runs with ``MTL_CAPTURE_ENABLED=1``.
* ``PYTORCH_MPS_EXT_LOG_PROFILE_INFO`` (a bit mask) logs device operations as
  they complete and/or prints per-op statistics at exit.
* ``torch.profiler.profile(activities=[ProfilerActivity.CPU,
  ProfilerActivity.PrivateUse1])`` shows device time for mps_ext ops (the
  native side registers a Kineto activity profiler; nothing to call here).

Device code that is not an aten op records itself with
:func:`_device_command` (a context manager) or :func:`_record_device_command`.
"""

import atexit
import contextlib
import json
import os
import sys
import tempfile
import warnings

import torch

from . import _C, _private_files, _settings

__all__ = [
    "start",
    "stop",
    "profile",
    "metal_capture",
    "is_metal_capture_enabled",
    "is_capturing_metal",
]

TRACE_FILE_ENV = "PYTORCH_MPS_EXT_TRACE_FILE"
LOG_PROFILE_INFO_ENV = "PYTORCH_MPS_EXT_LOG_PROFILE_INFO"
CAPTURE_ENV = "MTL_CAPTURE_ENABLED"

# PYTORCH_MPS_EXT_LOG_PROFILE_INFO bits (csrc/core/Profiler.h: LogOptions).
LOG_OPERATION_INFO = 1 << 0
LOG_COPY_INFO = 1 << 1
LOG_COMMAND_INFO = 1 << 2
LOG_OPERATION_STATS = 1 << 3
LOG_COPY_STATS = 1 << 4
LOG_COMMAND_STATS = 1 << 5
LOG_INCLUDE_ARGS = 1 << 6
_LOG_ALL = (1 << 7) - 1

_KINDS = ("op", "copy", "command")

_trace = {"mode": None, "wait": False, "start_ns": 0, "memory0": ()}
_capture = {"fname": None, "start_ns": 0}
_trace_count = 0


def _parse_mode(mode):
    """'interval', 'event' or both (comma-separated; case and spaces ignored)."""
    tokens = str(mode).lower().replace(" ", "").split(",")
    for token in tokens:
        if token not in ("interval", "event"):
            raise RuntimeError(f"Invalid Signpost trace mode: {token}")
    return [m for m in ("interval", "event") if m in tokens]


_trace_dirs = {}  # path -> PrivateDir of the default trace folder (or its fallback)


def _default_trace_dir():
    """The default trace folder: ``<tempdir>/torch_mps_ext_traces-<uid>``, private to this
    user (mode 0700). Another user's folder of that name, or a symbolic link, is not used:
    a fresh private folder is made instead, with a warning (docs/security.md)."""
    # Not "torch_mps_ext": a folder of that name in the working directory
    # (scripts run from the temp dir) would shadow the package on import.
    path = os.path.join(tempfile.gettempdir(), f"torch_mps_ext_traces-{os.geteuid()}")
    d = _trace_dirs.get(path)
    if d is not None and d.still_valid():
        return d
    try:
        d = _private_files.private_dir(path, purpose="the profiler's trace folder", managed=True,
                                       keep_contents=True, hint="")
    except _private_files.InsecureDirectoryError as e:
        fallback = tempfile.mkdtemp(prefix=f"torch_mps_ext_traces-{os.geteuid()}-")  # mode 0700
        warnings.warn(f"{e}Traces of this process go to {fallback}.", RuntimeWarning, stacklevel=3)
        d = _private_files.private_dir(fallback, purpose="the profiler's trace folder", hint="")
    _trace_dirs[path] = d
    return d


def default_trace_path():
    """Where :func:`stop` writes when PYTORCH_MPS_EXT_TRACE_FILE is unset:
    ``<tempdir>/torch_mps_ext_traces-<uid>/trace-<pid>-<n>.json`` (n counts stops), in a
    folder only this user can write (created with mode 0700)."""
    return str(_default_trace_dir().path / _trace_name())


def _trace_name():
    return f"trace-{os.getpid()}-{_trace_count}.json"


def _write_json(path, document):
    """Writes ``document`` to ``path`` atomically: a fresh temporary name opened
    ``O_EXCL|O_NOFOLLOW`` (mode 0600), renamed into place -- a link planted at
    ``path`` is replaced, never written through."""
    _private_files.write_file(path, json.dumps(document))


def start(mode: str = "interval", wait_until_completed: bool = False) -> None:
    r"""Start recording device operations.

    Args:
        mode: ``"interval"`` (one slice per operation, start to end),
            ``"event"`` (a completion marker per operation) or both,
            ``"interval,event"``.
        wait_until_completed: wait for each operation's stream to finish the
            operation before taking its end time.

    Raises:
        RuntimeError: on an invalid mode, or if the profiler is already started.
    """
    modes = _parse_mode(mode)
    if _trace["mode"] is not None:
        raise RuntimeError("The mps_ext profiler is already started; call stop() first")
    _C._profiler_enable(_C._PROFILER_TRACE, bool(wait_until_completed))
    start_ns = _C._profiler_now_ns()
    # The memory counter track starts from each device's usage now.
    memory0 = [(d, start_ns, _C._current_allocated_memory(d), _C._driver_allocated_memory(d))
               for d in range(_C._device_count())]
    _trace.update(mode=modes, wait=bool(wait_until_completed), start_ns=start_ns,
                  memory0=memory0)


def stop() -> str:
    r"""Stop recording and write the Chrome/Perfetto trace.

    The trace goes to ``$PYTORCH_MPS_EXT_TRACE_FILE`` if set, else to
    :func:`default_trace_path`. Returns the path (also printed to stderr).
    """
    global _trace_count
    if _trace["mode"] is None:
        raise RuntimeError("The mps_ext profiler is not started; call start() first")
    try:
        # Work still queued on the device belongs to the trace. (A device
        # error raised here still stops the profiler and writes the trace.)
        torch.mps_ext.synchronize()
    finally:
        _C._profiler_disable(_C._PROFILER_TRACE)
        end_ns = _C._profiler_now_ns()
        records = _C._profiler_take(_C._PROFILER_TRACE)
        memory = _C._profiler_take_memory()
        modes, wait, start_ns = _trace["mode"], _trace["wait"], _trace["start_ns"]
        memory0 = _trace["memory0"]
        _trace.update(mode=None, wait=False, start_ns=0, memory0=())

        document = _chrome_trace(records, modes, wait, start_ns, end_ns, memory0, memory)
        path = _settings.get(TRACE_FILE_ENV)
        if path:
            _trace_count += 1
            _write_json(path, document)
        else:
            directory, name = _default_trace_dir(), _trace_name()
            _trace_count += 1
            directory.write(name, json.dumps(document))  # through the checked folder's descriptor
            path = str(directory.path / name)
        print(f"[mps_ext profiler] trace written to {path}", file=sys.stderr)
    return path


class _Session:
    """What ``with profile() as session`` binds: ``session.path`` is the
    trace's path once the block has exited (None before)."""

    path = None


@contextlib.contextmanager
def profile(mode: str = "interval", wait_until_completed: bool = False):
    r"""Context manager: :func:`start` on entry, :func:`stop` on exit.

    Binds a session object whose ``path`` attribute is set to the written
    trace's path on exit."""
    start(mode, wait_until_completed)
    session = _Session()
    try:
        yield session
    finally:
        session.path = stop()


def is_metal_capture_enabled() -> bool:
    """True when the process runs with ``MTL_CAPTURE_ENABLED=1``."""
    return _settings.get(CAPTURE_ENV, False)


def is_capturing_metal() -> bool:
    """True inside a :func:`metal_capture` block."""
    return _capture["fname"] is not None


@contextlib.contextmanager
def metal_capture(fname: str):
    r"""Record every device command issued in the block to ``fname``.

    The file (JSON, ``docs/profiler.md``: capture format) lists each command
    in issue order with its name, kind, device, stream, timings and its
    arguments' shapes, dtypes and strides (shader launches: their grid).

    Raises:
        RuntimeError: if capture is not enabled (``MTL_CAPTURE_ENABLED=1``)
            or a capture is already in progress.
    """
    if not is_metal_capture_enabled():
        raise RuntimeError(
            "Metal capture is not enabled: run the process with MTL_CAPTURE_ENABLED=1")
    if is_capturing_metal():
        raise RuntimeError(
            f"A metal capture is already in progress (writing {_capture['fname']})")
    fname = os.fspath(fname)
    _C._profiler_enable(_C._PROFILER_CAPTURE, False)
    _capture.update(fname=fname, start_ns=_C._profiler_now_ns())
    try:
        yield
        # Drain the work issued in the block before closing the record.
        torch.mps_ext.synchronize()
    finally:
        _C._profiler_disable(_C._PROFILER_CAPTURE)
        end_ns = _C._profiler_now_ns()
        records = _C._profiler_take(_C._PROFILER_CAPTURE)
        start_ns = _capture["start_ns"]
        _capture.update(fname=None, start_ns=0)
        _write_json(fname, _capture_document(records, start_ns, end_ns))


# --- recording device commands from other code --------------------------------

def _is_recording() -> bool:
    """True while any consumer (trace, capture, logging, torch.profiler) is on."""
    return _C._profiler_consumers() != 0


@contextlib.contextmanager
def _device_command(name: str, *, device: int = -1, stream: int = -1, **attrs):
    r"""Record the block as one device command ``name`` (e.g. a shader launch).

    ``device``/``stream`` default to the current device and its current
    stream. ``attrs`` (JSON-serialisable; others are str()-ed) go to the
    trace's ``args`` and the capture's ``attrs``, e.g.
    ``grid=[1024, 1, 1], group=[256, 1, 1]``. Costs one C call when off.
    """
    if not _C._profiler_consumers():
        yield
        return
    start_ns = _C._profiler_now_ns()
    try:
        yield
    finally:
        _C._profiler_record_command(name, device, stream, start_ns, _C._profiler_now_ns(),
                                    json.dumps(attrs, default=str))


def _record_device_command(name: str, start_ns: int, end_ns: int, *, device: int = -1,
                           stream: int = -1, **attrs) -> None:
    r"""Record an already-timed device command (``start_ns == end_ns`` for a
    point such as an event record). Times come from :func:`_now_ns`."""
    if _C._profiler_consumers():
        _C._profiler_record_command(name, device, stream, start_ns, end_ns,
                                    json.dumps(attrs, default=str))


def _now_ns() -> int:
    """The profiler's clock (CLOCK_REALTIME, ns), shared with torch.profiler."""
    return _C._profiler_now_ns()


# --- file formats -------------------------------------------------------------

def _args(text):
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {"raw": text}


def _chrome_trace(records, modes, wait, start_ns, end_ns, memory0=(), memory=()):
    events = []
    tracks = set()
    # Counter track per device: bytes allocated/reserved after each change,
    # from the usage when the trace started (memory0). A device whose memory
    # never changed gets no track.
    changed = {d for d, *_ in memory}
    for device, t, allocated, reserved in [*memory0, *memory]:
        if device in changed:
            events.append({"name": "memory", "cat": "memory", "ph": "C", "pid": device,
                           "ts": max(0.0, (t - start_ns) / 1e3),
                           "args": {"allocated": allocated, "reserved": reserved}})
    for (name, kind, device, stream, t0, t1, thread, depth, leaf, args, kernel,
         overload) in sorted(records, key=lambda r: (r[4], r[7])):
        tracks.add((device, stream))
        a = {"device": f"mps_ext:{device}", "stream": stream, "thread": thread,
             "depth": depth, "leaf": leaf}
        if overload:
            a["overload"] = overload
        if not kernel:
            a["metadata_only"] = True
        extra = _args(args)
        if extra:
            a.update(extra if kind != 2 else {"attrs": extra})
        base = {"name": name, "cat": _KINDS[kind], "pid": device, "tid": stream, "args": a}
        if "interval" in modes:
            events.append({**base, "ph": "X", "ts": (t0 - start_ns) / 1e3,
                           "dur": (t1 - t0) / 1e3})
        if "event" in modes:
            events.append({**base, "ph": "i", "s": "t", "ts": (t1 - start_ns) / 1e3})
    meta = []
    for device in sorted({d for d, _ in tracks} | changed):
        meta.append({"name": "process_name", "ph": "M", "pid": device,
                     "args": {"name": f"mps_ext:{device}"}})
        meta.append({"name": "process_sort_index", "ph": "M", "pid": device,
                     "args": {"sort_index": device}})
    for device, stream in sorted(tracks):
        meta.append({"name": "thread_name", "ph": "M", "pid": device, "tid": stream,
                     "args": {"name": f"stream {stream}"}})
    return {
        "traceEvents": meta + events,
        "displayTimeUnit": "ms",
        "otherData": {
            "producer": "torch_mps_ext.profiler",
            "mode": ",".join(modes),
            "wait_until_completed": wait,
            "start_time_ns": start_ns,
            "end_time_ns": end_ns,
        },
    }


def _capture_document(records, start_ns, end_ns):
    commands = []
    for i, (name, kind, device, stream, t0, t1, thread, depth, leaf, args, kernel,
            overload) in enumerate(sorted(records, key=lambda r: (r[4], r[7]))):
        entry = {"index": i, "name": name, "overload": overload, "kind": _KINDS[kind],
                 "device": f"mps_ext:{device}",
                 "stream": stream, "thread": thread, "depth": depth, "leaf": leaf,
                 "metadata_only": not kernel,
                 "start_ns": t0 - start_ns, "end_ns": t1 - start_ns, "duration_ns": t1 - t0}
        extra = _args(args)
        if kind == 2:
            entry["attrs"] = extra
        else:
            entry["inputs"] = extra.get("inputs", [])
            entry["outputs"] = extra.get("outputs", [])
            if "direction" in extra:
                entry["direction"] = extra["direction"]
        commands.append(entry)
    return {
        "format": "torch_mps_ext.capture",
        "version": 1,
        "start_time_ns": start_ns,
        "end_time_ns": end_ns,
        "num_commands": len(commands),
        "commands": commands,
    }


# --- PYTORCH_MPS_EXT_LOG_PROFILE_INFO -----------------------------------------

def _log_bits_from_env():
    return _settings.get(LOG_PROFILE_INFO_ENV, 0)


def _print_stats(bits, file=None):
    file = file or sys.stderr
    stats = _C._profiler_stats()
    for kind, bit, title in ((0, LOG_OPERATION_STATS, "operations"),
                             (1, LOG_COPY_STATS, "copies"),
                             (2, LOG_COMMAND_STATS, "commands")):
        if not bits & bit:
            continue
        rows = sorted((s for s in stats if s[1] == kind), key=lambda s: -s[3])
        print(f"[mps_ext profiler] {title} (times include nested device ops):", file=file)
        width = max([len(r[0]) for r in rows] + [4])
        print(f"  {'name':<{width}}  {'calls':>8}  {'total ms':>10}  {'avg us':>10}  "
              f"{'min us':>10}  {'max us':>10}", file=file)
        for name, _, count, total, lo, hi in rows:
            print(f"  {name:<{width}}  {count:>8}  {total / 1e6:>10.3f}  "
                  f"{total / count / 1e3:>10.3f}  {lo / 1e3:>10.3f}  {hi / 1e3:>10.3f}",
                  file=file)


def _init_logging():
    bits = _log_bits_from_env()
    if not bits:
        return
    _C._profiler_set_log_options(bits)
    _C._profiler_enable(_C._PROFILER_STATS, False)
    if bits & (LOG_OPERATION_STATS | LOG_COPY_STATS | LOG_COMMAND_STATS):
        atexit.register(_print_stats, bits)


_init_logging()
