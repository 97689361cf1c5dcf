"""Host compiler driver and the on-disk cache of compiled shader libraries.

Cache: ``$TORCH_MPS_EXT_SHADER_CACHE`` if set, else ``$XDG_CACHE_HOME/torch_mps_ext/shaders``
(``~/.cache/torch_mps_ext/shaders``), a directory only this user can write (mode 0700; see
docs/security.md). A library is one shared object named by the SHA-256 of (user source,
backend headers and front end, compiler flags, compiler identity, host CPU flags, checked mode,
package and torch versions); it embeds its own kernel table (``mpsx_library_info``), so the
file alone is a complete "metallib" that ``load_metallib`` can open. Beside it,
``<key>.so.sha256`` holds its digest (``sha256sum -c`` format), checked before every load: a
truncated, zero-filled or modified library is rebuilt, never loaded. ``<key>.cpp`` keeps the
generated C++ for debugging. The host compiler runs under CPU-time and memory limits and a
timeout (``TORCH_MPS_EXT_SHADER_COMPILE_TIMEOUT_S``, ``..._COMPILE_MEMORY_BYTES``).
"""

from __future__ import annotations

import ctypes.util
import errno
import functools
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import _private_files, _settings
from . import _frontend as fe

INCLUDE_DIR = Path(__file__).parent / "include"
FORMAT_VERSION = "mpsx-shader-1"

# Counters that make the cache observable (tests, docs): how often the host compiler ran.
stats = {"compiler_runs": 0, "cache_hits": 0, "preprocessor_runs": 0}
_lock = threading.Lock()


def cache_path() -> tuple[str, bool]:
    """The cache directory's path (not checked or created) and whether it is the default one."""
    env = _settings.get("TORCH_MPS_EXT_SHADER_CACHE")
    if env:
        return os.path.abspath(env), False
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "torch_mps_ext", "shaders")), True


_dirs: dict[str, _private_files.PrivateDir] = {}


def cache() -> _private_files.PrivateDir:
    """The cache directory, open and checked private (created with mode 0700 if missing).

    One that another user owns or can write is refused (``InsecureDirectoryError``, a
    ``PermissionError``); the default directory, when it is this user's own but writable by
    others, is emptied and re-created with a warning instead."""
    path, default = cache_path()
    with _lock:
        d = _dirs.get(path)
        if d is not None and d.still_valid():
            return d
        if d is not None:
            d.close()
            del _dirs[path]
        d = _private_files.private_dir(
            path, purpose="the shader cache", managed=default,
            hint="Set TORCH_MPS_EXT_SHADER_CACHE to a directory only you can write "
                 "(it is created with mode 0700 if it does not exist).")
        _dirs[path] = d
        return d


def cache_dir() -> Path:
    return cache().path


def checked_mode() -> bool:
    return _settings.get("TORCH_MPS_EXT_SHADER_CHECKED", False)


@functools.lru_cache(maxsize=None)
def compiler() -> list[str]:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("compile_shader needs a host C++ compiler (g++ or clang++); none was found")
    cmd = [cxx]
    if _settings.get("TORCH_MPS_EXT_SHADER_CCACHE", True):
        ccache = shutil.which("ccache")
        if ccache and "ccache" not in cxx:
            cmd = [ccache, cxx]
    return cmd


@functools.lru_cache(maxsize=None)
def compiler_identity() -> str:
    cxx = compiler()[-1]
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except Exception:  # pragma: no cover
        out = ""
    return cxx + "|" + out.splitlines()[0] if out else cxx


@functools.lru_cache(maxsize=None)
def machine_identity() -> str:
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    ident += "|" + line.strip()
                if line.strip() == "":
                    break
    except OSError:  # pragma: no cover
        pass
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


COMMON_FLAGS = [
    "-x", "c++", "-std=gnu++17", "-D__METAL__=1", "-D__METAL_VERSION__=400", "-D__HAVE_BFLOAT__=1",
    "-DTORCH_MPS_EXT_SHADER=1",
]
CODEGEN_FLAGS = [
    "-O2", "-ftree-vectorize", "-fvect-cost-model=dynamic", "-fno-math-errno", "-fno-trapping-math",
    "-fsingle-precision-constant", "-fPIC", "-shared", "-w", "-fvisibility=hidden", "-fopenmp",
    "-fstack-usage",  # frame sizes: the fiber stacks of kernels that synchronize (fiber_frames)
]


