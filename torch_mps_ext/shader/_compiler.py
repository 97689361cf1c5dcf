"""Host compiler driver and the on-disk cache of compiled shader libraries.

Cache: ``$TORCH_MPS_EXT_SHADER_CACHE`` if set, else ``$XDG_CACHE_HOME/torch_mps_ext/shaders``
(``~/.cache/torch_mps_ext/shaders``).  A library is one shared object named by the SHA-256 of
(user source, backend headers, compiler flags, compiler identity, host CPU flags, checked mode);
it embeds its own kernel table (``mpsx_library_info``), so the file alone is a complete
"metallib" that ``load_metallib`` can open.  Next to it, ``<key>.cpp`` keeps the generated C++
for debugging.
"""

from __future__ import annotations

import ctypes.util
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .. import _settings
from . import _frontend as fe

INCLUDE_DIR = Path(__file__).parent / "include"
FORMAT_VERSION = "mpsx-shader-1"

# Counters that make the cache observable (tests, docs): how often the host compiler ran.
stats = {"compiler_runs": 0, "cache_hits": 0, "preprocessor_runs": 0}
_lock = threading.Lock()


def cache_dir() -> Path:
    env = _settings.get("TORCH_MPS_EXT_SHADER_CACHE")
    if env:
        d = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = Path(base) / "torch_mps_ext" / "shaders"
    d.mkdir(parents=True, exist_ok=True)
    return d


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


def library_key(source: str, checked: bool) -> str:
    h = hashlib.sha256()
    for part in (FORMAT_VERSION, headers_hash(), " ".join([*COMMON_FLAGS, *CODEGEN_FLAGS, *_arch_flags(), *_math_flags()]),
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
        ln2 = re.sub(r"\S*/build-[^/\s]*/shader\.cpp", "<generated>", ln2)
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


# ----------------------------------------------------------------------------- build
def preprocess(embedded: str, source: str) -> str:
    cmd = [compiler()[-1], "-E", *COMMON_FLAGS, "-DMPSX_PARSE=1", f"-I{INCLUDE_DIR}", "-"]
    stats["preprocessor_runs"] += 1
    r = subprocess.run(cmd, input=embedded, capture_output=True, text=True)
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


def compile_library(source: str) -> tuple[Path, bool]:
    """Return (path of the compiled library, whether it came from the cache)."""
    checked = checked_mode()
    key = library_key(source, checked)
    d = cache_dir()
    so = d / f"{key}.so"
    if so.exists():
        stats["cache_hits"] += 1
        return so, True
    cpp, _kernels = build_source(source, checked)
    tmpdir = Path(tempfile.mkdtemp(prefix="build-", dir=d))
    try:
        src_path = tmpdir / "shader.cpp"
        src_path.write_text(cpp)
        out = tmpdir / "lib.so"
        cmd = [*compiler(), *COMMON_FLAGS, *CODEGEN_FLAGS, *_arch_flags(), f"-I{INCLUDE_DIR}", str(src_path),
               "-o", str(out), *_math_flags()]
        with _lock:
            stats["compiler_runs"] += 1
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 and checked:
            # Instrumented pointers can break code that needs raw device pointers (templates
            # deducing T from `device T*`, reinterpret_cast, atomics): fall back, with a warning.
            import warnings

            warnings.warn("TORCH_MPS_EXT_SHADER_CHECKED: this shader cannot be instrumented with bounds "
                          "checks; running it unchecked.\n" + _format_diagnostics(r.stderr)[0][:2000])
            cpp, _kernels = build_source(source, False)
            src_path.write_text(cpp)
            with _lock:
                stats["compiler_runs"] += 1
            r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise _syntax_error("Failed to compile shader", r.stderr, source)
        (d / f"{key}.cpp").write_text(cpp)
        os.replace(out, so)  # atomic: concurrent compilers of the same source are harmless
        return so, False
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
