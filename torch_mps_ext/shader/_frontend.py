"""MSL front end: header embedding, kernel-signature parsing, source rewriting, code generation.

The pipeline (see docs/shaders.md):

1. ``embed`` inlines ``#include <c10/metal/...>`` (torch's Metal headers, as torch.mps
   inlines them) and files under the caller's ``include_dirs``, with ``#line`` markers so
   diagnostics keep the user's lines; it hands on text without comments or line splices in
   which every directive was validated (nothing else can be included: "host escapes" below).
2. The host compiler's preprocessor expands macros (``g++ -E -DMPSX_PARSE``); the backend
   ``<metal_stdlib>`` is empty in that pass, so the output is the user's code with macros
   expanded and the MSL keywords still in place.
3. ``parse`` refuses what would reach the host (``asm``, GNU attributes, ``extern``, functions
   declared and not defined, host library names...; docs/shaders.md "Security"), then walks
   the tokens: namespaces, classes, function bodies, ``kernel`` declarations, definitions and
   ``template [[host_name("...")]]`` instantiations, their parameters' address spaces, types
   and ``[[attributes]]``.
4. ``rewrite`` edits the preprocessed text: ``threadgroup`` storage declarations become
   per-OS-thread storage shared by the fibers of a threadgroup, ``1.0h`` literals become
   half, program-scope variables are constant-initialized, the shader's declarations get
   hidden visibility, and (checked mode) every ``device T*`` -- parameters of kernels and
   helpers, locals, members, return types, casts -- becomes a bounds-checked pointer.
5. ``generate`` appends one ``extern "C"`` entry point per kernel that unpacks the argument
   block and runs threadgroups ``[begin, end)`` either as a plain loop or with fibers.
"""

from __future__ import annotations

import ast
import bisect
import contextvars
import hashlib
import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SOURCE_NAME = "program_source"
ADDRESS_SPACES = {"device", "constant", "threadgroup", "thread", "threadgroup_imageblock", "ray_data", "object_data"}

# [[attribute]] -> C++ expression over ``t_`` (a mpsx::tinfo)
GRID_ATTRS = {
    "thread_position_in_grid": "t_.tpig",
    "thread_position_in_threadgroup": "t_.tpitg",
    "threadgroup_position_in_grid": "t_.tgpig",
    "threads_per_threadgroup": "t_.tptg",
    "threads_per_grid": "t_.tpg",
    "grid_size": "t_.tpg",
    "threadgroups_per_grid": "t_.tgpg",
    "dispatch_threads_per_threadgroup": "t_.dtptg",
    "thread_index_in_threadgroup": "t_.tiitg",
    "thread_index_in_simdgroup": "t_.lane",
    "simdgroup_index_in_threadgroup": "t_.sgid",
    "simdgroups_per_threadgroup": "t_.nsg",
    "dispatch_simdgroups_per_threadgroup": "t_.nsg",
    "threads_per_simdgroup": "32u",
    "thread_execution_width": "32u",
    "thread_index_in_quadgroup": "(t_.tiitg & 3u)",
    "quadgroup_index_in_threadgroup": "(t_.tiitg >> 2)",
    "quadgroups_per_threadgroup": "((t_.tptg.x * t_.tptg.y * t_.tptg.z + 3u) / 4u)",
    "grid_origin": "::mpsx::uint3_(0u, 0u, 0u)",
}

# builtins that need the fiber scheduler
SYNC_PRIMITIVES = {
    "threadgroup_barrier", "simdgroup_barrier", "simd_sum", "simd_product", "simd_max", "simd_min",
    "simd_and", "simd_or", "simd_xor", "simd_all", "simd_any", "simd_ballot", "simd_active_threads_mask",
    "simd_is_first", "simd_broadcast", "simd_broadcast_first", "simd_shuffle", "simd_shuffle_up",
    "simd_shuffle_down", "simd_shuffle_xor", "simd_shuffle_rotate_up", "simd_shuffle_rotate_down",
    "simd_shuffle_and_fill_up", "simd_shuffle_and_fill_down", "simd_prefix_inclusive_sum",
    "simd_prefix_exclusive_sum", "simd_prefix_inclusive_product", "simd_prefix_exclusive_product",
    "quad_sum", "quad_broadcast", "quad_shuffle", "quad_shuffle_xor",
}

SCALAR_SIZES = {
    "bool": 1, "char": 1, "uchar": 1, "int8_t": 1, "uint8_t": 1,
    "short": 2, "ushort": 2, "half": 2, "bfloat": 2, "int16_t": 2, "uint16_t": 2,
    "int": 4, "uint": 4, "float": 4, "int32_t": 4, "uint32_t": 4, "atomic_int": 4, "atomic_uint": 4,
    "atomic_float": 4, "unsigned": 4,
    "long": 8, "ulong": 8, "int64_t": 8, "uint64_t": 8, "size_t": 8,
}


class ShaderSyntaxError(SyntaxError):
    """Internal: a parse problem to be reported as SyntaxError."""


class ShaderSourceError(SyntaxError):
    """A shader source uses what Metal does not allow (a host escape, a file it may not read...).

    Raised as is (a ``SyntaxError`` with ``filename``/``lineno``/``text`` of the user's line), not
    re-wrapped like :class:`ShaderSyntaxError`."""


# ----------------------------------------------------------------------------- embedding
# What a shader may #include (docs/shaders.md, "Security"): the backend's <metal_*> headers,
# torch's Metal headers, and files under the caller's include_dirs. Nothing else is ever opened;
# a header is read only if it is a regular file no larger than MAX_HEADER_BYTES.
BACKEND_INCLUDE_DIR = Path(__file__).parent / "include"
TORCH_METAL_HEADERS = ("c10/metal/", "ATen/native/mps/kernels/")
MAX_HEADER_BYTES = 2 << 20
MAX_EMBEDDED_BYTES = 32 << 20
MAX_INCLUDE_DEPTH = 32
_HEADER_NAME_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.+\-/]{0,199}")
_ALLOWED_DIRECTIVES = {"define", "undef", "if", "ifdef", "ifndef", "elif", "elifdef", "elifndef", "else", "endif",
                       "error", "warning", "pragma", "include"}
# Identifiers the preprocessor would act on when formed by token pasting (``_Pra ## gma``):
# poisoned before the user's text, in a system-header context (no warnings), so any use is an error.
_POISONED = "_Pragma __has_include __has_include_next __has_include__ __has_include_next__ __has_embed"
_PRELUDE = f'# 1 "<mps_ext>" 3\n#pragma GCC poison {_POISONED}\n'
_DIRECTIVE_RE = re.compile(r"[ \t\f\v\ufeff]*(?:#|%:)[ \t\f\v]*")
_RAW_PREFIXES = {"R", "LR", "uR", "UR", "u8R"}
_SPLICE_TAIL = re.compile(r"\\[ \t\f\v]*$")
_PRAGMA_OP_RE = re.compile(r'_Pragma[ \t\f\v]*\([ \t\f\v]*"((?:\\.|[^"\\])*)"[ \t\f\v]*\)')

# The caller's include directories and, per source, its embedded text (set by compile_shader's
# include_dirs argument; see :func:`with_include_dirs`).
_INCLUDE_DIRS: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("mpsx_include_dirs", default=())
_EMBEDDED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mpsx_embedded", default=None)
# The user's source of the build in progress (for SyntaxError.text)
_SOURCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("mpsx_source", default=None)


def torch_include_dir() -> Path:
    import torch

    return Path(torch.__file__).parent / "include"


class _Rejected(Exception):
    """An #include or directive the front end does not allow: becomes an ``#error`` line."""


