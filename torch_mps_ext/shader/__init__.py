"""Metal Shading Language kernels on the mps_ext device: ``compile_shader`` and ``load_metallib``.

``compile_shader(source)`` accepts the MSL a user would hand to ``torch.mps.compile_shader``
and compiles it for the host CPU (see docs/shaders.md for how MSL becomes C++, the execution
model, the cache and the checked mode).  Environment variables:

* ``TORCH_MPS_EXT_SHADER_CACHE``   -- cache directory (default ``~/.cache/torch_mps_ext/shaders``);
  it must be writable by this user alone (docs/security.md)
* ``TORCH_MPS_EXT_SHADER_CHECKED`` -- ``1``: bounds-check every device-pointer access
  (through pointer arithmetic and helper functions too) and report an out-of-bounds access
  (kernel, argument and element) at the next ``synchronize()``
* ``TORCH_MPS_EXT_SHADER_CCACHE``  -- ``0``: do not use ccache even if it is installed
* ``TORCH_MPS_EXT_SHADER_ARCH_FLAGS`` -- replaces ``-march=native``
* ``TORCH_MPS_EXT_SHADER_COMPILE_TIMEOUT_S`` -- CPU-time limit of a compiler run (wall clock:
  twice that)
* ``TORCH_MPS_EXT_SHADER_COMPILE_MEMORY_BYTES`` -- address-space limit of a compiler process
* ``CXX`` -- the host C++ compiler (default ``g++``)
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from . import _compiler, _frontend
from ._compiler import CompilerLimitError
from ._library import MetalKernel, ShaderLibrary

__all__ = ["compile_shader", "load_metallib", "MetalKernel", "ShaderLibrary", "library_path", "stats",
           "CompilerLimitError"]

stats = _compiler.stats
# (cache directory, library key) -> library: a repeated compile_shader of a source touches no file
_by_key: dict[tuple[str, str], ShaderLibrary] = {}
# (st_dev, st_ino) of a loaded file -> library (a loaded file stays mapped: never reused)
_loaded: dict[tuple[int, int], ShaderLibrary] = {}
_lock = threading.Lock()


def compile_shader(source: str, *, include_dirs: str | os.PathLike | Sequence[str | os.PathLike] | None = None
                   ) -> ShaderLibrary:
    r"""Compiles compute shader from source and allows one to invoke kernels
    defined there from the comfort of Python runtime
    Example::

        >>> lib = torch.mps_ext.compile_shader(
        ... "kernel void full(device float* out, constant float& val, uint idx [[thread_position_in_grid]]) { out[idx] = val; }"
        ...  )
        >>> x = torch.zeros(16, device="mps_ext")
        >>> lib.full(x, 3.14)

    ``include_dirs`` (keyword only, an extension of torch.mps.compile_shader's signature):
    directories whose files the source may ``#include``, besides ``<metal_stdlib>`` and torch's
    ``<c10/metal/...>`` headers. A shader can include nothing else (docs/shaders.md, "Security").
    """
    if not isinstance(source, str):
        raise TypeError(f"compile_shader expects the shader source as str, got {type(source).__name__}")
    if include_dirs is not None:
        return _frontend.with_include_dirs(source, include_dirs, compile_shader)
    memo = (_compiler.cache_path()[0], _compiler.library_key(source, _compiler.checked_mode()))
    lib = _by_key.get(memo)
    if lib is not None:
        with _compiler._lock:
            stats["cache_hits"] += 1
        return lib
    with _compiler.compile_library(source) as entry:
        lib = _open(entry.path, entry.from_cache, entry.ident, entry.load_path, entry.frames)
    _by_key[memo] = lib
    return lib


def _open(path: Path, from_cache: bool, ident: tuple[int, int], load_path: str,
          frames: dict | None = None) -> ShaderLibrary:
    with _lock:
        lib = _loaded.get(ident)
        if lib is None:
            lib = ShaderLibrary(path, from_cache, load_path=load_path, frames=frames)
            _loaded[ident] = lib
    return lib


def _load_bytes(data: bytes) -> ShaderLibrary:
    """Load library bytes through the cache directory: ``loaded-<sha256>.so``, checked against
    the digest of ``data`` itself (a file planted or corrupted under that name is replaced,
    never loaded)."""
    digest = hashlib.sha256(data).hexdigest()
    d = _compiler.cache()
    name = f"loaded-{digest[:40]}.so"
    fd = d.open_verified(name, digest)
    if fd is None:
        d.write(name, data)
        fd = d.open_verified(name, digest)
        if fd is None:
            raise RuntimeError(f"{d.path / name} changed on disk as it was written; try again")
    with _compiler.LibraryFile(d, name, fd, True) as entry:
        try:
            return _open(entry.path, True, entry.ident, entry.load_path)
        except RuntimeError:
            d.unlink(name)  # not a library: leave nothing behind
            raise


def load_metallib(source: bytes | str | os.PathLike) -> ShaderLibrary:
    """Load a compiled shader library, as produced by ``compile_shader`` (its cache file).

    ``source`` is the library's bytes or a path to it (``library_path(lib)`` gives the path).
    A file with a digest beside it (``<file>.sha256``, as the cache stores one next to every
    library) must match it, or a ``RuntimeError`` says so and nothing is loaded. Bytes, and
    files outside the cache, are loaded from a copy in the cache directory named by their
    SHA-256 and checked against it.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _load_bytes(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no shader library at {path}")
        d = _compiler.cache()
        if path.resolve().parent == Path(os.path.realpath(d.path)) and \
                _compiler.stored_digest(d, path.name) is not None:
            # an entry of the cache: opened through the checked directory, like compile_shader
            fd = _compiler.open_entry(d, path.name)
            if fd is None:
                raise _digest_mismatch(path)
            with _compiler.LibraryFile(d, path.name, fd, True) as entry:
                return _open(entry.path, True, entry.ident, entry.load_path, entry.frames)
        data = path.read_bytes()
        digest_file = path.with_name(path.name + _compiler.DIGEST_SUFFIX)
        if digest_file.is_file():
            stored = digest_file.read_bytes().split()
            if not stored or stored[0].decode("ascii", "replace") != hashlib.sha256(data).hexdigest():
                raise _digest_mismatch(path)
        return _load_bytes(data)
    raise TypeError(f"expected bytes or path, got {type(source).__name__}")


def _digest_mismatch(path: Path) -> RuntimeError:
    return RuntimeError(f"{path} does not match the digest stored beside it ({path.name}"
                        f"{_compiler.DIGEST_SUFFIX}): the file is truncated, corrupted or was "
                        "modified; it was not loaded")


def library_path(lib: ShaderLibrary) -> Path:
    """Path of the compiled library file behind ``lib`` (loadable with ``load_metallib``)."""
    return lib._path
