"""MSL front end: header embedding, kernel-signature parsing, source rewriting, code generation.

The pipeline (see docs/shaders.md):

1. ``embed`` inlines ``#include <c10/metal/...>`` (and anything else under torch's include
   directory) with ``torch.utils._cpp_embed_headers._embed_headers`` -- exactly the headers
   torch.mps would inline -- and adds ``#line`` markers so diagnostics keep the user's lines.
2. The host compiler's preprocessor expands macros (``g++ -E -DMPSX_PARSE``); the backend
   ``<metal_stdlib>`` is empty in that pass, so the output is the user's code with macros
   expanded and the MSL keywords still in place.
3. ``parse`` walks the tokens: namespaces, classes, function bodies, ``kernel`` declarations,
   definitions and ``template [[host_name("...")]]`` instantiations, their parameters'
   address spaces, types and ``[[attributes]]``.
4. ``rewrite`` edits the preprocessed text: ``threadgroup`` storage declarations become
   per-OS-thread storage shared by the fibers of a threadgroup, ``1.0h`` literals become
   half, and (checked mode) device pointer parameters become bounds-checked pointers.
5. ``generate`` appends one ``extern "C"`` entry point per kernel that unpacks the argument
   block and runs threadgroups ``[begin, end)`` either as a plain loop or with fibers.
"""

from __future__ import annotations

import json
import re
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


class ShaderSyntaxError(Exception):
    """Internal: a parse problem to be reported as SyntaxError."""


# ----------------------------------------------------------------------------- embedding
def torch_include_dir() -> Path:
    import torch

    return Path(torch.__file__).parent / "include"


def embed(source: str) -> str:
    """Inline torch headers like torch.mps.compile_shader does, with #line markers."""
    from .._compat import embed_headers

    _embed_headers = embed_headers()

    include_dirs = [torch_include_dir()]
    processed: set[str] = set()
    out = [f'#line 1 "{SOURCE_NAME}"\n']
    inc_re = re.compile(r'^\s*#include\s*[<"]([^>"]+)[>"]')
    lines = source.split("\n")
    for lineno, line in enumerate(lines, start=1):
        m = inc_re.match(line)
        if m and any((d / m[1]).exists() for d in include_dirs):
            text = _embed_headers([line + "\n"], include_dirs, processed)
            if text.strip():
                out.append(f'#line 1 "{m[1]}"\n')
                out.append(text if text.endswith("\n") else text + "\n")
            out.append(f'#line {lineno + 1} "{SOURCE_NAME}"\n')
        else:
            out.append(("" if line.startswith("#pragma once") else line) + "\n")
    return "".join(out)


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


def parse(text: str) -> Parsed:
    toks = tokenize(text)
    decls: list[KDecl] = []
    funcs: list[FuncInfo] = []
    tg_decls: list[tuple[int, int, int]] = []
    # stack of (kind, name, inline); kind in ns/class/func/other
    stack: list[tuple[str, str, bool]] = []
    i = 0
    n = len(toks)
    last_boundary = 0  # index after the last ; { } at the current (non-func) level

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
                k = j - 1
                d = 0
                while k >= 0:
                    if texts[k] == ">":
                        d += 1
                    elif texts[k] == "<":
                        d -= 1
                        if d == 0:
                            break
                    k -= 1
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
        d = 0
        m = len(head) - 1
        while m >= 0:
            if head[m].text == ">":
                d += 1
            elif head[m].text == "<":
                d -= 1
                if d == 0:
                    break
            m -= 1
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


def _eval_int(expr: str, env: dict[str, str]) -> int | None:
    for _ in range(4):
        expr = re.sub(r"[A-Za-z_]\w*", lambda m: f"({env[m.group()]})" if m.group() in env else m.group(), expr)
    expr = re.sub(r"(\d+)[uUlL]+\b", r"\1", expr)
    if not re.fullmatch(r"[\d\s()+\-*/%<>]*", expr):
        return None
    try:
        return int(eval(expr.replace("/", "//"), {"__builtins__": {}}))  # noqa: S307 - digits and operators only
    except Exception:
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
            name = "".join(bytes(m, "utf-8").decode("unicode_escape") for m in re.findall(r'"((?:\\.|[^"\\])*)"', name))
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


def _checked_rewrites(d: KDecl) -> list[tuple[int, int, str]]:
    edits = []
    for prm in d.params:
        if prm.space != "device":
            continue
        tt = [t for t in prm.type_toks]
        texts = [t.text for t in tt]
        if texts.count("*") != 1 or "&" in texts:
            continue
        star = texts.index("*")
        if any(x not in ("const", "volatile") for x in texts[star + 1 :]):
            continue
        elem = [t for t in tt[:star] if t.text not in ADDRESS_SPACES]
        et = [t.text for t in elem]
        if not elem or et == ["void"] or et in (["const", "void"], ["void", "const"]) or any("atomic" in x for x in et):
            continue
        edits.append((tt[0].start, tt[-1].end, f"::mpsx::checked_ptr<{_join(elem)}>"))
    return edits


_SPACE_ONLY = {"device", "thread", "threadgroup", "threadgroup_imageblock", "ray_data", "object_data"}


def _address_space_duplicates(p: Parsed) -> list[tuple[int, int, str]]:
    """MSL can overload a function on the address space of a pointer (device T* vs threadgroup T*);
    on the host both are T*, which would be a redefinition.  Keep the first definition."""
    toks = p.toks
    seen: dict[tuple, tuple[str, ...]] = {}
    edits = []
    for f in p.funcs:
        if f.head < 0:
            continue
        head = [t.text for t in toks[f.head : f.body[0]]]
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
    edits: list[tuple[int, int, str]] = _address_space_duplicates(p)
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
        if checked:
            edits.extend(_checked_rewrites(d))
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
    return "".join(out), swz


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
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- generation
def generate(kernels: list[Kernel], checked: bool) -> str:
    out = ['\n# 1 "<generated entry points>"\n']
    for k in kernels:
        opens = "".join(("inline " if inl else "") + f"namespace {nm} {{ " for nm, inl in k.ns)
        closes = "}" * len(k.ns)
        args = []
        for idx, (role, val) in enumerate(k.roles):
            P = f"S_::arg<{idx}>"
            if role == "buffer":
                if checked:
                    args.append(
                        f"::mpsx::slot_cast_checked<{P}>(a{val}_, ::mpsx::arg_lo(ab_, {val}), "
                        f"::mpsx::arg_hi(ab_, {val}), {json.dumps(k.name)}, {json.dumps(k.param_names[idx])})"
                    )
                else:
                    args.append(f"::mpsx::slot_cast<{P}>(a{val}_)")
            elif role == "attr":
                args.append(f"::mpsx::attr_cast<{P}>({val})")
            else:
                args.append(f"::mpsx::slot_cast<{P}>(::mpsx::tg_param_buffer({val}))")
        nb = k.nbuffers
        loads = "".join(f"  void* a{b}_ = ::mpsx::arg(ab_, {b});\n" for b in range(nb))
        runner = "run_fibers" if k.sync else "run_loop"
        out.append(
            f"{opens}\n"
            f"extern \"C\" __attribute__((visibility(\"default\"))) void {k.symbol}(const void* ab_, "
            f"const uint32_t* grid_, const uint32_t* group_, uint64_t gbegin_, uint64_t gend_) {{\n"
            f"  using S_ = ::mpsx::fsig<decltype(&{k.expr})>;\n"
            f"{loads}"
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
