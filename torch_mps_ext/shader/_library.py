"""Shader library and kernel objects: argument binding and launch (SPEC §6 calling convention)."""

from __future__ import annotations

import ctypes
import json
import struct
from pathlib import Path
from typing import Any

import torch

DEVICE_TYPE = "mps_ext"

# c10/metal/error.h: struct ErrorMessages { atomic<uint> count; ErrorMessage msg[30]; }
# ErrorMessage { char file[128]; char func[128]; char message[250]; unsigned line; } -> 512 bytes
_ERR_COUNT = 30
_ERR_MSG_SIZE = 512
_ERR_BUF_SIZE = 4 + _ERR_COUNT * _ERR_MSG_SIZE

_CASTS = {
    "fp16": ("e", float),
    "bf16": (None, float),
    "int32": ("i", int),
    "int16": ("h", int),
    "int8": ("b", int),
    "uint8": ("B", int),
}

_ENTRY_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                               ctypes.c_uint64, ctypes.c_uint64)


def _bf16_bytes(values: list[float]) -> bytes:
    t = torch.tensor(values, dtype=torch.float32).to(torch.bfloat16)
    return t.view(torch.int16).numpy().tobytes()


def _pack_numbers(values: list, kind: type, cast: str | None) -> bytes:
    """Pack Python numbers as the kernel expects: int64 / float32, or per ``arg_casts``."""
    if cast is None:
        if kind is int:
            return struct.pack(f"<{len(values)}q", *[int(v) for v in values])
        return struct.pack(f"<{len(values)}f", *[float(v) for v in values])
    if cast not in _CASTS:
        raise RuntimeError(f"Unsupported cast instruction {cast}")
    fmt, conv = _CASTS[cast]
    if fmt is None:
        return _bf16_bytes([float(v) for v in values])
    if conv is int:
        # same wrap-around as a C++ static_cast to the narrow type
        bits = {"i": 32, "h": 16, "b": 8, "B": 8}[fmt]
        vals = []
        for v in values:
            iv = int(v) & ((1 << bits) - 1)
            if fmt != "B" and iv >= 1 << (bits - 1):
                iv -= 1 << bits
            vals.append(iv)
        return struct.pack(f"<{len(vals)}{fmt}", *vals)
    return struct.pack(f"<{len(values)}{fmt}", *[conv(v) for v in values])


def _tensor_extent(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [lo, hi) a kernel may legally touch through this tensor's data pointer."""
    base = t.data_ptr()
    if t.numel() == 0:
        return base, base
    es = t.element_size()
    lo_off = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if st < 0)
    hi_off = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if st > 0)
    return base + lo_off * es, base + (hi_off + 1) * es


class _Launch:
    """Everything a single dispatch keeps alive until the kernel has run."""

    __slots__ = ("keep", "slots", "bounds", "first_tensor", "device_index")

    def __init__(self) -> None:
        self.keep: list[Any] = []
        self.slots: dict[int, int] = {}
        self.bounds: dict[int, tuple[int, int]] = {}
        self.first_tensor: torch.Tensor | None = None
        self.device_index: int | None = None

    def bytes_arg(self, idx: int, data: bytes) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        self.keep.append(buf)
        addr = ctypes.addressof(buf)
        self.slots[idx] = addr
        self.bounds[idx] = (addr, addr + len(data))


