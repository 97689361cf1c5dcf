"""Shader library and kernel objects: argument binding and launch (SPEC §6 calling convention)."""

from __future__ import annotations

import ctypes
import functools
import json
import struct
from pathlib import Path
from typing import Any

import torch

from .. import _C

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
    """The arguments of one dispatch: pointers to device memory and inline bytes."""

    __slots__ = ("keep", "ptrs", "data", "first_tensor", "device_index", "tensors", "items")

    def __init__(self) -> None:
        self.keep: list[Any] = []  # tensors referenced by the launch
        self.ptrs: dict[int, tuple[int, int, int]] = {}  # slot -> (pointer, lo, hi)
        self.data: dict[int, bytes] = {}  # slot -> bytes copied into the argument block
        self.first_tensor: torch.Tensor | None = None
        self.device_index: int | None = None
        self.tensors: dict[int, torch.Tensor] = {}  # slot -> device tensor bound there
        # checked builds: (lo, hi, slot, index) of each tensor of a list bound to a slot
        self.items: list[tuple[int, int, int, int]] = []

    def bytes_arg(self, idx: int, data: bytes) -> None:
        self.ptrs.pop(idx, None)
        self.data[idx] = data

    def slots(self) -> set[int]:
        return set(self.ptrs) | set(self.data)

    def block(self, nslots: int, err_slot: int | None, checked: bool) -> bytearray:
        """The self-describing, relocatable argument block (layout: include/mpsx_runtime.h)."""
        inline = 1 << 63
        nwords = 4 + nslots * (3 if checked else 1)
        offsets = {}
        pos = nwords * 8
        for idx, d in self.data.items():
            pos = (pos + 15) & ~15
            offsets[idx] = pos
            pos += len(d)
        table = b""
        if checked and self.items:
            # header[3]: the extents of the tensors of lists (argument buffers), for pointers
            # read from them: {n, n x {lo, hi, slot, index}}
            table = struct.pack(f"<{1 + 4 * len(self.items)}Q", len(self.items),
                                *[v for item in self.items for v in item])
            pos = (pos + 15) & ~15
            table_off = pos
            pos += len(table)
        buf = bytearray(pos)
        words = [pos, nslots, 0xFFFFFFFFFFFFFFFF if err_slot is None else err_slot,
                 inline | table_off if table else 0] + [0] * (nwords - 4)
        if table:
            buf[table_off : table_off + len(table)] = table
        for idx in range(nslots):
            if idx in self.ptrs:
                p, lo, hi = self.ptrs[idx]
                words[4 + idx] = p
                if checked:
                    words[4 + nslots + idx], words[4 + 2 * nslots + idx] = lo, hi
            elif idx in offsets:
                off = offsets[idx]
                words[4 + idx] = inline | off
                if checked:
                    words[4 + nslots + idx] = inline | off
                    words[4 + 2 * nslots + idx] = inline | (off + len(self.data[idx]))
        struct.pack_into(f"<{nwords}Q", buf, 0, *words)
        for idx, off in offsets.items():
            d = self.data[idx]
            buf[off : off + len(d)] = d
        return buf


