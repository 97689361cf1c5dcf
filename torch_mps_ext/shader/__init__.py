"""Metal Shading Language kernels on the mps_ext device: ``compile_shader`` and ``load_metallib``.

``compile_shader(source)`` accepts the MSL a user would hand to ``torch.mps.compile_shader``
and compiles it for the host CPU (see docs/shaders.md for how MSL becomes C++, the execution
model, the cache and the checked mode).  Environment variables:

* ``TORCH_MPS_EXT_SHADER_CACHE``   -- cache directory (default ``~/.cache/torch_mps_ext/shaders``)
* ``TORCH_MPS_EXT_SHADER_CHECKED`` -- ``1``: bounds-check device buffer accesses and report
  out-of-bounds accesses (kernel and argument named) at the next ``synchronize()``
* ``TORCH_MPS_EXT_SHADER_CCACHE``  -- ``0``: do not use ccache even if it is installed
* ``TORCH_MPS_EXT_SHADER_ARCH_FLAGS`` -- replaces ``-march=native``
* ``CXX`` -- the host C++ compiler (default ``g++``)
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from . import _compiler
from ._library import MetalKernel, ShaderLibrary

__all__ = ["compile_shader", "load_metallib", "MetalKernel", "ShaderLibrary", "library_path", "stats"]

stats = _compiler.stats
_loaded: dict[str, ShaderLibrary] = {}
_lock = threading.Lock()


def compile_shader(source: str) -> ShaderLibrary:
    r"""Compiles compute shader from source and allows one to invoke kernels
    defined there from the comfort of Python runtime
    Example::

        >>> lib = torch.mps_ext.compile_shader(
        ... "kernel void full(device float* out, constant float& val, uint idx [[thread_position_in_grid]]) { out[idx] = val; }"
        ...  )
        >>> x = torch.zeros(16, device="mps_ext")
        >>> lib.full(x, 3.14)
    """
    if not isinstance(source, str):
        raise TypeError(f"compile_shader expects the shader source as str, got {type(source).__name__}")
    path, from_cache = _compiler.compile_library(source)
    return _open(path, from_cache)


def _open(path: Path, from_cache: bool) -> ShaderLibrary:
    key = str(Path(path).resolve())
    with _lock:
        lib = _loaded.get(key)
        if lib is None:
            lib = ShaderLibrary(path, from_cache)
            _loaded[key] = lib
    return lib


def load_metallib(source: bytes | str | os.PathLike) -> ShaderLibrary:
    """Load a compiled shader library, as produced by ``compile_shader`` (its cache file).

    ``source`` is the library's bytes or a path to it (``library_path(lib)`` gives the path).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        digest = hashlib.sha256(data).hexdigest()[:40]
        path = _compiler.cache_dir() / f"loaded-{digest}.so"
        if not path.exists():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return _open(path, True)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no shader library at {path}")
        return _open(path, True)
    raise TypeError(f"expected bytes or path, got {type(source).__name__}")


def library_path(lib: ShaderLibrary) -> Path:
    """Path of the compiled library file behind ``lib`` (loadable with ``load_metallib``)."""
    return lib._path