@functools.lru_cache(maxsize=None)
def _math_flags() -> tuple[str, ...]:
    """libm, and glibc's vector math library where mpsx_metal.h declares
    its functions SIMD (x86-64 glibc); elsewhere those declarations are off.
    Looked up on the first build (find_library runs ldconfig)."""
    if sys.platform.startswith("linux") and platform.machine() == "x86_64" and \
            ctypes.util.find_library("mvec"):
        return ("-lmvec", "-lm")
    return ("-DMPSX_NO_LIBMVEC", "-lm")


def _arch_flags() -> list[str]:
    env = _settings.get("TORCH_MPS_EXT_SHADER_ARCH_FLAGS")
    if env is not None:
        return env.split()
    # the define puts the host CPU into ccache's key too: -march=native means a different
    # instruction set on another machine sharing the ccache directory
    return ["-march=native", f"-DMPSX_HOST_CPU={machine_identity()}"]


@functools.lru_cache(maxsize=None)
def headers_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(INCLUDE_DIR.iterdir()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(Path(fe.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def versions() -> str:
    """The package's and torch's versions (torch's c10/metal headers are inlined into sources)."""
    import torch

    try:
        from importlib.metadata import version

        own = version("torch_mps_ext")
    except Exception:  # pragma: no cover (not installed: the sources are hashed anyway)
        own = "unknown"
    return f"torch_mps_ext {own}|torch {torch.__version__} {getattr(torch.version, 'git_version', '')}"


def library_key(source: str, checked: bool) -> str:
    h = hashlib.sha256()
    for part in (FORMAT_VERSION, headers_hash(), versions(),
                 " ".join([*COMMON_FLAGS, *CODEGEN_FLAGS, *_arch_flags(), *_math_flags()]),
                 compiler_identity(), machine_identity(), "checked" if checked else "fast", source):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:40]


# ----------------------------------------------------------------------------- diagnostics
_DIAG_RE = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+):(?:(?P<col>\d+):)? (?P<kind>fatal error|error|warning|note): ")


def _format_diagnostics(output: str) -> tuple[str, int | None, int | None]:
    """Keep the compiler's errors (with their context lines); strip paths of our temp files."""
    lines = output.splitlines()
    keep = []
    first_line = first_col = None
    for ln in lines:
        ln2 = re.sub(r"\S*/(program_source|<generated entry points>)", r"\1", ln)
        ln2 = re.sub(r"\S*/torch_mps_ext/shader/include/", "<metal_stdlib>/", ln2)
        ln2 = re.sub(r"(?:\S*/build-[^/\s]*/|^|(?<=\s))shader\.cpp(?=:)", "<generated>", ln2)
        m = _DIAG_RE.match(ln2)
        if m and m["kind"] in ("error", "fatal error") and first_line is None and m["file"] == fe.SOURCE_NAME:
            first_line = int(m["line"])
            first_col = int(m["col"]) if m["col"] else None
        keep.append(ln2)
    text = "\n".join(keep[:80])
    if len(keep) > 80:
        text += f"\n... ({len(keep) - 80} more lines)"
    return text, first_line, first_col


def _syntax_error(msg: str, output: str, source: str) -> SyntaxError:
    diag, line, col = _format_diagnostics(output)
    full = f"{msg}\n{diag}" if diag else msg
    if line is not None:
        src_lines = source.split("\n")
        text = src_lines[line - 1] if 0 < line <= len(src_lines) else None
        return SyntaxError(full, (fe.SOURCE_NAME, line, col or 0, text))
    return SyntaxError(full)


# ----------------------------------------------------------------------------- limits
DEFAULT_TIMEOUT_S = 300
DEFAULT_MEMORY_BYTES = 4 << 30

_MEMORY_MESSAGES = ("virtual memory exhausted", "out of memory allocating", "std::bad_alloc",
                    "memory exhausted", "Cannot allocate memory")


def compile_limits() -> tuple[int, int]:
    """(CPU seconds per compiler process, address-space bytes per process). The wall-clock
    timeout of one compiler run is twice the CPU limit (a loaded machine shares its CPUs)."""
    return (_settings.get("TORCH_MPS_EXT_SHADER_COMPILE_TIMEOUT_S", DEFAULT_TIMEOUT_S),
            _settings.get("TORCH_MPS_EXT_SHADER_COMPILE_MEMORY_BYTES", DEFAULT_MEMORY_BYTES))


def _capped(which: int, soft: int, hard: int) -> tuple[int, int]:
    """(soft, hard), no higher than the hard limit this process already has (which a
    child could not raise)."""
    current = resource.getrlimit(which)[1]
    if current != resource.RLIM_INFINITY:
        hard = min(hard, current)
    return min(soft, hard), hard


class CompilerLimitError(RuntimeError):
    """The host compiler was stopped by one of its limits (CPU time, memory, timeout)."""


_SANITIZER_RUNTIME = re.compile(r"^lib(asan|ubsan|tsan|lsan|hwasan|clang_rt\.[a-z_]*san)[-.\w]*\.so")


def compiler_env() -> dict[str, str]:
    """The compiler's environment: ours without a sanitizer runtime in LD_PRELOAD (under
    `make asan` the interpreter has ASan preloaded; in the compiler it could not reserve its
    shadow memory under RLIMIT_AS, and every compile would fail) and without ASAN_OPTIONS."""
    env = dict(os.environ)
    preload = env.get("LD_PRELOAD")
    if preload is not None:
        keep = [p for p in re.split(r"[\s:]+", preload)
                if p and not _SANITIZER_RUNTIME.match(os.path.basename(p))]
        if keep:
            env["LD_PRELOAD"] = " ".join(keep)
        else:
            env.pop("LD_PRELOAD")
    env.pop("ASAN_OPTIONS", None)
    return env


def run_compiler(cmd: list[str], *, input: str | None = None, cwd_fd: int | None = None,
                 what: str = "compile") -> subprocess.CompletedProcess:
    """Run the host compiler under resource limits: RLIMIT_CPU, RLIMIT_AS (and no core
    files), set in the child before exec; its own session, so that a timeout (twice the
    CPU limit, wall clock) or an interrupt kills the whole process group (the driver's
    cc1plus/as/ld children too). ``cwd_fd``: run in that directory (by descriptor).
    A run stopped by a limit raises :class:`CompilerLimitError` naming the limit."""
    cpu_s, mem = compile_limits()
    # the soft CPU limit sends SIGXCPU, the hard one SIGKILL 5 s later
    cpu = _capped(resource.RLIMIT_CPU, cpu_s, cpu_s + 5)
    mem_l = _capped(resource.RLIMIT_AS, mem, mem)
    setrlimit, RLIMIT_CPU, RLIMIT_AS, RLIMIT_CORE = (resource.setrlimit, resource.RLIMIT_CPU,
                                                     resource.RLIMIT_AS, resource.RLIMIT_CORE)
    fchdir = os.fchdir

    def limit_child() -> None:  # between fork and exec: system calls only, no imports
        setrlimit(RLIMIT_CPU, cpu)
        setrlimit(RLIMIT_AS, mem_l)
        setrlimit(RLIMIT_CORE, (0, 0))
        if cwd_fd is not None:
            fchdir(cwd_fd)

    env = compiler_env()
    mem_error = (f"shader {what}: the host compiler ran out of memory under its limit of {mem} bytes "
                 f"(TORCH_MPS_EXT_SHADER_COMPILE_MEMORY_BYTES)")
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=limit_child, start_new_session=True, env=env)
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise CompilerLimitError(f"{mem_error}: {e.strerror}") from None
        raise
    timeout = 2 * cpu_s
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise CompilerLimitError(
            f"shader {what}: the host compiler ({cmd[0]}) did not finish within its timeout of "
            f"{timeout} s (twice TORCH_MPS_EXT_SHADER_COMPILE_TIMEOUT_S={cpu_s}) and was killed") from None
    except BaseException:
        _kill_group(proc)
        raise
    _kill_group(proc)  # anything the driver left running in its session
    rc = proc.returncode
    signaled = {-signal.SIGXCPU, -signal.SIGKILL}
    if rc in signaled or "CPU time limit exceeded" in err or (
            rc != 0 and "Killed signal terminated program" in err):
        raise CompilerLimitError(
            f"shader {what}: the host compiler exceeded its CPU-time limit of {cpu_s} s "
            f"(TORCH_MPS_EXT_SHADER_COMPILE_TIMEOUT_S) and was killed")
    if rc != 0 and any(m in err for m in _MEMORY_MESSAGES):
        raise CompilerLimitError(f"{mem_error}: {_first_line(err, _MEMORY_MESSAGES)}")
    if rc != 0 and "signal terminated program" in err:
        # cc1plus crashes this way when it cannot grow its stack or heap under the limit
        raise CompilerLimitError(
            f"shader {what}: the host compiler crashed ({_first_line(err, ('signal terminated',))}); "
            f"if the shader is large, its memory limit of {mem} bytes "
            f"(TORCH_MPS_EXT_SHADER_COMPILE_MEMORY_BYTES) may be too low")
    return subprocess.CompletedProcess(cmd, rc, out, err)