class MetalKernel:
    """A compiled kernel: ``kernel(*args, threads=None, group_size=None, arg_casts=None, error_buf_idx=None)``."""

    def __init__(self, library: "ShaderLibrary", info: dict, fn_ptr: int) -> None:
        self._library = library
        self._info = info
        self._fn_ptr = fn_ptr
        self._stack_need: int | None = None  # bytes of stack a fiber needs (synchronizing kernels)
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
    @functools.cached_property
    def _buffer_params(self) -> dict[int, tuple[str, str, str]]:
        """Buffer index -> (parameter name, type text, address space); computed
        once per kernel, not per launch."""
        info = self._info
        spaces = info.get("param_spaces") or [""] * len(info["roles"])
        return {val: (name, ptype, space)
                for (role, val), name, ptype, space in zip(info["roles"], info["param_names"],
                                                           info["param_types"], spaces)
                if role == "buffer"}

    def _check_bindings(self, L: "_Launch", err_slot: int | None) -> None:
        """What would make the kernel touch memory it was not given: a
        number or a list bound to a `device` pointer (the kernel would
        dereference the number's bytes as an address), or an overlapping
        (expanded) tensor bound to a pointer the kernel writes through."""
        for idx, (name, ptype, space) in self._buffer_params.items():
            pointer = ptype.rstrip().endswith("*")
            if space == "device" and pointer and idx in L.data and idx != err_slot:
                raise TypeError(
                    f"kernel '{self._info['name']}': argument {idx} ('{name}') is a device "
                    f"pointer ({space} {ptype}); pass an mps_ext tensor, not a number or a list")
            t = L.tensors.get(idx)
            writable = pointer and space == "device" and not ptype.lstrip().startswith("const")
            if t is not None and writable and any(
                    st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
                raise ValueError(
                    f"kernel '{self._info['name']}': argument {idx} ('{name}') is written "
                    "through, but the tensor's elements overlap in memory (an expanded view); "
                    "pass a tensor with its own memory (e.g. .contiguous())")

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
                    lo, hi = _tensor_extent(a) if checked else (0, 0)
                    L.ptrs[idx] = (a.data_ptr(), lo, hi)
                    L.tensors[idx] = a
                    L.keep.append(a)
                elif a.device.type == "cpu":
                    if a.dim() != 0:
                        raise RuntimeError("Passed CPU tensor to MPS op")
                    if a.dtype == torch.float64:
                        L.bytes_arg(idx, struct.pack("<f", float(a.item())))
                    else:
                        # The value's own bytes, in its dtype (a 0-dim tensor
                        # cannot be viewed as bytes: reshape to 1 element).
                        L.bytes_arg(idx, a.detach().reshape(1).view(torch.uint8).numpy().tobytes()
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
                        if checked:
                            L.items.append((*_tensor_extent(t), idx, len(ptrs) - 1))
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
        need = self._stack_need
        if need is not None and need > FIBER_STACK_LIMIT:
            raise RuntimeError(
                f"kernel '{self._info['name']}' needs {need / 2**20:.1f} MiB of stack per thread (its "
                f"private arrays and the functions it calls, as measured by the compiler), more than "
                f"the {FIBER_STACK_LIMIT >> 20} MiB limit for a thread of a kernel that synchronizes "
                "(threadgroup_barrier, simd-group functions); keep large arrays in threadgroup or "
                "device memory")
        L = self._bind(args, arg_casts)
        err_slot = None
        if error_buf_idx is not None:
            err_slot = int(error_buf_idx)
            if err_slot not in self._buffer_params:
                raise ValueError(
                    f"error_buf_idx={error_buf_idx} is not a buffer index of kernel "
                    f"'{self._info['name']}' (its buffers: "
                    f"{sorted(self._buffer_params) or 'none'})")
            L.bytes_arg(err_slot, bytes(_ERR_BUF_SIZE))
        tdims = self._dims(threads, "threads")
        if tdims is None and L.first_tensor is not None:
            tdims = [L.first_tensor.numel()]
        if tdims is None or not 1 <= len(tdims) <= 3:
            raise RuntimeError("Number of threads is undefined or has wrong dimension")
        self._check_bindings(L, err_slot)
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
        bound = L.slots()
        missing = [i for i in range(self._info["nbuffers"]) if i not in bound]
        if missing:
            raise RuntimeError(
                f"kernel '{self._info['name']}' reads buffer {missing[0]} "
                f"('{self._buffer_param_name(missing[0])}') but only {len(args)} argument(s) were passed")
        n_groups = 1
        for gsz, gd in zip(grid, group):
            n_groups *= (gsz + gd - 1) // gd
        if n_groups == 0:
            return
        nslots = max([self._info["nbuffers"]] + [i + 1 for i in bound])
        block = L.block(nslots, err_slot, self._library._checked)
        device = L.device_index if L.device_index is not None else _C._current_device()
        attrs = json.dumps({"grid": grid, "group": group, "groups": n_groups}) \
            if _C._profiler_consumers() else "{}"
        # Queued on the device's current stream; returns at once (aten/ShaderLaunch.h).
        _C._launch_kernel(self._info["name"], device, self._fn_ptr, self._library._finish_ptr,
                          bytes(block), grid, group, n_groups, L.keep, attrs)

    def _buffer_param_name(self, idx: int) -> str:
        for (role, val), name in zip(self._info["roles"], self._info["param_names"]):
            if role == "buffer" and val == idx:
                return name
        return "?"


class ShaderLibrary:
    """Kernels of one compiled shader source: ``lib.<kernel name>``; ``dir(lib)`` lists them."""

    def __init__(self, path: Path, from_cache: bool = False, load_path: str | None = None,
                 frames: dict[str, int | None] | None = None) -> None:
        # load_path: what dlopen opens, when not `path` -- the cache's verified file through
        # its directory's descriptor (shader/_compiler.py, docs/security.md)
        self._path = Path(path)
        self._from_cache = from_cache
        try:
            self._dll = ctypes.CDLL(load_path or str(self._path), mode=getattr(ctypes, "RTLD_LOCAL", 0))
        except OSError as e:
            msg = str(e).replace(load_path, str(self._path)) if load_path else e
            raise RuntimeError(f"{path} is not a torch_mps_ext shader library: {msg}") from None
        try:
            # mpsx_library_info is a char array, not a pointer: read it from its address
            raw = ctypes.c_char.in_dll(self._dll, "mpsx_library_info")
        except ValueError:
            raise RuntimeError(f"{path} is not a torch_mps_ext shader library") from None
        info = json.loads(ctypes.string_at(ctypes.addressof(raw)).decode())
        self._checked = _is_checked_lib(self._dll)
        self._kernels: dict[str, MetalKernel] = {}
        frames = frames or {}
        for k in info["kernels"]:
            fn = getattr(self._dll, k["symbol"])
            kern = MetalKernel(self, k, ctypes.cast(fn, ctypes.c_void_p).value)
            kern._stack_need = frames.get(k["symbol"]) if k.get("sync") else None
            self._kernels[k["name"]] = kern
        self._fiber_stack = _set_fiber_stack(self._dll, [
            kern._stack_need for kern in self._kernels.values()
            if kern._stack_need is not None and kern._stack_need <= FIBER_STACK_LIMIT])
        finish = self._dll.mpsx_finish
        self._finish_ptr = ctypes.cast(finish, ctypes.c_void_p).value

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


# Fiber stacks (kernels that synchronize): sized from the compiler's frame sizes
# (shader/_compiler.py fiber_frames), at least the default; a kernel needing more than the
# limit is refused at launch.  The margin covers the stagger of stack tops (64 KiB), the guard
# page and frames the compiler does not see (libm, the C library).
FIBER_STACK_DEFAULT = 256 << 10
FIBER_STACK_LIMIT = 4 << 20
_FIBER_STACK_MARGIN = 128 << 10


def _set_fiber_stack(dll, needs: list[int]) -> int:
    size = FIBER_STACK_DEFAULT
    if needs:
        size = max(size, (max(needs) + _FIBER_STACK_MARGIN + 0xFFFF) & ~0xFFFF)
    try:
        ctypes.c_size_t.in_dll(dll, "mpsx_fiber_stack_size").value = size
    except ValueError:  # a library built before the stack size was configurable
        return FIBER_STACK_DEFAULT
    return size


def _is_checked_lib(dll) -> bool:
    try:
        ctypes.c_int.in_dll(dll, "mpsx_checked_build")
        return True
    except ValueError:
        return False