class MetalKernel:
    """A compiled kernel: ``kernel(*args, threads=None, group_size=None, arg_casts=None, error_buf_idx=None)``."""

    def __init__(self, library: "ShaderLibrary", info: dict, fn_ptr: int) -> None:
        self._library = library
        self._info = info
        self._fn_ptr = fn_ptr
        self._entry = _ENTRY_TYPE(fn_ptr)
        self.__name__ = info["name"]

    # ------------------------------------------------------------------ properties
    @property
    def max_threads_per_threadgroup(self) -> int:
        return int(self._info["max_threads"])

    @property
    def thread_execution_width(self) -> int:
        return 32

    @property
    def static_thread_group_memory_length(self) -> int:
        return int(self._info["tg_mem"])

    def __repr__(self) -> str:
        return f"<mps_ext shader kernel '{self._info['name']}'>"

    # ------------------------------------------------------------------ binding
    def _bind(self, args: tuple, arg_casts: Any) -> _Launch:
        checked = self._library._checked
        if arg_casts is None:
            default_cast, cast_map = None, {}
        elif isinstance(arg_casts, str):
            default_cast, cast_map = arg_casts, {}
        elif isinstance(arg_casts, dict):
            default_cast, cast_map = None, {int(k): v for k, v in arg_casts.items()}
        else:
            raise TypeError("arg_casts must be a str or a dict {argument index: str}")
        L = _Launch()
        for idx, a in enumerate(args):
            cast = cast_map.get(idx, default_cast)
            if isinstance(a, torch.Tensor):
                if L.first_tensor is None:
                    L.first_tensor = a
                if a.device.type == DEVICE_TYPE:
                    if L.device_index is None:
                        L.device_index = a.device.index or 0
                    L.slots[idx] = a.data_ptr()
                    if checked:
                        L.bounds[idx] = _tensor_extent(a)
                    L.keep.append(a)
                elif a.device.type == "cpu":
                    if a.dim() != 0:
                        raise RuntimeError("Passed CPU tensor to MPS op")
                    if a.dtype == torch.float64:
                        L.bytes_arg(idx, struct.pack("<f", float(a.item())))
                    else:
                        L.bytes_arg(idx, a.contiguous().view(torch.uint8).numpy().tobytes()
                                    if a.dtype != torch.bool else bytes([int(bool(a.item()))]))
                else:
                    raise RuntimeError("Unsupported argument type")
            elif isinstance(a, (list, tuple)):
                if len(a) == 0:
                    raise RuntimeError("Empty list/tuple can not be an argument to metal kernel")
                first = a[0]
                if isinstance(first, torch.Tensor):
                    ptrs = []
                    for t in a:
                        if not isinstance(t, torch.Tensor):
                            raise RuntimeError("Unexpected argument types")
                        if t.device.type != DEVICE_TYPE:
                            raise RuntimeError("Passed CPU tensor to MPS op")
                        L.keep.append(t)
                        ptrs.append(t.data_ptr())
                    L.bytes_arg(idx, struct.pack(f"<{len(ptrs)}Q", *ptrs))
                elif isinstance(first, (bool, int)):
                    if not all(isinstance(v, (bool, int)) for v in a):
                        raise RuntimeError("Unexpected argument types")
                    L.bytes_arg(idx, _pack_numbers(list(a), int, cast))
                elif isinstance(first, float):
                    if not all(isinstance(v, (float, int)) and not isinstance(v, bool) for v in a):
                        raise RuntimeError("Unexpected argument types")
                    L.bytes_arg(idx, _pack_numbers(list(a), float, cast))
                else:
                    raise RuntimeError("Unexpected argument types")
            elif isinstance(a, float):
                L.bytes_arg(idx, _pack_numbers([a], float, cast))
            elif isinstance(a, (bool, int)):
                L.bytes_arg(idx, _pack_numbers([int(a)], int, cast))
            else:
                raise RuntimeError("Unsupported argument type")
        return L

    @staticmethod
    def _dims(value: Any, what: str) -> list[int] | None:
        if value is None:
            return None
        if isinstance(value, bool):
            raise TypeError(f"{what} must be an int or a sequence of 1 to 3 ints")
        if isinstance(value, int):
            return [value]
        try:
            dims = [int(v) for v in value]
        except TypeError:
            raise TypeError(f"{what} must be an int or a sequence of 1 to 3 ints") from None
        return dims

    def __call__(self, *args: Any, threads: Any = None, group_size: Any = None, arg_casts: Any = None,
                 error_buf_idx: int | None = None) -> None:
        L = self._bind(args, arg_casts)
        err_buf = None
        if error_buf_idx is not None:
            err_buf = ctypes.create_string_buffer(_ERR_BUF_SIZE)
            L.keep.append(err_buf)
            addr = ctypes.addressof(err_buf)
            L.slots[int(error_buf_idx)] = addr
            L.bounds[int(error_buf_idx)] = (addr, addr + _ERR_BUF_SIZE)
        tdims = self._dims(threads, "threads")
        if tdims is None and L.first_tensor is not None:
            tdims = [L.first_tensor.numel()]
        if tdims is None or not 1 <= len(tdims) <= 3:
            raise RuntimeError("Number of threads is undefined or has wrong dimension")
        gdims = self._dims(group_size, "group_size")
        max_tg = self.max_threads_per_threadgroup
        if gdims is not None and len(gdims) != len(tdims):
            raise RuntimeError("size and group_size must have same number of dimensions")
        if any(t < 0 or t >= 1 << 32 for t in tdims):
            raise ValueError(f"threads must be in [0, 2**32), got {tdims}")
        if gdims is None:
            gdims = [max(1, min(tdims[0], max_tg))] if len(tdims) == 1 else [max_tg] + [1] * (len(tdims) - 1)
        prod = 1
        for g in gdims:
            prod *= g
        if prod > max_tg:
            raise ValueError(f"Threadgroup size exceeds {max_tg} limit")
        if any(g <= 0 for g in gdims):
            raise ValueError(f"group_size must be positive, got {gdims}")
        grid = (tdims + [1, 1])[:3]
        group = (gdims + [1, 1])[:3]
        nb = max(self._info["nbuffers"], (max(L.slots) + 1) if L.slots else 0)
        missing = [i for i in range(self._info["nbuffers"]) if i not in L.slots]
        if missing:
            raise RuntimeError(
                f"kernel '{self._info['name']}' reads buffer {missing[0]} "
                f"('{self._buffer_param_name(missing[0])}') but only {len(args)} argument(s) were passed")
        n_groups = 1
        for gsz, gd in zip(grid, group):
            n_groups *= (gsz + gd - 1) // gd
        if n_groups == 0:
            return
        if self._library._checked:
            block = (ctypes.c_void_p * (3 * nb))()
            for i in range(nb):
                block[i] = L.slots.get(i, 0)
                lo, hi = L.bounds.get(i, (0, 0))
                block[nb + i] = lo
                block[2 * nb + i] = hi
        else:
            block = (ctypes.c_void_p * max(nb, 1))()
            for i, p in L.slots.items():
                block[i] = p
        L.keep.append(block)
        _launch(self, block, grid, group, n_groups, L)
        self._after_launch(L, err_buf)

    def _buffer_param_name(self, idx: int) -> str:
        for (role, val), name in zip(self._info["roles"], self._info["param_names"]):
            if role == "buffer" and val == idx:
                return name
        return "?"

    def _after_launch(self, L: _Launch, err_buf) -> None:
        msgs = []
        native = self._library._take_error()
        if native:
            msgs.append(native)
        if err_buf is not None:
            raw = err_buf.raw
            count = min(struct.unpack_from("<I", raw, 0)[0], _ERR_COUNT)
            for i in range(count):
                off = 4 + i * _ERR_MSG_SIZE
                file = raw[off : off + 128].split(b"\0", 1)[0].decode(errors="replace")
                func = raw[off + 128 : off + 256].split(b"\0", 1)[0].decode(errors="replace")
                message = raw[off + 256 : off + 506].split(b"\0", 1)[0].decode(errors="replace")
                line = struct.unpack_from("<I", raw, off + 508)[0]
                msgs.append(f"{message} (reported by kernel '{func}' at {file}:{line})")
        if msgs:
            _report(L.device_index, "\n".join(msgs))