def _first_line(text: str, needles: tuple[str, ...]) -> str:
    for ln in text.splitlines():
        if any(n in ln for n in needles):
            return ln.strip()
    return ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.returncode is None:
        proc.communicate()


# ----------------------------------------------------------------------------- build
def preprocess(embedded: str, source: str) -> str:
    cmd = [compiler()[-1], "-E", *COMMON_FLAGS, "-DMPSX_PARSE=1", f"-I{INCLUDE_DIR}", "-"]
    stats["preprocessor_runs"] += 1
    r = run_compiler(cmd, input=embedded, what="preprocessing")
    if r.returncode != 0:
        raise _syntax_error("Failed to preprocess shader source", r.stderr, source)
    return r.stdout


def build_source(source: str, checked: bool) -> tuple[str, list[fe.Kernel]]:
    embedded = fe.embed(source)
    pp = preprocess(embedded, source)
    try:
        parsed = fe.parse(pp)
        kernels = fe.analyze(parsed)
        body, swizzles = fe.rewrite(parsed, checked)
    except fe.ShaderSyntaxError as e:
        raise SyntaxError(f"Failed to parse shader source: {e}") from None
    prelude = fe.swizzle_macros(swizzles)
    if checked:
        prelude += "#define MPSX_CHECKED 1\n"
    cpp = prelude + '#include "mpsx_metal.h"\n' + body + fe.generate(kernels, checked)
    return cpp, kernels