def _normalize(text: str) -> str:
    """Newlines as the preprocessor counts them (CR LF, CR, LF), no NUL characters (the
    preprocessor skips them like blanks), no byte-order mark."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "")
    return text[1:] if text.startswith("\ufeff") else text


def _logical_lines(text: str) -> list[tuple[int, str, int]]:
    """(first physical line, text, number of physical lines) per line after backslash-newline
    splicing (translation phase 2)."""
    phys = text.split("\n")
    out = []
    i = 0
    while i < len(phys):
        start = i
        parts = []
        while True:
            line = phys[i]
            m = _SPLICE_TAIL.search(line)
            if m and i + 1 < len(phys):
                parts.append(line[: m.start()])
                i += 1
                continue
            parts.append(line)
            i += 1
            break
        out.append((start + 1, "".join(parts), i - start))
    return out


_LEX_RE = re.compile(
    r"""(?P<other>[^/"'0-9.A-Za-z_$\x80-\U0010ffff]+|/(?![*/])|\.(?![0-9]))
      | (?P<block>/\*) | (?P<line>//)
      | (?P<lit>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')
      | (?P<stray>["'])
      | (?P<num>\.?[0-9](?:[eEpP][+-]|'[0-9A-Za-z_]|[0-9A-Za-z_.$\x80-\U0010ffff])*)
      | (?P<id>[A-Za-z_$\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*)""",
    re.VERBOSE)


def _blank_comments(lines: list[tuple[int, str, int]], fname: str) -> list[tuple[int, str, int]]:
    """Replace comments by blanks (newlines kept), so that the text handed to the preprocessor
    has no comment and no splice: every line it can take as a directive starts with ``#``/``%:``
    and is validated here. Raw string literals are rejected (they would let text span lines).
    String and character literals end on their line; an unclosed quote is a stray character,
    as for the preprocessor."""
    out = []
    in_block = False
    match = _LEX_RE.match
    for lineno, s, span in lines:
        res: list[str] = []
        j = 0
        n = len(s)
        if in_block:
            k = s.find("*/")
            if k < 0:
                out.append((lineno, "", span))
                continue
            in_block = False
            res.append(" ")
            j = k + 2
        while j < n:
            m = match(s, j)
            kind = m.lastgroup
            if kind == "block":
                k = s.find("*/", j + 2)
                res.append(" ")
                if k < 0:
                    in_block = True
                    break
                j = k + 2
                continue
            if kind == "line":
                break
            if kind == "id" and m.group() in _RAW_PREFIXES and m.end() < n and s[m.end()] == '"':
                raise _source_error("raw string literals are not supported in shader sources", fname, lineno, j + 1)
            if kind == "id" and m.group() == "_Pragma":
                # `_Pragma("unroll")` as written (in a macro, say) is accepted and dropped; anything
                # else is refused here, and a `_Pragma` formed by ## is poisoned for the preprocessor
                pm = _PRAGMA_OP_RE.match(s, j)
                words = re.sub(r"\\(.)", r"\1", pm.group(1)).split() if pm else None
                if words is None or not _pragma_allowed(words) or words[:1] == ["once"]:
                    raise _source_error("_Pragma is accepted only as _Pragma(\"<pragma>\") with an allowed pragma "
                                        f"({PRAGMAS_ALLOWED})", fname, lineno, j + 1)
                res.append(" ")
                j = pm.end()
                continue
            res.append(m.group())
            j = m.end()
        out.append((lineno, "".join(res), span))
    return out


def _error_directive(msg: str) -> str:
    """An ``#error`` line: the preprocessor reports it, with its line, where the directive it
    replaces would have taken effect (not in an #if branch that is not compiled)."""
    safe = "".join(c if (c.isascii() and (c.isalnum() or c in " _.,:;()/<>=+-*#[]")) else "?" for c in msg)
    return f"#error mps_ext: {safe[:300]}"


def _pragma_allowed(words: list[str]) -> bool:
    if not words:
        return True
    if words[0] in ("once", "unroll", "nounroll", "METAL", "STDC", "push_macro", "pop_macro"):
        return True
    if words[0] == "clang":  # not `clang attribute` (it applies attributes, constructor included, with clang++)
        return len(words) > 1 and words[1].split("(")[0] in ("loop", "diagnostic", "fp", "unroll")
    return words[0] == "GCC" and len(words) > 1 and words[1].split("(")[0] in ("unroll", "ivdep", "diagnostic")


PRAGMAS_ALLOWED = ("once, unroll, nounroll, clang loop/diagnostic/fp, METAL ..., STDC ..., push_macro, pop_macro, "
                   "GCC unroll/ivdep/diagnostic")


class _Embedder:
    def __init__(self, include_dirs: tuple[Path, ...]):
        self.user_dirs = [os.path.realpath(d) for d in include_dirs]
        self.torch_dir = None
        self.processed: set[str] = set()
        self.size = 0
        self.out: list[str] = []

    def _torch_dir(self) -> str:
        if self.torch_dir is None:
            self.torch_dir = os.path.realpath(torch_include_dir())
        return self.torch_dir

    # -- reading
    @staticmethod
    def _read(path: str, root: str, name: str) -> tuple[str, str]:
        """(real path, text) of a header: inside ``root`` after resolving symbolic links, a
        regular file, at most MAX_HEADER_BYTES, UTF-8. Never returns or echoes anything else."""
        real = os.path.realpath(path)
        if not (real == root or real.startswith(root.rstrip(os.sep) + os.sep)):
            raise _Rejected(f"#include <{name}> leaves its include directory (symbolic link)")
        try:
            st = os.stat(real)
        except OSError:
            raise _Rejected(f"#include <{name}>: cannot be read") from None
        if stat.S_ISDIR(st.st_mode):
            raise _Rejected(f"#include <{name}> names a directory")
        if not stat.S_ISREG(st.st_mode):
            raise _Rejected(f"#include <{name}> is not a regular file")
        if st.st_size > MAX_HEADER_BYTES:
            raise _Rejected(f"#include <{name}> is larger than {MAX_HEADER_BYTES} bytes")
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0) | \
            getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(real, flags)
        except OSError:
            raise _Rejected(f"#include <{name}>: cannot be read") from None
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                raise _Rejected(f"#include <{name}> changed while it was opened")
            chunks = []
            left = MAX_HEADER_BYTES + 1
            while left > 0:
                b = os.read(fd, min(left, 1 << 20))
                if not b:
                    break
                chunks.append(b)
                left -= len(b)
        except OSError:
            raise _Rejected(f"#include <{name}>: cannot be read") from None
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > MAX_HEADER_BYTES:
            raise _Rejected(f"#include <{name}> is larger than {MAX_HEADER_BYTES} bytes")
        try:
            return real, data.decode("utf-8")
        except UnicodeDecodeError:
            raise _Rejected(f"#include <{name}> is not UTF-8 text") from None

    def _resolve(self, name: str, quoted: bool, origin: tuple[str, str] | None) -> tuple[str, str, tuple[str, str]] | None:
        """(real path, text, (root, directory)) of an allowed header; None for a <metal_*> header."""
        if not _HEADER_NAME_RE.fullmatch(name) or ".." in name.split("/"):
            raise _Rejected(f"#include <{name}> is not a header name the front end accepts "
                            "(relative, no .., letters digits _ . + - /)")
        if name.startswith("metal_") and "/" not in name and (BACKEND_INCLUDE_DIR / name).is_file():
            return None
        if (name.rstrip("/") + "/").startswith(TORCH_METAL_HEADERS):
            root = self._torch_dir()
            cand = os.path.join(root, name)
            if os.path.lexists(cand):
                real, text = self._read(cand, root, name)
                return real, text, (root, os.path.dirname(real))
        searched = []
        if quoted and origin is not None and origin[0] in self.user_dirs:
            searched.append((origin[0], origin[1]))  # "x.h" next to the including header first
        searched.extend((d, d) for d in self.user_dirs)
        for root, base in searched:
            cand = os.path.join(base, name)
            if os.path.lexists(cand):
                real, text = self._read(cand, root, name)
                return real, text, (root, os.path.dirname(real))
        raise _Rejected(f"#include <{name}> is not available: a shader may include <metal_stdlib> and the "
                        "other <metal_*> headers, the Metal headers of torch (<c10/metal/...>) and files under "
                        "the include_dirs given to compile_shader")

    # -- text
    def emit(self, text: str, fname: str, depth: int, origin: tuple[str, str] | None) -> None:
        lines = _blank_comments(_logical_lines(_normalize(text)), fname)
        out = self.out
        for lineno, s, span in lines:
            pad = "\n" * (span - 1)
            m = _DIRECTIVE_RE.match(s)
            if m is None:
                out.append(s + (" /**/" if s.endswith("\\") else "") + "\n" + pad)
                continue
            rest = s[m.end():]
            dm = re.match(r"[A-Za-z_][A-Za-z0-9_]*", rest)
            name = dm.group() if dm else ""
            try:
                if not rest.strip():
                    line = s  # the null directive
                elif not dm:
                    raise _Rejected("line markers (# <number> ...) are not supported")
                elif name == "include":
                    self._include(rest[dm.end():], fname, lineno, span, depth, origin)
                    continue
                elif name == "pragma":
                    words = rest[dm.end():].split()
                    if not _pragma_allowed(words):
                        raise _Rejected(f"#pragma {' '.join(words)[:60]} is not supported (allowed: {PRAGMAS_ALLOWED})")
                    line = "" if words[:1] == ["once"] else s
                elif name in _ALLOWED_DIRECTIVES:
                    line = s
                elif name == "line":
                    raise _Rejected("#line is not supported (the front end keeps the line numbers)")
                else:
                    raise _Rejected(f"#{name} is not supported in shader sources")
            except _Rejected as e:
                line = _error_directive(str(e))
            out.append(line + (" /**/" if line.endswith("\\") else "") + "\n" + pad)
            self.size += len(line)

    def _include(self, arg: str, fname: str, lineno: int, span: int, depth: int, origin) -> None:
        out = self.out
        pad = "\n" * (span - 1)
        m = re.match(r'[ \t\f\v]*(?:<([^>]*)>|"([^"]*)")[ \t\f\v]*$', arg)
        try:
            if m is None:
                raise _Rejected("#include needs a header name in <...> or quotes (computed includes are not supported)")
            name = m.group(1) if m.group(1) is not None else m.group(2)
            found = self._resolve(name.strip(), m.group(2) is not None, origin)
            if found is None or found[0] in self.processed:
                out.append("\n" + pad)  # <metal_*>: the backend's, always there; or already inlined
                return
            if depth >= MAX_INCLUDE_DEPTH:
                raise _Rejected(f"#include nesting deeper than {MAX_INCLUDE_DEPTH}")
            real, text, where = found
            self.processed.add(real)
            self.size += len(text)
            if self.size > MAX_EMBEDDED_BYTES:
                raise _source_error(f"the shader source and its headers exceed {MAX_EMBEDDED_BYTES} bytes", fname,
                                    lineno, None)
            hname = name.strip()
            out.append(f'#line 1 "{hname}"\n')
            self.emit(text, hname, depth + 1, where)
            out.append(f'#line {lineno + span} "{fname}"\n')
        except _Rejected as e:
            out.append(_error_directive(str(e)) + "\n" + pad)


def embed(source: str, include_dirs: Sequence[str | os.PathLike] | None = None) -> str:
    """The text handed to the preprocessor: the user's source with its allowed headers inlined
    (as torch.mps.compile_shader inlines torch's), ``#line`` markers so that diagnostics keep
    the user's line numbers, comments blanked, and every directive the front end does not
    allow replaced by an ``#error`` at its line (docs/shaders.md, "Security")."""
    if not isinstance(source, str):
        raise TypeError(f"shader source must be str, got {type(source).__name__}")
    _SOURCE.set(source)
    pre = _EMBEDDED.get()
    if include_dirs is None:
        if pre is not None and source in pre:
            return pre[source]
        dirs = _INCLUDE_DIRS.get()
    else:
        dirs = normalize_include_dirs(include_dirs)
    if len(source) > MAX_EMBEDDED_BYTES:
        raise _source_error(f"the shader source exceeds {MAX_EMBEDDED_BYTES} bytes", SOURCE_NAME, 1, None)
    e = _Embedder(dirs)
    e.out.append(_PRELUDE)
    e.out.append(f'# 1 "{SOURCE_NAME}"\n')
    e.emit(source, SOURCE_NAME, 0, None)
    return "".join(e.out)


def normalize_include_dirs(include_dirs) -> tuple[Path, ...]:
    """``include_dirs`` as absolute paths of existing directories (a str or path is one directory)."""
    if include_dirs is None:
        return ()
    if isinstance(include_dirs, (str, os.PathLike)):
        include_dirs = [include_dirs]
    try:
        items = list(include_dirs)
    except TypeError:
        raise TypeError("include_dirs must be a path or a sequence of paths, got "
                        f"{type(include_dirs).__name__}") from None
    out = []
    for d in items:
        if not isinstance(d, (str, os.PathLike)):
            raise TypeError(f"include_dirs entries must be str or os.PathLike, got {type(d).__name__}")
        p = Path(os.fspath(d)).absolute()
        if not p.is_dir():
            raise NotADirectoryError(f"include_dirs: {p} is not a directory")
        out.append(p)
    return tuple(out)


def with_include_dirs(source: str, include_dirs, compile_fn):
    """``compile_fn(keyed_source)`` with ``include_dirs`` in effect: the headers are embedded
    once, here, and the source the cache is keyed by carries the digest of the embedded text
    (a comment appended after the user's last line), so that a changed header is a new library."""
    dirs = normalize_include_dirs(include_dirs)
    if not dirs:
        return compile_fn(source)
    embedded = embed(source, dirs)
    digest = hashlib.sha256(embedded.encode("utf-8", "surrogatepass")).hexdigest()
    keyed = f"{source}\n// mps_ext include_dirs: headers {digest}\n"
    t1 = _INCLUDE_DIRS.set(dirs)
    t2 = _EMBEDDED.set({keyed: embedded})
    try:
        return compile_fn(keyed)
    finally:
        _EMBEDDED.reset(t2)
        _INCLUDE_DIRS.reset(t1)


def check_source(source: str, include_dirs: Sequence[str | os.PathLike] | None = None,
                 checked: bool = False) -> list[Kernel]:
    """Every front-end stage on ``source`` without the host compiler: embedding (includes,
    directives), the host-escape checks, parsing, analysis, rewriting and code generation, on
    the text as written (macros are not expanded: compile_shader checks their expansion too).
    Raises ``SyntaxError`` (:class:`ShaderSourceError`, :class:`ShaderSyntaxError`) and
    nothing else for a source it does not accept; returns the kernels it found."""
    parsed = parse(embed(source, include_dirs), preprocessed=False)
    kernels = analyze(parsed)
    rewrite(parsed, checked)
    generate(kernels, checked)
    return kernels


# ----------------------------------------------------------------------------- tokens
_TOKEN_RE = re.compile(
    r"""
    (?P<ws>[ \t\r\f\v]+)
  | (?P<nl>\n)
  | (?P<str>(?:u8|u|U|L)?R"(?P<rdelim>[^()\\ ]{0,16})\((?:.|\n)*?\)(?P=rdelim)"
           |(?:u8|u|U|L)?"(?:\\.|[^"\\\n])*"
           |(?:u8|u|U|L)?'(?:\\.|[^'\\\n])*')
  | (?P<num>\.?[0-9](?:[eEpP][+-]|[0-9a-zA-Z_.'])*)
  | (?P<id>[A-Za-z_][A-Za-z_0-9]*)
  | (?P<punct>::|->\*?|<<=|>>=|\.\.\.|[-+*/%&|^!=<>]=|&&|\|\||\+\+|--|<<|\#\#|.)
    """,
    re.VERBOSE,
)


@dataclass
class Tok:
    kind: str
    text: str
    start: int
    end: int


def tokenize(text: str) -> list[Tok]:
    toks: list[Tok] = []
    pos = 0
    n = len(text)
    at_line_start = True
    while pos < n:
        if at_line_start:
            # preprocessor lines (linemarkers, #pragma) are opaque
            m = re.compile(r"[ \t]*#[^\n]*").match(text, pos)
            if m:
                pos = m.end()
                continue
        m = _TOKEN_RE.match(text, pos)
        if not m:  # pragma: no cover - the regex matches any character
            pos += 1
            continue
        kind = m.lastgroup
        if kind == "rdelim":
            kind = "str"
        if kind == "nl":
            at_line_start = True
        elif kind != "ws":
            at_line_start = False
            if kind == "punct" and m.group() == ">>":
                toks.append(Tok("punct", ">", m.start(), m.start() + 1))
                toks.append(Tok("punct", ">", m.start() + 1, m.end()))
            else:
                toks.append(Tok(kind, m.group(), m.start(), m.end()))
        pos = m.end()
    return toks


def _match(toks: list[Tok], i: int, open_: str, close: str) -> int:
    """Index of the token closing the bracket opened at toks[i]."""
    depth = 0
    for j in range(i, len(toks)):
        t = toks[j].text
        if t == open_:
            depth += 1
        elif t == close:
            depth -= 1
            if depth == 0:
                return j
    raise ShaderSyntaxError(f"unbalanced '{open_}'")


def _open_angle(toks: list[Tok], close: int, lo: int = 0) -> int:
    """Index of the '<' matching the '>' at toks[close], scanning back no
    further than toks[lo]; ``lo - 1`` when there is none."""
    depth = 0
    for m in range(close, lo - 1, -1):
        t = toks[m].text
        if t == ">":
            depth += 1
        elif t == "<":
            depth -= 1
            if depth == 0:
                return m
    return lo - 1


def _match_angle(toks: list[Tok], i: int) -> int:
    depth = 0
    paren = 0
    for j in range(i, len(toks)):
        t = toks[j].text
        if t in "([{":
            paren += 1
        elif t in ")]}":
            paren -= 1
        elif paren == 0 and t == "<":
            depth += 1
        elif paren == 0 and t == ">":
            depth -= 1
            if depth == 0:
                return j
    raise ShaderSyntaxError("unbalanced '<'")


def _split_commas(toks: list[Tok]) -> list[list[Tok]]:
    out: list[list[Tok]] = [[]]
    depth = 0
    angle = 0
    for t in toks:
        if t.text in "([{":
            depth += 1
        elif t.text in ")]}":
            depth -= 1
        elif t.text == "<" and depth == 0:
            angle += 1
        elif t.text == ">" and depth == 0 and angle > 0:
            angle -= 1
        if t.text == "," and depth == 0 and angle == 0:
            out.append([])
        else:
            out[-1].append(t)
    return [x for x in out if x] if any(out) else []


def _join(toks: list[Tok]) -> str:
    s = ""
    prev = None
    for t in toks:
        if prev is not None and (prev.kind in ("id", "num") and t.kind in ("id", "num")):
            s += " "
        elif prev is not None and prev.end != t.start and not (prev.text in "(<[:" or t.text in ")>],:"):
            s += " "
        s += t.text
        prev = t
    return s


def _attributes(toks: list[Tok]) -> tuple[list[tuple[str, str]], list[Tok]]:
    """Split ``[[name(args)]]`` groups off a token list: (attrs, remaining tokens)."""
    attrs: list[tuple[str, str]] = []
    rest: list[Tok] = []
    i = 0
    while i < len(toks):
        if toks[i].text == "[" and i + 1 < len(toks) and toks[i + 1].text == "[":
            j = _match(toks, i, "[", "]")
            inner = toks[i + 2 : j - 1]
            for part in _split_commas(inner):
                name = part[0].text
                k = 1
                while k + 1 < len(part) and part[k].text == "::":  # e.g. clang::x
                    name = part[k + 1].text
                    k += 2
                args = ""
                if k < len(part) and part[k].text == "(":
                    args = _join(part[k + 1 : _match(part, k, "(", ")")])
                attrs.append((name, args))
            i = j + 1
        else:
            rest.append(toks[i])
            i += 1
    return attrs, rest


# ----------------------------------------------------------------------------- host escapes
# What Metal cannot do and a C++ kernel could: run host instructions or host functions, run
# code when the library is loaded, read host files at build time (docs/shaders.md, "Security").
# These checks run on the preprocessed text (macros expanded), on the user's code and every
# header it includes alike.

_SAFE_BUILTINS = re.compile(
    r"__builtin_(?:expect(?:_with_probability)?|assume(?:_aligned)?|unreachable|trap|constant_p|"
    r"is_constant_evaluated|bit_cast|launder|addressof|offsetof|has_attribute|"
    r"isnan|isinf(?:_sign)?|isfinite|isnormal|isgreater(?:equal)?|isless(?:equal|greater)?|isunordered|"
    r"signbit[fl]?|fpclassify|nans?[fl]?|inf[fl]?|huge_val[fl]?|copysign[fl]?|fabs[fl]?|"
    r"(?:sqrt|fma|fmin|fmax|floor|ceil|trunc|round|rint|nearbyint|sin|cos|tan|asin|acos|atan|atan2|sinh|cosh|"
    r"tanh|asinh|acosh|atanh|exp|exp2|exp10|expm1|log|log2|log10|log1p|pow|cbrt|hypot|erf|erfc|lgamma|tgamma|"
    r"fmod|remainder|ldexp|frexp|modf|logb|ilogb|scalbn|nextafter|fdim)[fl]?|"
    r"(?:clz|ctz|popcount|parity|ffs|clrsb)(?:l|ll|g)?|bswap(?:16|32|64|128)|"
    r"(?:bitreverse|rotateleft|rotateright)(?:8|16|32|64)|(?:add|sub|mul)_overflow(?:_p)?|"
    r"[su](?:add|sub|mul)(?:l|ll)?_overflow|memcpy|memmove|memset|memcmp|prefetch|shuffle|shufflevector|"
    r"convertvector|complex|choose_expr|FILE|LINE|FUNCTION|COLUMN)")
_SAFE_RESERVED = re.compile(
    r"__(?:func__|FUNCTION__|PRETTY_FUNCTION__|restrict(?:__)?|inline(?:__)?|const(?:__)?|volatile(?:__)?|"
    r"signed(?:__)?|typeof(?:__)?|alignof(?:__)?|extension__|null|real(?:__)?|imag(?:__)?|complex__|fp16|bf16|"
    r"int128|label__|underlying_type|is_\w+|has_(?:trivial|nothrow|virtual|unique)\w*|remove_cv|remove_reference|"
    r"remove_cvref|decay|integer_pack|type_pack_element)")
# C library and POSIX functions a kernel could reach: the ones the backend's headers declare
# (stdio, string, sys/mman), and the ones that run programs, touch the environment, files,
# memory mappings, dynamic loading or the process. Rejected wherever they appear except as a
# member name (``x.read``); a shader's own helper of the same name must be renamed.
HOST_NAMES = frozenset("""
system popen pclose execl execle execlp execv execve execvp execvpe fexecve fork vfork posix_spawn posix_spawnp
getenv secure_getenv setenv putenv unsetenv clearenv environ __environ
dlopen dlmopen dlsym dlvsym dlclose dlerror dladdr dlinfo syscall ptrace prctl
mmap mmap64 munmap mprotect mremap msync madvise posix_madvise process_madvise process_mrelease mlock mlock2
munlock mlockall munlockall mincore remap_file_pages shm_open shm_unlink memfd_create pkey_alloc pkey_free
pkey_mprotect
fopen fopen64 freopen freopen64 fdopen fmemopen open_memstream fopencookie fclose fcloseall tmpfile tmpfile64
tmpnam tmpnam_r tempnam remove rename renameat renameat2
printf fprintf dprintf sprintf snprintf asprintf vprintf vfprintf vdprintf vsprintf vsnprintf vasprintf
obstack_printf obstack_vprintf scanf fscanf sscanf vscanf vfscanf vsscanf
puts fputs putc fputc putchar putw fputc_unlocked fputs_unlocked putc_unlocked putchar_unlocked
gets fgets getc fgetc getchar getw getline getdelim ungetc fgetc_unlocked getc_unlocked getchar_unlocked
fgets_unlocked fread fwrite fread_unlocked fwrite_unlocked fflush fflush_unlocked fseek fseeko fseeko64 ftell
ftello ftello64 rewind fgetpos fgetpos64 fsetpos fsetpos64 setbuf setbuffer setlinebuf setvbuf
clearerr clearerr_unlocked feof feof_unlocked ferror ferror_unlocked fileno fileno_unlocked flockfile
ftrylockfile funlockfile perror ctermid cuserid stdin stdout stderr
atexit at_quick_exit quick_exit on_exit _Exit _exit malloc calloc realloc aligned_alloc posix_memalign valloc
pvalloc memalign reallocarray strdup strndup longjmp setjmp siglongjmp sigsetjmp pthread_create
""".split())
_ALLOWED_ATTR_SCOPES = {"metal", "clang"}
# [[clang::x]]: only these (the rest would take effect if CXX is clang++)
_CLANG_ATTRS = {"optnone", "always_inline", "noinline", "fallthrough", "annotate", "nodiscard", "maybe_unused",
                "likely", "unlikely", "no_unique_address"}
# unscoped GNU attribute names (the compiler ignores them unscoped today; never let one through)
_GNU_ATTR_NAMES = {"constructor", "destructor", "section", "alias", "ifunc", "weak", "weakref", "visibility", "used",
                   "retain", "naked", "init_priority", "cleanup", "symver", "target", "target_clones", "optimize",
                   "noipa", "externally_visible", "copy", "no_instrument_function"}
_LINEMARKER_RE = re.compile(r'# (\d+) "((?:[^"\\\n]|\\.)*)"((?: \d+)*)[ \t]*$')


class _Lines:
    """Token offset -> (file, line) through the line markers of a text."""

    def __init__(self, text: str, preprocessed: bool):
        self.starts: list[int] = []  # offset of a line following a marker
        self.where: list[tuple[str, int]] = []
        self.text = text
        pos = 0
        marker = re.compile(r'(?:#line|#) (\d+) "((?:[^"\\\n]|\\.)*)"')
        for line in text.split("\n"):
            nxt = pos + len(line) + 1
            m = marker.match(line)
            if m:
                self.starts.append(nxt)
                self.where.append((m.group(2), int(m.group(1))))
            pos = nxt

    def at(self, offset: int) -> tuple[str, int, int]:
        k = bisect.bisect_right(self.starts, offset) - 1
        if k < 0:
            fname, base, start = SOURCE_NAME, 1, 0
        else:
            (fname, base), start = self.where[k], self.starts[k]
        line = base + self.text.count("\n", start, offset)
        col = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
        return fname, line, col


def _source_error(reason: str, fname: str, line: int, col: int | None, token: str | None = None) -> ShaderSourceError:
    text = None
    if fname == SOURCE_NAME:
        src = _SOURCE.get()
        if src is not None:
            lines = _normalize(src).split("\n")
            if 0 < line <= len(lines):
                text = lines[line - 1]
                if token:
                    k = text.find(token)
                    col = k + 1 if k >= 0 else None
    msg = f"Shader source rejected: {reason}\n{fname}:{line}:{col or 1}: error: {reason}"
    return ShaderSourceError(msg, (fname, line, col, text))


def _check_directives(text: str, lines: _Lines) -> None:
    """The preprocessed text is preprocessed again by the compiler: its only directives may be the
    preprocessor's own line markers and allowed pragmas, at the start of a line."""
    pos = 0
    for line in text.split("\n"):
        if _DIRECTIVE_RE.match(line) and not _LINEMARKER_RE.match(line):
            m = re.match(r"#pragma(?:[ \t]+(.*))?$", line)
            if m is None:
                fname, ln, _ = lines.at(pos)
                raise _source_error("a preprocessing directive produced by macro expansion is not allowed",
                                    fname, ln, None)
            words = (m.group(1) or "").split()
            if not _pragma_allowed(words):
                fname, ln, _ = lines.at(pos)
                raise _source_error(f"#pragma {' '.join(words)[:60]} is not supported (allowed: {PRAGMAS_ALLOWED})",
                                    fname, ln, None, "pragma")
        pos += len(line) + 1


def _is_digraph(text: str, pos: int) -> bool:
    two = text[pos : pos + 2]
    if two == "<:":  # C++11: `<::` is `<` `::` unless a `:` or `>` follows
        return not (text[pos + 2 : pos + 3] == ":" and text[pos + 3 : pos + 4] not in (":", ">"))
    return two in (":>", "<%", "%>", "%:")


def _check_tokens(toks: list[Tok], lines: _Lines) -> None:
    text = lines.text
    def fail(k: int, reason: str) -> None:
        fname, ln, col = lines.at(toks[k].start)
        raise _source_error(reason, fname, ln, col, toks[k].text)

    n = len(toks)
    attr_end = -1
    for k, t in enumerate(toks):
        tx = t.text
        if t.kind == "punct" and tx in ("<", "%", ":") and _is_digraph(text, t.start):
            fail(k, "digraphs (<: :> <% %> %:) are not supported in shader sources")
        if t.kind != "id":
            if tx == "[" and k + 1 < n and toks[k + 1].text == "[" and k > attr_end:
                attr_end = _check_attribute(toks, k, fail)
            continue
        prev = toks[k - 1].text if k else ""
        if tx in ("asm", "__asm", "__asm__"):
            fail(k, "inline assembly is not available: a Metal kernel cannot run host instructions")
        elif tx in ("__attribute__", "__attribute", "__declspec"):
            fail(k, f"{tx} is not Metal: only Metal's [[...]] attributes are accepted")
        elif tx == "extern":
            fail(k, "extern declarations are not available: a shader cannot refer to host symbols")
        elif tx in ("throw", "try", "catch"):
            fail(k, f"exceptions ({tx}) are not available in Metal")
        elif tx == "new" or (tx == "delete" and prev != "="):
            fail(k, f"dynamic allocation ({tx}) is not available in Metal")
        elif tx == "goto" and k + 1 < n and toks[k + 1].text == "*":
            fail(k, "computed goto is not available in Metal")
        elif tx in HOST_NAMES and prev not in (".", "->"):
            fail(k, f"{tx} is a host C library function or object: Metal kernels cannot call the host "
                    "(a helper of that name must be renamed)")
        elif tx[:4].lower() == "mpsx":
            fail(k, f"{tx}: names starting with mpsx are reserved for the mps_ext runtime")
        elif tx.startswith("__builtin_"):
            if not _SAFE_BUILTINS.fullmatch(tx):
                fail(k, f"{tx} is a compiler builtin that Metal does not have (it can reach the host)")
        elif tx.startswith("__") and not _SAFE_RESERVED.fullmatch(tx):
            fail(k, f"{tx} is a reserved compiler identifier that Metal does not have")
        elif tx in ("_Pragma", "_Exit"):
            fail(k, f"{tx} is not available in shader sources")


def _check_attribute(toks: list[Tok], k: int, fail) -> int:
    """``[[...]]``: Metal's and the standard attributes; no GNU (or other compiler) namespace.
    Returns the index of its closing bracket."""
    j = _match(toks, k, "[", "]")
    inner = toks[k + 2 : j - 1]
    scope = None
    if inner and inner[0].text == "using":
        scope = inner[1].text if len(inner) > 1 else ""
        inner = inner[3:]
        if scope not in _ALLOWED_ATTR_SCOPES:
            fail(k, f"[[using {scope}: ...]] is not a Metal attribute")
    for part in _split_commas(inner):
        if not part:
            continue
        if len(part) > 2 and part[1].text == "::":
            if part[0].text not in _ALLOWED_ATTR_SCOPES or (part[0].text == "clang" and part[2].text not in _CLANG_ATTRS):
                fail(k, f"[[{part[0].text}::{part[2].text}]] is not a Metal attribute (GNU attributes are not accepted)")
        elif scope == "clang" and part[0].text not in _CLANG_ATTRS:
            fail(k, f"[[using clang: {part[0].text}]] is not a Metal attribute")
        elif part[0].text in _GNU_ATTR_NAMES and scope is None:
            fail(k, f"[[{part[0].text}]] is not a Metal attribute")
    return j


# ----------------------------------------------------------------------------- model
@dataclass
class Param:
    name: str
    type_toks: list[Tok]
    attrs: dict[str, str]
    space: str | None
    toks: list[Tok]

    @property
    def type_text(self) -> str:
        return _join([t for t in self.type_toks if t.text not in ADDRESS_SPACES])

    @property
    def is_pointer(self) -> bool:
        return any(t.text == "*" for t in self.type_toks)

    @property
    def is_ref(self) -> bool:
        return any(t.text in ("&", "&&") for t in self.type_toks)


@dataclass
class KDecl:
    kind: str  # "plain", "template", "inst"
    base: str  # unqualified name
    expr: str  # C++ expression naming the function (inst: with template args)
    ns: list[tuple[str, bool]]  # enclosing namespaces (name, inline)
    params: list[Param]
    attrs: dict[str, str]
    body: tuple[int, int] | None  # token index range of the body
    tparams: list[str] = field(default_factory=list)
    targs: list[str] = field(default_factory=list)
    targ_toks: list[Tok] = field(default_factory=list)
    kidx: int = -1  # token index of the `kernel` keyword
    tdefaults: dict[str, str] = field(default_factory=dict)


@dataclass
class FuncInfo:
    name: str
    cls: str | None
    body: tuple[int, int]
    head: int = -1  # first token of the definition (for address-space overload merging)
    ctx: str = ""


@dataclass
class Kernel:
    name: str
    symbol: str
    expr: str
    ns: list[tuple[str, bool]]
    roles: list[tuple[str, object]]  # ("buffer", idx) | ("attr", expr) | ("tg", idx)
    param_names: list[str]
    param_types: list[str]
    sync: bool
    max_threads: int
    tg_mem: int
    nbuffers: int
    checked_params: list[int] = field(default_factory=list)
    param_spaces: list[str] = field(default_factory=list)  # "device", "constant", ... or ""

    def to_json(self) -> dict:
        return {
            "name": self.name, "symbol": self.symbol, "roles": self.roles, "param_names": self.param_names,
            "param_types": self.param_types, "sync": self.sync, "max_threads": self.max_threads,
            "tg_mem": self.tg_mem, "nbuffers": self.nbuffers, "checked_params": self.checked_params,
            "param_spaces": self.param_spaces,
        }


@dataclass
class Parsed:
    text: str
    toks: list[Tok]
    decls: list[KDecl]
    funcs: list[FuncInfo]
    tg_decls: list[tuple[int, int, int]]  # (token idx of 'threadgroup', end ';' idx, enclosing func idx)
    sec_edits: list[tuple[int, int, str]] = field(default_factory=list)  # program-scope variables: constinit


# ----------------------------------------------------------------------------- parser
def _stmt_start(toks: list[Tok], i: int, lo: int) -> int:
    """First token of the statement/declaration containing toks[i] (scanning back to ; { })."""
    j = i - 1
    depth = 0
    while j >= lo:
        t = toks[j].text
        if t in ")]":
            depth += 1
        elif t in "([":
            depth -= 1
        elif depth == 0 and t in (";", "{", "}"):
            break
        j -= 1
    return j + 1


def parse(text: str, preprocessed: bool = True) -> Parsed:
    """Parse the preprocessed text (``preprocessed=False``: the output of :func:`embed` itself,
    for checks without the host preprocessor). Raises :class:`ShaderSourceError` for what Metal
    does not allow (docs/shaders.md, "Security") and :class:`ShaderSyntaxError` when the text
    cannot be parsed."""
    toks = tokenize(text)
    lines = _Lines(text, preprocessed)
    if preprocessed:
        _check_directives(text, lines)
    _check_tokens(toks, lines)
    parsed = _parse(text, toks)
    parsed.sec_edits = check_declarations(toks, lines)
    return parsed


def _parse(text: str, toks: list[Tok]) -> Parsed:
    decls: list[KDecl] = []
    funcs: list[FuncInfo] = []
    tg_decls: list[tuple[int, int, int]] = []
    # stack of (kind, name, inline); kind in ns/class/func/other
    stack: list[tuple[str, str, bool]] = []
    i = 0
    n = len(toks)
    last_boundary = 0  # index after the last ; { } at the current (non-func) level
    other_stmt = -1  # a statement known to be neither a namespace, a class nor a function

    def ns_path() -> list[tuple[str, bool]]:
        return [(s[1], s[2]) for s in stack if s[0] == "ns"]

    def cur_class() -> str | None:
        for s in reversed(stack):
            if s[0] == "class":
                return s[1]
        return None

    while i < n:
        t = toks[i]
        tx = t.text
        if tx == "kernel" and t.kind == "id" and all(s[0] == "ns" for s in stack):
            i, decl = _parse_kernel(toks, i, last_boundary, ns_path())
            decls.append(decl)
            if decl.body is not None:
                funcs.append(FuncInfo(decl.base, None, decl.body))
                _scan_body(toks, decl.body, len(funcs) - 1, tg_decls)
            last_boundary = i
            continue
        if tx == "{" and other_stmt == last_boundary:
            i = _match(toks, i, "{", "}") + 1  # another initializer of the same statement
            continue
        if tx == "{":
            prefix = toks[last_boundary:i]
            ptext = [p.text for p in prefix]
            kind, name, inline = "other", "", False
            if "namespace" in ptext and "(" not in ptext:
                k = ptext.index("namespace")
                inline = "inline" in ptext[:k]
                name = "".join(ptext[k + 1 :])
                kind = "ns"
            else:
                cls = _class_head(prefix)
                if cls is not None:
                    kind, name = "class", cls
                elif prefix and _is_function_head(prefix):
                    fname = _function_name(prefix)
                    j = _match(toks, i, "{", "}")
                    if fname is not None:
                        ctx = "::".join(f"{s_[0]}:{s_[1]}" for s_ in stack)
                        funcs.append(FuncInfo(fname, cur_class(), (i, j), last_boundary, ctx))
                        _scan_body(toks, (i, j), len(funcs) - 1, tg_decls)
                    i = j + 1
                    last_boundary = i
                    continue
                else:
                    # initializer / enum / lambda at namespace scope: skip it whole
                    j = _match(toks, i, "{", "}")
                    i = j + 1
                    other_stmt = last_boundary
                    continue
            if kind == "ns" and "::" in name:  # namespace a::b {
                for part in name.split("::"):
                    stack.append(("ns", part, inline))
                stack.append(("nsmulti", str(name.count("::") + 1), False))
            else:
                stack.append((kind, name, inline))
            i += 1
            last_boundary = i
            continue
        if tx == "}":
            if stack:
                top = stack.pop()
                if top[0] == "nsmulti":
                    for _ in range(int(top[1])):
                        stack.pop()
            i += 1
            last_boundary = i
            continue
        if tx == ";":
            i += 1
            last_boundary = i
            continue
        if tx == "(":  # skip parenthesised groups at declaration level (they may contain braces)
            i = _match(toks, i, "(", ")") + 1
            continue
        i += 1
    return Parsed(text, toks, decls, funcs, tg_decls)


def _class_head(prefix: list[Tok]) -> str | None:
    """Name of the class whose body opens after ``prefix``, or None."""
    depth = 0
    k = 0
    texts = [p.text for p in prefix]
    # skip template<...>
    while k < len(prefix):
        if texts[k] == "template" and k + 1 < len(prefix) and texts[k + 1] == "<":
            k = _match_angle(prefix, k + 1) + 1
            continue
        break
    for j in range(k, len(prefix)):
        tx = texts[j]
        if tx in ("(",):
            depth += 1
        elif tx == ")":
            depth -= 1
        elif depth == 0 and tx in ("struct", "class", "union", "enum"):
            if "=" in texts[k:j]:
                return None
            # name: next identifier (skip attributes)
            rest = [p for p in prefix[j + 1 :]]
            _, rest = _attributes(rest)
            for p in rest:
                if p.kind == "id" and p.text not in ("class", "struct", "final", "alignas"):
                    return p.text
                if p.text in (":", "{"):
                    break
            return ""
    return None


def _is_function_head(prefix: list[Tok]) -> bool:
    texts = [p.text for p in prefix]
    if "=" in texts and ")" not in texts:
        return False
    j = len(texts) - 1
    while j >= 0 and texts[j] in ("const", "noexcept", "override", "final", "mutable", "volatile", "&", "&&"):
        j -= 1
    if j >= 0 and texts[j] == ")":
        return True
    if "->" in texts:
        return True
    # constructor with initializer list:  X(...) : a(b), c{d} {
    return ":" in texts and ")" in texts


def _function_name(prefix: list[Tok]) -> str | None:
    texts = [p.text for p in prefix]
    if "=" in texts and "[" in texts[texts.index("="):]:
        # a lambda bound to a name at namespace/class scope: auto name = [](...) {
        k = texts.index("=")
        if k > 0 and prefix[k - 1].kind == "id":
            return texts[k - 1]
    # find the first top-level '(' that follows an identifier / operator
    depth_angle = 0
    for j, tx in enumerate(texts):
        if tx == "<":
            depth_angle += 1
        elif tx == ">":
            depth_angle = max(0, depth_angle - 1)
        elif tx == "(" and j > 0:
            prev = texts[j - 1]
            if prefix[j - 1].kind == "id" and prev not in (
                "decltype", "alignas", "sizeof", "noexcept", "__attribute__", "static_assert", "requires", "throw",
                "alignof", "__declspec",
            ):
                if j >= 2 and texts[j - 2] == "operator":
                    return "operator" + prev
                return prev
            if prev in (")", "]") and "operator" in texts[:j]:
                return "operator()"
            if prev == ">":
                # template-id: name<...>(
                k = _open_angle(prefix, j - 1)
                if k > 0 and prefix[k - 1].kind == "id":
                    return texts[k - 1]
    return None


def _scan_body(toks: list[Tok], body: tuple[int, int], func_idx: int, tg_decls: list) -> None:
    """Find ``threadgroup`` storage declarations inside a function body."""
    lo, hi = body
    for k in range(lo + 1, hi):
        if toks[k].text != "threadgroup":
            continue
        prev = toks[k - 1].text
        if prev not in (";", "{", "}", ":"):
            continue  # e.g. a cast or a parameter-like use
        # declaration extends to the next ';' at depth 0
        depth = 0
        end = None
        for m in range(k + 1, hi):
            tx = toks[m].text
            if tx in "([{":
                depth += 1
            elif tx in ")]}":
                depth -= 1
            elif tx == ";" and depth == 0:
                end = m
                break
        if end is None:
            continue
        # pointer/reference declarations do not allocate storage
        decl_head = []
        d = 0
        for m in range(k + 1, end):
            tx = toks[m].text
            if tx in ("[", "=", "(", "{") and d == 0:
                break
            if tx == "<":
                d += 1
            elif tx == ">":
                d -= 1
            decl_head.append(tx)
        if "*" in decl_head or "&" in decl_head:
            continue
        tg_decls.append((k, end, func_idx))


def _parse_kernel(toks: list[Tok], i: int, lo: int, ns: list[tuple[str, bool]]) -> tuple[int, KDecl]:
    start = _stmt_start(toks, i, lo)
    prefix = toks[start:i]
    kind = "plain"
    tparams: list[str] = []
    tdefaults: dict[str, str] = {}
    k = 0
    if prefix and prefix[0].text == "template":
        if len(prefix) > 1 and prefix[1].text == "<":
            kind = "template"
            close = _match_angle(prefix, 1)
            for part in _split_commas(prefix[2:close]):
                ids = [p.text for p in part if p.kind == "id"]
                # "typename T", "int N", "typename T = float", "int BS = 16"
                texts = [p.text for p in part]
                if "=" in texts:
                    ids = [p.text for p in part[: texts.index("=")] if p.kind == "id"]
                    if ids:
                        tdefaults[ids[-1]] = _join(part[texts.index("=") + 1 :])
                if ids:
                    tparams.append(ids[-1])
            k = close + 1
        else:
            kind = "inst"
            k = 1
    attrs, _ = _attributes(prefix[k:])
    # after 'kernel': return type, name, optional template args, '('
    j = i + 1
    depth = 0
    while j < len(toks):
        tx = toks[j].text
        if tx == "<":
            j = _match_angle(toks, j) + 1
            continue
        if tx == "[" and j + 1 < len(toks) and toks[j + 1].text == "[":
            a, _ = _attributes(toks[j : _match(toks, j, "[", "]") + 1])
            attrs.extend(a)
            j = _match(toks, j, "[", "]") + 1
            continue
        if tx == "(":
            break
        j += 1
    popen = j
    head = toks[i + 1 : popen]
    head_attrs, head = _attributes(head)
    if any(t.text == "void" for t in head):  # kernels return void: the name follows it
        head = head[[t.text for t in head].index("void") + 1 :]
    attrs.extend(head_attrs)
    targs: list[str] = []
    targ_toks: list[Tok] = []
    name_end = len(head)
    if head and head[-1].text == ">":
        # template-id: find the matching '<'
        m = _open_angle(head, len(head) - 1)
        targ_toks = head[m + 1 : len(head) - 1]
        targs = [_join(p) for p in _split_commas(targ_toks)]
        name_end = m
    # qualified name: trailing  [::] id (:: id)*
    m = name_end - 1
    name_toks: list[Tok] = []
    while m >= 0:
        if head[m].kind == "id" and (not name_toks or name_toks[0].text == "::"):
            name_toks.insert(0, head[m])
        elif head[m].text == "::" and name_toks and name_toks[0].kind == "id":
            name_toks.insert(0, head[m])
        else:
            break
        m -= 1
    if not name_toks:
        raise ShaderSyntaxError("could not find the name of a kernel function")
    base = name_toks[-1].text
    qual = "".join(t.text for t in name_toks)
    expr = qual + (("<" + _join(targ_toks) + ">") if kind == "inst" and targ_toks else "")
    pclose = _match(toks, popen, "(", ")")
    params = []
    for ptoks in _split_commas(toks[popen + 1 : pclose]):
        if len(ptoks) == 1 and ptoks[0].text == "void":
            continue
        pattrs, rest = _attributes(ptoks)
        # default argument
        rtexts = [r.text for r in rest]
        if "=" in rtexts:
            rest = rest[: rtexts.index("=")]
        space = next((r.text for r in rest if r.text in ADDRESS_SPACES), None)
        pname = ""
        type_toks = rest
        if len(rest) >= 2 and rest[-1].kind == "id" and rest[-2].text != "::" and rest[-1].text not in (
            "const", "volatile", "int", "uint", "float", "half", "long", "short", "char", "bool", "unsigned"
        ):
            pname = rest[-1].text
            type_toks = rest[:-1]
        params.append(Param(pname, type_toks, {a: v for a, v in pattrs}, space, ptoks))
    j = pclose + 1
    # trailing attributes / qualifiers before body or ';'
    while j < len(toks) and toks[j].text not in ("{", ";"):
        j += 1
    body = None
    if j < len(toks) and toks[j].text == "{":
        end = _match(toks, j, "{", "}")
        body = (j, end)
        j = end + 1
    else:
        j += 1
    decl = KDecl(kind, base, expr if kind == "inst" else qual, ns, params, {a: v for a, v in attrs}, body,
                 tparams, targs, targ_toks, i, tdefaults)
    return j, decl


# ----------------------------------------------------------------------------- declarations
# A function declared without a body is a reference to a symbol of the host process (libc,
# libstdc++, libtorch...): every declared function must be defined in the shader. (The library
# is also compiled with hidden visibility for the shader's declarations, so that an undefined
# non-template function cannot link against the host either.) Program-scope variables are
# constant-initialized and trivially destructible, as Metal's program-scope constants are: no
# shader code runs when the library is loaded or unloaded.

_NONDECL_PAREN = {"decltype", "alignas", "sizeof", "noexcept", "alignof", "typeof", "__typeof__", "__typeof",
                  "static_assert", "throw", "requires", "__attribute__", "explicit", "__alignof__", "if", "while",
                  "for", "switch", "return", "case"}
_TYPE_KEYWORDS = {"void", "bool", "char", "short", "int", "long", "float", "double", "signed", "unsigned", "half",
                  "const", "volatile", "auto", "wchar_t", "char8_t", "char16_t", "char32_t", "constant", "device",
                  "thread", "threadgroup"}
_DECL_KEYWORDS = {"inline", "static", "constexpr", "kernel", "extern", "typename", "template", "virtual", "explicit",
                  "friend", "operator", "return", "mutable", "thread_local", "register"}
_CV_WORDS = {"const", "volatile", "constant", "device", "thread", "threadgroup", "threadgroup_imageblock", "ray_data",
             "object_data", "struct", "class", "enum", "typename", "union"}
_SPACE_WORDS = {"device", "thread", "threadgroup", "threadgroup_imageblock", "ray_data", "object_data"}
_SKIP_HEADS = {"typedef", "using", "static_assert", "namespace", "friend", "return", "break", "continue", "goto",
               "case", "default", "else", "do"}
_CLASS_KEYS = {"struct", "class", "union", "enum"}
_MAX_NESTING = 200
_INIT_OPS = {"+", "-", "/", "%", "|", "^", "!", "~", "?", ".", "->", "==", "!=", "<=", ">=", "&&", "||", "<<",
             "+=", "-=", "++", "--"}


@dataclass
class _FDecl:
    scope: tuple[str, ...]
    name: str
    params: tuple[str, ...] | None  # normalized parameter types (None: variadic / unknown)
    template: bool
    tok: int


def _norm_params(toks: list[Tok], tparams: dict[str, str]) -> tuple[str, ...] | None:
    out = []
    for part in _split_commas(toks):
        _, part = _attributes(part)
        texts = [t.text for t in part]
        depth = 0
        for q, tx in enumerate(texts):  # drop a default argument
            if tx in "([{<":
                depth += 1
            elif tx in ")]}>":
                depth -= 1
            elif tx == "=" and depth == 0:
                part, texts = part[:q], texts[:q]
                break
        if "..." in texts:
            return None
        kinds = [t.kind for t in part]
        # drop the parameter's name: the identifier before '[' or at the end
        cut = texts.index("[") if "[" in texts else len(texts)
        if cut >= 2 and kinds[cut - 1] == "id" and texts[cut - 1] not in _TYPE_KEYWORDS and texts[cut - 2] != "::" \
                and any(x not in _CV_WORDS for x in texts[: cut - 1]):  # `const T` has no name
            texts = texts[: cut - 1] + texts[cut:]
        words = ["const" if x == "constant" else tparams.get(x, x) for x in texts if x not in _SPACE_WORDS]
        out.append(" ".join(words))
    if out == ["void"]:
        return ()
    return tuple(out)


def _template_params(toks: list[Tok], lt: int, gt: int) -> list[str]:
    names = []
    for part in _split_commas(toks[lt + 1 : gt]):
        texts = [p.text for p in part]
        if "=" in texts:
            part = part[: texts.index("=")]
        ids = [p.text for p in part if p.kind == "id" and p.text not in ("typename", "class", "const")]
        if ids:
            names.append(ids[-1])
    return names


class _DeclWalker:
    def __init__(self, toks: list[Tok], lines: _Lines):
        self.toks = toks
        self.lines = lines
        self.decls: list[_FDecl] = []
        self.defs: dict[tuple[tuple[str, ...], str], list[tuple[int, tuple[str, ...] | None, bool]]] = {}
        self.insts: list[tuple[tuple[str, ...], str, int]] = []
        self.edits: list[tuple[int, int, str]] = []
        self.inline_ns: set[str] = set()
        self.depth = 0

    def fail(self, k: int, reason: str) -> None:
        fname, ln, col = self.lines.at(self.toks[k].start)
        raise _source_error(reason, fname, ln, col, self.toks[k].text)

    # -- statement analysis
    def _prefix(self, lo: int, hi: int) -> tuple[int, list[list[str]], bool]:
        """Skip attributes, access labels and template headers: (first token, template
        parameter lists, explicit instantiation)."""
        toks = self.toks
        k = lo
        theads: list[list[str]] = []
        explicit = False
        while k < hi:
            tx = toks[k].text
            if tx == "[" and k + 1 < hi and toks[k + 1].text == "[":
                k = _match(toks, k, "[", "]") + 1
            elif tx == "template" and k + 1 < hi and toks[k + 1].text == "<":
                gt = _match_angle(toks, k + 1)
                theads.append(_template_params(toks, k + 1, gt))
                k = gt + 1
            elif tx == "template":
                explicit = True
                k += 1
            elif tx in ("public", "private", "protected") and k + 1 < hi and toks[k + 1].text == ":":
                k += 2
            else:
                break
        return k, theads, explicit

    def _declarator(self, k: int, hi: int):
        """For a declaration toks[k:hi]: (name index, qualifiers, name, '(' index) of a function
        declarator, or None (a variable or something else)."""
        toks = self.toks
        j = k
        angle = 0
        while j < hi:
            t = toks[j]
            tx = t.text
            if tx == "operator" and angle == 0:
                p = j + 1
                if p + 1 < hi and toks[p].text == "(" and toks[p + 1].text == ")":
                    p += 2
                while p < hi and toks[p].text != "(":
                    p += 1
                if p >= hi:
                    return None
                name = "operator" + "".join(x.text for x in toks[j + 1 : p])
                return j, self._quals(j, k), name, p
            if tx == "(":
                prev = toks[j - 1] if j > k else None
                if prev is not None and prev.text in _NONDECL_PAREN:
                    j = _match(toks, j, "(", ")") + 1
                    continue
                if angle:
                    j = _match(toks, j, "(", ")") + 1
                    continue
                if prev is None:
                    return None
                if prev.kind == "id" and prev.text not in _TYPE_KEYWORDS:
                    name = prev.text
                    ni = j - 1
                    if ni > k and toks[ni - 1].text == "~":
                        name = "~" + name
                    return ni, self._quals(ni - (1 if name.startswith("~") else 0), k), name, j
                if prev.text == ">":  # template-id: f<float>(
                    m = _open_angle(toks, j - 1, k)
                    if m > k and toks[m - 1].kind == "id":
                        return m - 1, self._quals(m - 1, k), toks[m - 1].text, j
                return None
            if tx == "[":
                j = _match(toks, j, "[", "]") + 1
                continue
            if tx == "<" and j > k and (toks[j - 1].kind == "id" or toks[j - 1].text == "template"):
                angle += 1
            elif tx == ">" and angle:
                angle -= 1
            elif angle == 0 and tx in ("=", "{", ";", ":"):
                return None
            j += 1
        return None

    def _quals(self, ni: int, lo: int) -> tuple[str, ...]:
        """Qualifiers of the name at toks[ni] (``A<T>::B::f`` -> (A, B))."""
        toks = self.toks
        quals: list[str] = []
        m = ni - 1
        while m > lo and toks[m].text == "::":
            m -= 1
            if toks[m].text == ">":
                m = _open_angle(toks, m, lo) - 1
            if m >= lo and toks[m].kind == "id" and toks[m].text not in _TYPE_KEYWORDS and \
                    toks[m].text not in _DECL_KEYWORDS:
                quals.insert(0, toks[m].text)
                m -= 1
            else:
                break  # `void ::ns::f`: the leading :: is the global namespace
        return tuple(quals)

    def _is_initializer(self, lp: int, rp: int) -> bool:
        """Whether ``( ... )`` after a declarator name initializes an object rather than listing
        parameters: a literal or an expression operator at its top level."""
        toks = self.toks
        depth = 0
        angle = 0
        for q in range(lp + 1, rp):
            t = toks[q]
            if t.text in "([{":
                depth += 1
            elif t.text in ")]}":
                depth -= 1
            elif t.text == "<" and depth == 0 and toks[q - 1].kind == "id":
                angle += 1  # template arguments: vec<float, 4>
            elif t.text == ">" and depth == 0 and angle:
                angle -= 1
            elif depth == 0 and angle == 0:
                if t.text == "=":
                    return False  # a default argument: these are parameters
                if t.kind in ("num", "str") or t.text in _INIT_OPS or t.text in ("this", "true", "false", "nullptr"):
                    return True
        return False

    def statement(self, lo: int, hi: int, ns: tuple[str, ...], cls: tuple[str, ...], ctx: str,
                  class_tparams: list[list[str]]) -> None:
        toks = self.toks
        if lo >= hi or ctx == "block":
            return  # block scope: a declared function there gets hidden visibility (cannot link to the host)
        k, theads, explicit = self._prefix(lo, hi)
        if k >= hi:
            return
        first = toks[k].text
        if first in _SKIP_HEADS and not (first == "friend" and ctx == "class"):
            return
        friend = False
        if first == "friend":
            friend = True
            k += 1
            if k >= hi or toks[k].text in _CLASS_KEYS or hi - k == 1:
                return
        if toks[k].text in _CLASS_KEYS and not any(t.text in ("(", "=", "{") for t in toks[k:hi]):
            _, rest = _attributes(toks[k + 1 : hi])
            if toks[k].text == "enum" or [t.kind for t in rest] in (["id"], ["id", "id"]) and (
                    len(rest) == 1 or rest[0].text in ("class", "struct")):
                return  # struct X;  enum class E : int;
        d = self._declarator(k, hi)
        scope = (ns if friend else ns + cls)
        tparams = {}
        for head in (class_tparams if not friend else []) + theads:
            for name in head:
                tparams.setdefault(name, f"${len(tparams)}")
        if d is not None:
            ni, quals, name, lp = d
            rp = _match(toks, lp, "(", ")")
            start = ni - 2 * len(quals) - (1 if name.startswith("~") else 0)
            if start <= k and not (ctx == "class" and name.lstrip("~") in cls[-1:]) and not quals:
                return  # no return type: not a declaration (a macro, in text that was not preprocessed)
            if not self._is_initializer(lp, rp):
                after = [t.text for t in toks[rp + 1 : hi]]
                if explicit:
                    self.insts.append((scope + quals, name, ni))
                    return
                if after[-2:] in (["=", "default"], ["=", "delete"], ["=", "0"]):
                    return  # nothing to define
                self.decls.append(_FDecl(scope + quals, name, _norm_params(toks[lp + 1 : rp], tparams),
                                         bool(theads) or bool(class_tparams), ni))
                return
        if explicit or ctx == "block":
            return
        self._variable(k, hi, ctx, theads, class_tparams)

    def _scope(self, scope: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(x for x in scope if x not in self.inline_ns)

    def _variable(self, k: int, hi: int, ctx: str, theads, class_tparams) -> None:
        """A program-scope variable or a static data member: constant initialization, trivial
        destructor (or constexpr, which implies both in C++17)."""
        toks = self.toks
        texts = [t.text for t in toks[k:hi]]
        if "constexpr" in texts:
            return
        if ctx == "class":
            if "static" not in texts:
                return  # a non-static data member: initialized by its object's constructor
            if not any(x in ("=", "{") for x in texts):
                return  # declared here, defined (constant-initialized) at namespace scope
        if theads:
            self.fail(k, "program-scope variable templates must be constexpr in shader sources")
        names = []
        for part in _split_commas(toks[k:hi]):
            ptexts = [t.text for t in part]
            cut = len(part)
            for q, tx in enumerate(ptexts):
                if tx in ("=", "{", "[", "(", ":"):
                    cut = q
                    break
            if cut == 0 or part[cut - 1].kind != "id":
                self.fail(k, "unsupported program-scope declaration (declare constants as "
                             "`constant T name = value;` or `constexpr constant T name = value;`)")
            q = cut - 1
            name = part[q].text
            while q >= 2 and part[q - 1].text == "::" and part[q - 2].kind == "id":
                name = part[q - 2].text + "::" + name
                q -= 2
            names.append(name)
        self.edits.append((toks[k].start, toks[k].start, "MPSX_CONSTINIT "))
        checks = "".join(f" static_assert(::std::is_trivially_destructible<decltype({nm})>::value, "
                         f"\"mps_ext: program-scope variable '{nm}' needs a trivial destructor\");" for nm in names)
        end = toks[hi].end if hi < len(toks) else toks[hi - 1].end
        self.edits.append((end, end, checks))

    # -- walking
    def walk(self, lo: int, hi: int, ns: tuple[str, ...], cls: tuple[str, ...], ctx: str,
             class_tparams: list[list[str]]) -> None:
        toks = self.toks
        if self.depth > _MAX_NESTING:
            raise ShaderSyntaxError(f"braces nested deeper than {_MAX_NESTING}")
        self.depth += 1
        i = lo
        stmt = lo
        other = -1  # a statement already known to go on after a brace group (an initializer)
        while i < hi:
            tx = toks[i].text
            if tx == ";":
                self.statement(stmt, i, ns, cls, ctx, class_tparams)
                i += 1
                stmt = i
            elif tx == "(":
                j = _match(toks, i, "(", ")")
                self._braces_inside(i + 1, j, ns)
                i = j + 1
            elif tx == "{" and other == stmt:
                j = _match(toks, i, "{", "}")
                self.walk(i + 1, j, ns, (), "block", [])
                i = j + 1
            elif tx == "{":
                j = _match(toks, i, "{", "}")
                i, cont = self._brace(stmt, i, j, ns, cls, ctx, class_tparams)
                if not cont:
                    stmt = i
                else:
                    other = stmt
            elif tx == "}":  # unbalanced: the parser reports it
                i += 1
                stmt = i
            else:
                i += 1
        if stmt < hi:
            self.statement(stmt, hi, ns, cls, ctx, class_tparams)
        self.depth -= 1

    def _braces_inside(self, lo: int, hi: int, ns: tuple[str, ...]) -> None:
        """Lambda bodies inside parentheses are blocks."""
        toks = self.toks
        i = lo
        while i < hi:
            if toks[i].text == "{":
                j = _match(toks, i, "{", "}")
                self.walk(i + 1, j, ns, (), "block", [])
                i = j + 1
            else:
                i += 1

    def _brace(self, stmt: int, i: int, j: int, ns, cls, ctx, class_tparams) -> tuple[int, bool]:
        """Handle the brace group toks[i..j] whose statement began at ``stmt``: (where to go on,
        whether the statement continues after it -- an initializer or a lambda)."""
        toks = self.toks
        k, theads, explicit = self._prefix(stmt, i)
        texts = [t.text for t in toks[k:i]]
        if ctx != "block" and "namespace" in texts and "(" not in texts:
            q = texts.index("namespace")
            name = "".join(texts[q + 1 :])
            parts = tuple(p for p in name.split("::") if p) if name else ("<anonymous>",)
            if "inline" in texts[:q]:
                self.inline_ns.update(parts)  # its names are members of the enclosing namespace
            self.walk(i + 1, j, ns + parts, (), "ns", [])
            return j + 1, False
        cname = _class_head(toks[k:i]) if ctx != "block" or any(t in _CLASS_KEYS for t in texts) else None
        if cname is not None:
            nxt = j + 1
            if ctx == "ns" and texts[:1] != ["typedef"] and not (nxt < len(toks) and toks[nxt].text == ";"):
                self.fail(k, "a class definition followed by variable declarations is not supported at program "
                             "scope (declare the variable separately)")
            if not ("enum" in texts[:2] or (texts[:1] == ["typedef"] and "enum" in texts[:3])):
                self.walk(i + 1, j, ns, cls + (cname or "<anonymous>",), "class", class_tparams + theads)
            if nxt < len(toks) and toks[nxt].text == ";":
                return nxt + 1, False
            return nxt, texts[:1] == ["typedef"]
        if ctx != "block":
            d = self._declarator(k, i)
            if d is not None:
                ni, quals, name, lp = d
                rp = _match(toks, lp, "(", ")")
                if not self._is_initializer(lp, rp) and rp < i:
                    tparams = {}
                    for head in class_tparams + theads:
                        for nm in head:
                            tparams.setdefault(nm, f"${len(tparams)}")
                    scope = ns + cls + quals
                    self.defs.setdefault((scope, name), []).append(
                        (rp - lp, _norm_params(toks[lp + 1 : rp], tparams), bool(theads) or bool(class_tparams)))
                    self.walk(i + 1, j, ns, (), "block", [])
                    return j + 1, False
        # an initializer or a lambda (the statement goes on), or a statement block
        self.walk(i + 1, j, ns, (), "block", [])
        return j + 1, ctx != "block"

    def check(self) -> None:
        defs: dict[tuple[tuple[str, ...], str], list] = {}
        for (scope, name), v in self.defs.items():
            defs.setdefault((self._scope(scope), name), []).extend(v)
        for d in self.decls:
            cands = defs.get((self._scope(d.scope), d.name), [])
            ok = False
            for _width, params, _tmpl in cands:
                if d.params is None or params is None:
                    ok = True
                elif d.template:
                    ok = params == d.params
                else:
                    ok = len(params) == len(d.params)
                if ok:
                    break
            if not ok:
                self.fail(d.tok, f"function {d.name} is declared but not defined in the shader: a Metal kernel "
                                 "cannot call host functions (define it, or drop the declaration)")
        for scope, name, tok in self.insts:
            if (self._scope(scope), name) not in defs:
                self.fail(tok, f"explicit instantiation of {name}, which the shader does not define")


def check_declarations(toks: list[Tok], lines: _Lines) -> list[tuple[int, int, str]]:
    w = _DeclWalker(toks, lines)
    w.walk(0, len(toks), (), (), "ns", [])
    w.check()
    return w.edits


# ----------------------------------------------------------------------------- analysis
def _ids_in(toks: list[Tok], lo: int, hi: int) -> set[str]:
    return {toks[k].text for k in range(lo, hi) if toks[k].kind == "id"}


def sync_names(p: Parsed) -> set[str]:
    """Names (functions, classes with such member functions) that may reach a barrier/simd op."""
    names = set(SYNC_PRIMITIVES)
    ids = [(_ids_in(p.toks, f.body[0], f.body[1]), f) for f in p.funcs]
    changed = True
    while changed:
        changed = False
        for refs, f in ids:
            if refs & names:
                for nm in (f.name, f.cls):
                    if nm and nm not in names:
                        names.add(nm)
                        changed = True
    return names


_INT_LIMIT = 1 << 64
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
           ast.LShift: lambda a, b: a << b if 0 <= b < 64 else None, ast.RShift: lambda a, b: a >> b if 0 <= b < 64 else None}


def _eval_int(expr: str, env: dict[str, str]) -> int | None:
    """Value of an integer constant expression (+ - * / % << >>, parentheses), or None. Bounded:
    the expression comes from the shader (no ``**``, no huge shifts or numbers)."""
    for _ in range(4):
        expr = re.sub(r"[A-Za-z_]\w*", lambda m: f"({env[m.group()]})" if m.group() in env else m.group(), expr)
        if len(expr) > 2000:
            return None
    expr = re.sub(r"(\d+)[uUlL]+\b", r"\1", expr)
    if not re.fullmatch(r"[\d\s()+\-*/%<>]*", expr) or "**" in expr or "//" in expr:
        return None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value if node.value < _INT_LIMIT else None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = ev(node.left), ev(node.right)
            if a is None or b is None or (b == 0 and isinstance(node.op, (ast.FloorDiv, ast.Mod))):
                return None
            v = _BINOPS[type(node.op)](a, b)
            return v if v is not None and abs(v) < _INT_LIMIT else None
        return None

    try:
        return ev(ast.parse(expr.replace("/", "//").strip() or "x", mode="eval"))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _type_size(type_text: str, env: dict[str, str]) -> int | None:
    t = type_text.replace("const", "").replace("volatile", "").strip()
    t = env.get(t, t).strip()
    t = t.replace("metal::", "").replace("::", "").strip()
    m = re.fullmatch(r"(?:vec<\s*(\w+)\s*,\s*(\d)\s*>|([a-z_]+?)(\d)?)", t)
    if not m:
        m2 = re.fullmatch(r"atomic<\s*(\w+)\s*>", t)
        return SCALAR_SIZES.get(m2.group(1)) if m2 else None
    if m.group(1):
        base, n = m.group(1), int(m.group(2))
    else:
        base, n = m.group(3), int(m.group(4) or 1)
    s = SCALAR_SIZES.get(base)
    if s is None:
        return None
    return s * (4 if n == 3 else n)


_CONST_RE = re.compile(
    r"\b(?:static\s+)?(?:constexpr|const)\s+(?:constant\s+|const\s+|constexpr\s+)*"
    r"(?:unsigned\s+|signed\s+)?(?:int|uint|ushort|short|long|ulong|size_t|char|uchar|auto|unsigned)\s+"
    r"([A-Za-z_]\w*)\s*=\s*([0-9][0-9a-fA-FxX]*)[uUlL]*\s*;"
)


def analyze(p: Parsed) -> list[Kernel]:
    snames = sync_names(p)
    # integer constants (constexpr int TILE = 16;) for threadgroup array sizes
    consts = {m.group(1): str(int(m.group(2), 0)) for m in _CONST_RE.finditer(p.text)}
    templates: dict[str, list[KDecl]] = {}
    for d in p.decls:
        if d.kind == "template":
            templates.setdefault(d.base, []).append(d)
    # tg storage per function body
    tg_by_func: dict[int, list[tuple[int, int]]] = {}
    for k, end, fi in p.tg_decls:
        tg_by_func.setdefault(fi, []).append((k, end))
    func_by_body = {f.body: idx for idx, f in enumerate(p.funcs)}

    kernels: list[Kernel] = []
    seen: set[str] = set()
    plain_defined = {(tuple(d.ns), d.base) for d in p.decls if d.kind == "plain" and d.body is not None}
    for d in p.decls:
        if d.kind == "template":
            continue
        if d.kind == "plain" and d.body is None:
            continue  # forward declaration; the definition carries the entry
        if d.kind == "plain" and (tuple(d.ns), d.base) not in plain_defined:
            continue
        src = d
        attr_src = d
        if d.kind == "inst":
            cands = [t for t in templates.get(d.base, []) if len(t.params) == len(d.params)]
            with_body = [t for t in cands if t.body is not None]
            if with_body:
                src = with_body[0]
            elif cands:
                src = cands[0]
            attr_src = src
        name = d.attrs.get("host_name", "").strip()
        if name.startswith('"'):  # adjacent string literals concatenate: "a" "_b"
            try:
                name = "".join(bytes(m, "utf-8").decode("unicode_escape")
                               for m in re.findall(r'"((?:\\.|[^"\\])*)"', name))
            except UnicodeDecodeError:
                raise ShaderSyntaxError(f"invalid host_name {name[:80]}") from None
        name = name or d.base
        if name in seen:
            continue
        seen.add(name)
        # roles
        roles: list[tuple[str, object]] = []
        pnames, ptypes, pspaces = [], [], []
        next_buf = 0
        nbuf = 0
        for idx, prm in enumerate(d.params):
            attrs = dict(prm.attrs)
            if attr_src is not d and idx < len(attr_src.params):
                for a, v in attr_src.params[idx].attrs.items():
                    attrs.setdefault(a, v)
            pnames.append(prm.name or (attr_src.params[idx].name if attr_src is not d else "") or f"arg{idx}")
            ptypes.append(prm.type_text)
            pspaces.append(prm.space or "")
            grid = next((a for a in attrs if a in GRID_ATTRS), None)
            if grid:
                roles.append(("attr", GRID_ATTRS[grid]))
            elif "threadgroup" in attrs or prm.space == "threadgroup":
                tgi = _eval_int(attrs.get("threadgroup", "0") or "0", {}) or 0
                roles.append(("tg", tgi))
            else:
                bi = _eval_int(attrs["buffer"], {}) if "buffer" in attrs else None
                if bi is None:
                    bi = next_buf
                next_buf = bi + 1
                nbuf = max(nbuf, bi + 1)
                roles.append(("buffer", bi))
        # sync analysis
        sync = False
        tg_mem = 0
        if src.body is not None:
            refs = _ids_in(p.toks, src.body[0], src.body[1])
            sync = bool(refs & snames)
            env = dict(consts)
            if d.kind == "inst":
                env.update(src.tdefaults)
                env.update(zip(src.tparams, d.targs))
            fi = func_by_body.get(src.body)
            for k, end in tg_by_func.get(fi, []):
                tg_mem += _tg_size(p.toks, k, end, env)
        if d.kind == "inst" and {t.text for t in d.targ_toks if t.kind == "id"} & snames:
            sync = True
        if src.body is None and d.kind == "inst":
            sync = True  # unknown body: be safe
        mt = _eval_int(attr_src.attrs.get("max_total_threads_per_threadgroup", "") or d.attrs.get(
            "max_total_threads_per_threadgroup", "") or "1024", {}) or 1024
        mt = max(1, min(1024, mt))
        symbol = f"mpsx_k{len(kernels)}"
        kernels.append(Kernel(name, symbol, d.expr, d.ns, roles, pnames, ptypes, sync, mt,
                              (tg_mem + 15) // 16 * 16, nbuf, param_spaces=pspaces))
    return kernels


def _tg_size(toks: list[Tok], k: int, end: int, env: dict[str, str]) -> int:
    decl = toks[k + 1 : end]
    total = 0
    # type = tokens up to the first declarator name
    parts = _split_commas(decl)
    if not parts:
        return 0
    first = parts[0]
    # find declarator name: last id before '[' or end
    texts = [t.text for t in first]
    cut = texts.index("[") if "[" in texts else len(texts)
    if cut == 0:
        return 0
    type_text = _join(first[: cut - 1])
    esize = _type_size(type_text, env)
    if esize is None:
        return 0
    for pi, part in enumerate(parts):
        ptexts = [t.text for t in part]
        if pi > 0:
            c = ptexts.index("[") if "[" in ptexts else len(ptexts)
            dims_toks = part[c:]
        else:
            dims_toks = first[cut:]
        count = 1
        j = 0
        while j < len(dims_toks):
            if dims_toks[j].text == "[":
                e = _match(dims_toks, j, "[", "]")
                v = _eval_int(_join(dims_toks[j + 1 : e]), env)
                if v is None:
                    return total
                count *= v
                j = e + 1
            else:
                j += 1
        total += esize * count
    return total


# ----------------------------------------------------------------------------- rewriting
_HALF_LIT = re.compile(r"^((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)[hH]$")
_SWZ_RE = re.compile(r"\.\s*([xyzw]{2,4}|[rgba]{2,4})\b")


_CV = ("const", "volatile")
_PTR_QUALS = ("const", "volatile", "__restrict", "__restrict__", "restrict")
_CASTS = ("reinterpret_cast", "static_cast", "const_cast")
# after `&name[...]`: a postfix operator binds to the element, not to the address
_POSTFIX = (".", "->", "[", "(", "++", "--")
# before `&`: it is the binary operator, not address-of
_OPERAND_END = (")", "]")


def _checked_rewrites(p: Parsed) -> tuple[list[tuple[int, int, str]], set[int]]:
    """Checked mode: every `device T*` of the source -- kernel and helper parameters, locals,
    members, return types, C-style and named casts -- becomes ``::mpsx::checked_ptr<T>``
    (cv-qualifiers of T dropped, so that templates deducing T from `device const T*` accept
    a `device T*`), and `&p[i]` on such a pointer becomes `(p + (i))`, which keeps the bounds.
    Returns the edits and the token indices of the rewritten `device` keywords."""
    toks = p.toks
    n = len(toks)
    edits: list[tuple[int, int, str]] = []
    devices: set[int] = set()
    names: set[str] = set()
    for i, t in enumerate(toks):
        if t.kind != "id" or t.text != "device":
            continue
        # element type: identifiers, `::` and template arguments up to the `*`
        j = i + 1
        elem: list[Tok] = []
        while j < n:
            tx = toks[j].text
            if tx == "<" and elem:
                try:
                    e = _match_angle(toks, j)
                except ShaderSyntaxError:
                    break
                elem.extend(toks[j : e + 1])
                j = e + 1
                continue
            if toks[j].kind == "id" or tx == "::":
                elem.append(toks[j])
                j += 1
                continue
            break
        if j >= n or toks[j].text != "*":
            continue
        star = j
        j += 1
        post: list[str] = []
        while j < n and toks[j].text in _PTR_QUALS:
            post.append(toks[j].text)
            j += 1
        ref = j < n and toks[j].text in ("&", "&&")
        if ref:
            j += 1
        nxt = toks[j].text if j < n else ""
        if nxt in ("*", "device", "constant", "thread", "threadgroup"):
            continue  # pointer to pointer (an argument buffer): not an access of a buffer
        core = [tk.text for tk in elem if tk.text not in _CV]
        if not core or core in (["void"], ["auto"]) or "decltype" in core:
            continue
        first = i
        while first > 0 and toks[first - 1].text in _CV:
            first -= 1
        k0 = first - 1
        if k0 >= 1 and toks[k0].text == "(" and toks[k0 - 1].text in ("sizeof", "alignof", "__alignof__"):
            continue  # sizeof(device T*) keeps the size of a pointer
        cv_elem = _join([tk for tk in elem if tk.text not in _CV])
        ctype = f"::mpsx::checked_ptr<{cv_elem}>"
        if nxt == ">" and k0 >= 1 and toks[k0].text == "<" and toks[k0 - 1].text in _CASTS and not post and not ref:
            # reinterpret_cast<device T*>(x) -> ::mpsx::dev_cast<T>(x)
            edits.append((toks[k0 - 1].start, toks[j].end, f"::mpsx::dev_cast<{cv_elem}>"))
            devices.add(i)
            continue
        if nxt == ">":
            continue  # a template argument (array<device T*, N>): left raw
        top_const = "const " if "const" in post else ""
        # replaced: [cv] device T [cv] * [cv/restrict]; a `&` after it stays
        edits.append((toks[first].start, toks[star + len(post)].end, f"{top_const}{ctype}"))
        devices.add(i)
        if j < n and toks[j].kind == "id":
            names.add(toks[j].text)
    # other reinterpret_casts may take a checked pointer (reinterpret_cast<ulong>(p))
    cast_edits = {e[0] for e in edits}
    for t in toks:
        if t.kind == "id" and t.text == "reinterpret_cast" and t.start not in cast_edits:
            edits.append((t.start, t.end, "::mpsx::reinterpret_as"))
    # &name[expr] -> (name + (expr)) for the rewritten names
    for i, t in enumerate(toks):
        if t.text != "&" or i + 2 >= n or toks[i + 1].text not in names or toks[i + 2].text != "[":
            continue
        prev = toks[i - 1] if i > 0 else None
        if prev is not None and (prev.kind in ("id", "num", "str") and prev.text not in ("return", "case")
                                 or prev.text in _OPERAND_END):
            continue
        if i + 3 < n and toks[i + 3].text == "[":
            continue  # [[ attribute
        try:
            close = _match(toks, i + 2, "[", "]")
        except ShaderSyntaxError:
            continue
        if close + 1 < n and toks[close + 1].text in _POSTFIX:
            continue
        edits.append((t.start, toks[i + 2].end, f"({toks[i + 1].text} + ("))
        edits.append((toks[close].start, toks[close].end, "))"))
    return edits, devices


_SPACE_ONLY = {"device", "thread", "threadgroup", "threadgroup_imageblock", "ray_data", "object_data"}


def _address_space_duplicates(p: Parsed, checked_devices: set[int] = frozenset()) -> list[tuple[int, int, str]]:
    """MSL can overload a function on the address space of a pointer (device T* vs threadgroup T*);
    on the host both are T*, which would be a redefinition.  Keep the first definition.  (In
    checked mode a `device T*` becomes a checked pointer, a distinct type: such overloads stay.)"""
    toks = p.toks
    seen: dict[tuple, tuple[str, ...]] = {}
    edits = []
    for f in p.funcs:
        if f.head < 0:
            continue
        head = ["device*" if k in checked_devices else toks[k].text for k in range(f.head, f.body[0])]
        if not any(h in _SPACE_ONLY or h == "constant" for h in head):
            continue
        norm = tuple("const" if h == "constant" else h for h in head if h not in _SPACE_ONLY)
        key = (f.ctx, f.name, norm)
        if key in seen and seen[key] != tuple(head):
            start, end = toks[f.head].start, toks[f.body[1]].end
            blank = "".join(c if c == "\n" else " " for c in p.text[start:end])
            edits.append((start, end, blank))
        else:
            seen.setdefault(key, tuple(head))
    return edits


def rewrite(p: Parsed, checked: bool) -> tuple[str, set[str]]:
    """Apply the source edits; returns (text, swizzle names used)."""
    checked_edits, checked_devices = _checked_rewrites(p) if checked else ([], set())
    edits: list[tuple[int, int, str]] = (_address_space_duplicates(p, checked_devices) + list(p.sec_edits)
                                         + checked_edits)
    toks = p.toks
    for k, end, _fi in p.tg_decls:
        edits.append((toks[k].start, toks[k].end, "static thread_local"))
        names = []
        for part in _split_commas(toks[k + 1 : end]):
            texts = [t.text for t in part]
            cut = texts.index("[") if "[" in texts else (texts.index("=") if "=" in texts else len(texts))
            if cut > 0 and part[cut - 1].kind == "id":
                names.append(part[cut - 1].text)
        esc = "".join(f" ::mpsx::escape({nm});" for nm in names)
        edits.append((toks[end].end, toks[end].end, esc))
    for ti, t in enumerate(toks):
        if t.kind == "id" and t.text == "constant":
            # MSL constant memory is read-only: `const` keeps constant/device overloads distinct
            nxt = toks[ti + 1].text if ti + 1 < len(toks) else ""
            prv = toks[ti - 1].text if ti > 0 else ""
            edits.append((t.start, t.end, "" if "const" in (nxt, prv) else "const"))
        if t.kind == "num":
            m = _HALF_LIT.match(t.text)
            if m:
                edits.append((t.start, t.end, f"((half){m.group(1)}f)"))
    for d in p.decls:
        # kernels are inlined into their entry point's thread loop (so it can be vectorized);
        # explicit instantiations cannot carry `inline`
        t = toks[d.kidx]
        edits.append((t.start, t.end, "" if d.kind == "inst" else "inline __attribute__((always_inline))"))
    edits.sort(key=lambda e: (e[0], e[1]))
    out = []
    pos = 0
    text = p.text
    for s, e, rep in edits:
        if s < pos:
            continue
        out.append(text[pos:s])
        out.append(rep)
        pos = e
    out.append(text[pos:])
    swz = set(_SWZ_RE.findall(text))
    # The shader's own declarations get hidden visibility: a function it declares but does not
    # define cannot be linked against a host library (generate() pops this).
    return "#pragma GCC visibility push(hidden)\n" + "".join(out), swz


def swizzle_macros(names: set[str]) -> str:
    comp = {"x": 0, "y": 1, "z": 2, "w": 3, "r": 0, "g": 1, "b": 2, "a": 3}
    lines = []
    for n in (2, 3, 4):
        members = []
        for nm in sorted(names):
            idx = [comp[c] for c in nm]
            if max(idx) < n:
                members.append(f"::metal::swz<T, {n}, {', '.join(map(str, idx))}> {nm};")
        lines.append(f"#define MPSX_SWIZZLES_{n}(T) " + " ".join(members))
    # program-scope variables are constant-initialized (no shader code runs at load time)
    lines.append("#if defined(__clang__)\n#define MPSX_CONSTINIT [[clang::require_constant_initialization]]\n"
                 "#else\n#define MPSX_CONSTINIT __constinit\n#endif")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- generation
def generate(kernels: list[Kernel], checked: bool) -> str:
    out = ['\n#pragma GCC visibility pop\n# 1 "<generated entry points>"\n']
    for k in kernels:
        opens = "".join(("inline " if inl else "") + f"namespace {nm} {{ " for nm, inl in k.ns)
        closes = "}" * len(k.ns)
        args = []
        for idx, (role, val) in enumerate(k.roles):
            P = f"S_::arg<{idx}>"
            if role == "buffer":
                if checked:
                    args.append(f"::mpsx::slot_cast_checked<{P}>(a{val}_, ab_, {val})")
                else:
                    args.append(f"::mpsx::slot_cast<{P}>(a{val}_)")
            elif role == "attr":
                args.append(f"::mpsx::attr_cast<{P}>({val})")
            else:
                args.append(f"::mpsx::slot_cast<{P}>(::mpsx::tg_param_buffer({val}))")
        nb = k.nbuffers
        loads = "".join(f"  void* a{b}_ = ::mpsx::arg(ab_, {b});\n" for b in range(nb))
        runner = "run_fibers" if k.sync else "run_loop"
        scope = ""
        if checked:
            # the launch in progress, for checked pointers: names of the buffer slots
            slot_names = [""] * nb
            for idx, (role, val) in enumerate(k.roles):
                if role == "buffer" and isinstance(val, int) and 0 <= val < nb:
                    slot_names[val] = k.param_names[idx]
            names = ", ".join(json.dumps(x) for x in slot_names) or '""'
            scope = (f"  static const char* const names_[] = {{{names}}};\n"
                     f"  const ::mpsx::launch_ctx lctx_{{ab_, {json.dumps(k.name)}, names_, {nb}}};\n"
                     f"  ::mpsx::launch_scope lscope_(&lctx_);\n")
        out.append(
            f"{opens}\n"
            f"extern \"C\" __attribute__((visibility(\"default\"))) void {k.symbol}(const void* ab_, "
            f"const uint32_t* grid_, const uint32_t* group_, uint64_t gbegin_, uint64_t gend_) {{\n"
            f"  using S_ = ::mpsx::fsig<decltype(&{k.expr})>;\n"
            f"{loads}{scope}"
            f"  auto body_ = [&](const ::mpsx::tinfo& t_) __attribute__((always_inline)) {{\n"
            f"    (void)t_;\n    {k.expr}({', '.join(args)});\n  }};\n"
            f"  ::mpsx::{runner}(grid_, group_, gbegin_, gend_, body_);\n"
            f"}}\n{closes}\n"
        )
    if checked:
        out.append('extern "C" __attribute__((visibility("default"))) const int mpsx_checked_build = 1;\n')
    info = json.dumps({"version": 1, "kernels": [k.to_json() for k in kernels]})
    out.append(
        'extern "C" __attribute__((visibility("default"))) const char mpsx_library_info[] = '
        f'R"MPSXJSON({info})MPSXJSON";\n'
    )
    return "".join(out)