_native_cache: list = []


def _native():
    if not _native_cache:
        try:
            import torch_mps_ext

            _native_cache.append(getattr(torch_mps_ext, "_C", None))
        except Exception:  # pragma: no cover - package not built yet
            return None
    return _native_cache[0]


def _report(device_index: int | None, message: str) -> None:
    """Record a kernel error on the device: the next ``torch.mps_ext.synchronize()`` raises it."""
    C = _native()
    idx = device_index if device_index is not None else _current_device_index()
    if C is not None and hasattr(C, "_report_error"):
        C._report_error(int(idx), message)
    else:  # pragma: no cover - the native module always provides _report_error
        raise torch.AcceleratorError(message)


def _current_device_index() -> int:
    try:
        import torch_mps_ext

        return int(torch_mps_ext.current_device())
    except Exception:
        return 0


def _launch(kernel: MetalKernel, block, grid, group, n_groups: int, L: _Launch) -> None:
    C = _native()
    if C is not None and hasattr(C, "_launch_groups"):
        C._launch_groups(kernel._fn_ptr, ctypes.addressof(block), tuple(grid), tuple(group), n_groups)
        return
    # TEMPORARY fallback until torch_mps_ext._C._launch_groups exists: the library's own
    # OpenMP launcher spreads the threadgroups over torch's intra-op threads.
    g = (ctypes.c_uint32 * 3)(*grid)
    s = (ctypes.c_uint32 * 3)(*group)
    kernel._library._launch_parallel(kernel._fn_ptr, ctypes.addressof(block), g, s, n_groups,
                                     torch.get_num_threads())