# ---------------------------------------------------------------- fiber stacks
# A kernel that synchronizes runs each thread on a fiber with its own stack; the stack must hold
# the kernel's frame (its private arrays) and those of the functions it calls.  The compiler
# measures them (-fstack-usage writes a .su file: one line per function,
# "file:line:col:name<TAB>bytes<TAB>static|dynamic[,bounded]"); <key>.frames, beside the
# library, keeps each such kernel's need in bytes (null: not bounded, e.g. a variable-length
# array), and the library's fibers get stacks of that size (mpsx_fiber_stack_size).
FRAMES_SUFFIX = ".frames"
_SU_LINE = re.compile(r"^(.*?):(\d+):(\d+):(.*)\t(\d+)\t(\S+)\s*$")
_ENTRY_NAME = re.compile(r"\bmpsx_k\d+\(")


def fiber_frames(su_text: str, kernels: list[fe.Kernel]) -> dict[str, int | None]:
    """Stack bytes a fiber of each synchronizing kernel needs: the frames of its fiber body
    (the kernel inlined into it) plus every frame of the library that belongs to no kernel's
    entry point (helpers that were not inlined, the runtime's) -- an upper bound, as Metal
    has no recursion (a recursive helper is caught by the guard page below each stack)."""
    rows = []
    for line in su_text.splitlines():
        m = _SU_LINE.match(line)
        if m:
            rows.append((m.group(4), int(m.group(5)), m.group(6)))
    shared = [(size, kind) for name, size, kind in rows
              if not _ENTRY_NAME.search(name) and "mpsx_finish" not in name]
    out: dict[str, int | None] = {}
    for k in kernels:
        if not k.sync:
            continue
        own = [(size, kind) for name, size, kind in rows
               if f"{k.symbol}(" in name and not name.startswith(f"void {k.symbol}(")]
        frames = own + shared
        out[k.symbol] = None if any(kind == "dynamic" for _, kind in frames) else sum(s for s, _ in frames)
    return out


def _read_frames(build_fd: int, kernels: list[fe.Kernel]) -> dict[str, int | None]:
    text = []
    for name in os.listdir(build_fd):
        if name.endswith(".su"):
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, dir_fd=build_fd)
            try:
                text.append(os.read(fd, 1 << 22).decode("utf-8", "replace"))
            finally:
                os.close(fd)
    return fiber_frames("\n".join(text), kernels) if text else {}


def stored_frames(d: _private_files.PrivateDir, name: str) -> dict[str, int | None]:
    """The frame sizes stored beside library ``name`` ({} when missing or malformed: the
    library's fibers then get the default stack)."""
    raw = d.read_small(name + FRAMES_SUFFIX, 1 << 16)
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items()
            if isinstance(k, str) and (v is None or (isinstance(v, int) and 0 <= v < 1 << 40))}