class ShaderLibrary:
    """Kernels of one compiled shader source: ``lib.<kernel name>``; ``dir(lib)`` lists them."""

    def __init__(self, path: Path, from_cache: bool = False) -> None:
        self._path = Path(path)
        self._from_cache = from_cache
        try:
            self._dll = ctypes.CDLL(str(self._path), mode=getattr(ctypes, "RTLD_LOCAL", 0))
        except OSError as e:
            raise RuntimeError(f"{path} is not a torch_mps_ext shader library: {e}") from None
        try:
            # mpsx_library_info is a char array, not a pointer: read it from its address
            raw = ctypes.c_char.in_dll(self._dll, "mpsx_library_info")
        except ValueError:
            raise RuntimeError(f"{path} is not a torch_mps_ext shader library") from None
        info = json.loads(ctypes.string_at(ctypes.addressof(raw)).decode())
        self._checked = _is_checked_lib(self._dll)
        self._kernels: dict[str, MetalKernel] = {}
        for k in info["kernels"]:
            fn = getattr(self._dll, k["symbol"])
            self._kernels[k["name"]] = MetalKernel(self, k, ctypes.cast(fn, ctypes.c_void_p).value)
        self._take_error_fn = self._dll.mpsx_take_error
        self._take_error_fn.restype = ctypes.c_char_p
        self._launch_parallel = self._dll.mpsx_launch_parallel
        self._launch_parallel.restype = None
        self._launch_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
                                          ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint64, ctypes.c_int]

    def _take_error(self) -> str | None:
        r = self._take_error_fn()
        return r.decode(errors="replace") if r else None

    def __getattr__(self, name: str) -> MetalKernel:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        kernels = self.__dict__.get("_kernels")
        if kernels is not None and name in kernels:
            return kernels[name]
        raise RuntimeError(f"Failed to create function state object for: {name}")

    def __dir__(self) -> list[str]:
        return sorted(self._kernels)

    def __repr__(self) -> str:
        return f"<mps_ext shader library {self._path.name}: {', '.join(sorted(self._kernels))}>"


def _is_checked_lib(dll) -> bool:
    try:
        ctypes.c_int.in_dll(dll, "mpsx_checked_build")
        return True
    except ValueError:
        return False