class LibraryFile:
    """A library file in the cache, verified and open: load it through ``load_path`` (the
    verified directory's descriptor), then ``close()``."""

    def __init__(self, directory: _private_files.PrivateDir, name: str, fd: int, from_cache: bool,
                 frames: dict[str, int | None] | None = None):
        self.directory, self.name, self.fd, self.from_cache = directory, name, fd, from_cache
        self.frames = frames if frames is not None else stored_frames(directory, name)
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)  # a loaded library's file stays mapped: never reused

    @property
    def path(self) -> Path:
        return self.directory.path / self.name

    @property
    def load_path(self) -> str:
        return self.directory.load_path(self.name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "LibraryFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


DIGEST_SUFFIX = ".sha256"


def stored_digest(d: _private_files.PrivateDir, name: str) -> str | None:
    """The digest stored beside ``name`` (``<name>.sha256``, as ``sha256sum`` writes it)."""
    raw = d.read_small(name + DIGEST_SUFFIX)
    if not raw:
        return None
    digest = raw.split(maxsplit=1)[0].decode("ascii", "replace") if raw.split() else ""
    return digest if re.fullmatch(r"[0-9a-f]{64}", digest) else None


def open_entry(d: _private_files.PrivateDir, name: str) -> int | None:
    """A descriptor of cache entry ``name`` if it matches the digest stored beside it;
    None if either is missing or they differ (truncated, zero-filled, modified, or a
    concurrent writer between its two renames: the digest is read again once)."""
    for _ in range(2):
        digest = stored_digest(d, name)
        if digest is None:
            return None
        fd = d.open_verified(name, digest)
        if fd is not None:
            return fd
    return None


def store_entry(d: _private_files.PrivateDir, name: str, data: bytes) -> str:
    """Write library ``name`` and then its digest (each atomically); returns the digest."""
    digest = hashlib.sha256(data).hexdigest()
    d.write(name, data)
    d.write(name + DIGEST_SUFFIX, f"{digest}  {name}\n")
    return digest


def compile_library(source: str) -> LibraryFile:
    """The verified library of ``source`` from the cache, built first if the cache has no
    valid one (missing, or not matching its stored digest)."""
    checked = checked_mode()
    key = library_key(source, checked)
    d = cache()
    name = f"{key}.so"
    fd = open_entry(d, name)
    if fd is not None:
        with _lock:
            stats["cache_hits"] += 1
        return LibraryFile(d, name, fd, True)
    cpp, _kernels = build_source(source, checked)
    build_name, build_fd = d.make_subdir("build-")
    try:
        # Compiled inside a fresh private directory, by descriptor (the compiler's working
        # directory is set with fchdir): relative names, nothing above it matters.
        _private_files.write_at(build_fd, "shader.cpp", cpp.encode(), 0o600)
        cmd = [*compiler(), *COMMON_FLAGS, *CODEGEN_FLAGS, *_arch_flags(), f"-I{INCLUDE_DIR}", "shader.cpp",
               "-o", "lib.so", *_math_flags()]
        with _lock:
            stats["compiler_runs"] += 1
        r = run_compiler(cmd, cwd_fd=build_fd)
        if r.returncode != 0 and checked:
            # Instrumented pointers can break code that needs raw device pointers (a pointer
            # stored in a raw `T*` that is not spelled `device T*`, a second declarator of
            # `device T *a, *b`): fall back, with a warning -- unless the source does not
            # compile unchecked either (then its errors are the user's, without a warning).
            checked_diagnostics = r.stderr
            cpp, _kernels = build_source(source, False)
            _private_files.write_at(build_fd, "shader.cpp", cpp.encode(), 0o600)
            with _lock:
                stats["compiler_runs"] += 1
            r = run_compiler(cmd, cwd_fd=build_fd)
            if r.returncode == 0:
                import warnings

                warnings.warn("TORCH_MPS_EXT_SHADER_CHECKED: this shader cannot be instrumented with "
                              "bounds checks; running it unchecked.\n"
                              + _format_diagnostics(checked_diagnostics)[0][:2000])
        if r.returncode != 0:
            raise _syntax_error("Failed to compile shader", r.stderr, source)
        frames = _read_frames(build_fd, _kernels)
        out_fd = os.open("lib.so", os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, dir_fd=build_fd)
        try:
            data = b"".join(iter(lambda: os.read(out_fd, 1 << 20), b""))
        finally:
            os.close(out_fd)
    finally:
        d.remove_subdir(build_name, build_fd)
    d.write(f"{key}.cpp", cpp)
    d.write(name + FRAMES_SUFFIX, json.dumps(frames))
    digest = store_entry(d, name, data)
    # Load what is on disk, verified again: ours, or an identical library a concurrent
    # compiler of the same source renamed over it (then checked against its own digest).
    for _ in range(50):
        fd = d.open_verified(name, digest)
        if fd is None:
            fd = open_entry(d, name)
        if fd is not None:
            return LibraryFile(d, name, fd, False, frames)
        time.sleep(0.02)
    raise RuntimeError(f"shader library {d.path / name} changed on disk as it was written "
                       "(another process is writing the shader cache); try again")
