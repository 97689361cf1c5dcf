"""No host escape from MSL (issue 17 item 2, docs/shaders.md "Security", docs/security.md
"Shader sources").

A Metal kernel cannot run host code; compiled as C++ for the host it could, unless the front end
(torch_mps_ext/shader/_frontend.py) refuses what Metal does not accept. Each attack below would
create a marker file or read a host file if it got through: the test asserts a SyntaxError naming
the line of the offending construct and that nothing ran (no marker) or leaked (no file content in
the message). The fuzz tests feed malformed MSL through the front end: a SyntaxError or success,
never another exception, a crash or a hang. Like tests/test_fallback_properties.py they are
derandomized (the same examples every run) and write no example database;
TORCH_MPS_EXT_PROPERTY_EXAMPLES=N and TORCH_MPS_EXT_PROPERTY_RANDOM=1 explore further.
"""

import os
import subprocess
import textwrap
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import torch_mps_ext  # noqa: F401  (registers the mps_ext device)
from torch_mps_ext import shader
from conftest import SESSION_DIR
from torch_mps_ext.shader import _compiler, _frontend as fe

set_hypothesis_home_dir(os.path.join(SESSION_DIR, "hypothesis"))
EXAMPLES = int(os.environ.get("TORCH_MPS_EXT_PROPERTY_EXAMPLES", "0")) or None
RANDOM = os.environ.get("TORCH_MPS_EXT_PROPERTY_RANDOM") == "1"

DEV = "mps_ext"
PASSWD_LINE = "root:x:0:0"  # the first line of /etc/passwd on this kind of system


@pytest.fixture(scope="module", autouse=True)
def private_cache(private_shader_cache):
    return private_shader_cache


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "the shader's host code ran"


def src(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def rejected(source: str, line: int, *, match: str | None = None, include_dirs=None,
             filename: str = "program_source") -> SyntaxError:
    """compile_shader(source) raises a SyntaxError whose lineno is ``line``."""
    kwargs = {} if include_dirs is None else {"include_dirs": include_dirs}
    with pytest.raises(SyntaxError) as ei:
        torch.mps_ext.compile_shader(source, **kwargs)
    e = ei.value
    assert e.lineno == line, f"expected line {line}, got {e.lineno}: {e}"
    if filename == "program_source":
        assert e.filename in (None, "program_source") or str(e.filename).endswith("program_source")
        if e.text is not None and "\r" not in source and "\0" not in source:
            assert e.text == source.split("\n")[line - 1]
    else:
        assert e.filename == filename, e.filename
    if match is not None:
        assert match in str(e), str(e)
    return e


KERNEL = "kernel void k(device float* o [[buffer(0)]], uint i [[thread_position_in_grid]]) { o[i] = 1.0f; }\n"


# --------------------------------------------------------------------------- host code
def test_inline_asm(marker):
    rejected(src("""
        #include <metal_stdlib>
        kernel void k(device float* o, uint i [[thread_position_in_grid]]) {
          o[i] = 1.0f;
          asm volatile("mov $60, %eax; syscall");
        }
        """), 4, match="inline assembly")
    rejected("kernel void k(device float* o) {\n  __asm__(\"nop\");\n}\n", 2, match="inline assembly")


def test_gnu_attribute_constructor(marker):
    # with the shim's <cstdio>, this constructor would create the marker at compile_shader() time
    rejected(src(f"""
        #include <metal_stdlib>
        {KERNEL.strip()}
        __attribute__((constructor))
        static void init() {{ fclose(fopen("{marker}", "w")); }}
        """), 3, match="__attribute__")
    rejected(src(f"""
        {KERNEL.strip()}
        [[gnu::constructor]] static void init() {{ fclose(fopen("{marker}", "w")); }}
        """), 2, match="gnu::constructor")
    rejected(src(f"""
        {KERNEL.strip()}
        [[using gnu: constructor]] static void init() {{ fclose(fopen("{marker}", "w")); }}
        """), 2, match="using gnu")
    rejected(src("""
        kernel void k(device float* o [[buffer(0)]]) { o[0] = 1.0f; }
        [[__gnu__::__destructor__]] static void fini() {}
        """), 2)
    # the same attribute spelled with digraphs (<: :> are [ ])
    rejected(src(f"""
        {KERNEL.strip()}
        <:<:gnu::constructor:>:> static void init() {{ fclose(fopen("{marker}", "w")); }}
        """), 2, match="digraphs")
    # clang would honour these if CXX is clang++
    rejected(f"{KERNEL}#pragma clang attribute push (__attribute__((constructor)), apply_to = function)\n", 2)
    rejected(f"{KERNEL}[[clang::section(\".init_array\")]] static int x = 0;\n", 2)


def test_declared_libc_function(marker):
    rejected(src(f"""
        #include <metal_stdlib>
        int system(const char*);
        kernel void k(device float* o [[buffer(0)]]) {{ o[0] = system("touch {marker}"); }}
        """), 2, match="system")
    # a name the front end has no list for: the declaration without a body is what is refused
    rejected(src("""
        float host_helper(float x);
        kernel void k(device float* o [[buffer(0)]]) { o[0] = host_helper(1.0f); }
        """), 1, match="declared but not defined")
    # function templates are not covered by the hidden-visibility link check: the front end is
    rejected(src("""
        namespace lib {
        template <typename T> T external_template(T x);
        }
        kernel void k(device float* o [[buffer(0)]]) { o[0] = lib::external_template(1.0f); }
        """), 2, match="declared but not defined")
    # a trailing return type with '=' in it is not '= delete'
    rejected(src("""
        template <class T> auto g(T x) -> decltype(x = x);
        kernel void k(device float* o [[buffer(0)]]) { float v = 1.0f; o[0] = g(v); }
        """), 1, match="declared but not defined")
    # a member function declared in a class and never defined
    rejected(src("""
        struct Stream {
          Stream(const char* path, int mode);
        };
        kernel void k(device float* o [[buffer(0)]]) { Stream s("x", 1); o[0] = 1.0f; }
        """), 2, match="declared but not defined")


def test_extern(marker):
    rejected(src(f"""
        extern "C" int system(const char*);
        kernel void k(device float* o [[buffer(0)]]) {{ o[0] = system("touch {marker}"); }}
        """), 1, match="extern")
    rejected(src("""
        kernel void k(device float* o [[buffer(0)]], uint i [[thread_position_in_grid]]) {
          extern char** environ;
          o[i] = environ[0][0];
        }
        """), 2, match="extern")
    rejected('extern "C" {\nint getpid();\n}\n' + KERNEL, 1, match="extern")


def test_host_library_names(marker):
    # declared by the backend's own headers (<cstdio>, <sys/mman.h>): a kernel must not reach them
    for line, call in ((3, f'FILE* f = popen("touch {marker}", "r");'),
                       (3, f'fclose(fopen("{marker}", "w"));'),
                       (3, 'printf("hello");'),
                       (3, f'remove("{marker}");'),
                       (3, "mprotect((void*)o, 4096, 7);"),
                       (3, 'void* p = dlsym((void*)0, "system");')):
        rejected(src(f"""
            kernel void k(device float* o [[buffer(0)]], uint i [[thread_position_in_grid]]) {{
              o[i] = 1.0f;
              {call}
            }}
            """), line)
    # std:: spellings and address-taking too
    rejected(src("""
        kernel void k(device float* o [[buffer(0)]]) {
          auto f = &std::fopen;
          o[0] = f != nullptr;
        }
        """), 2, match="fopen")


def test_builtins_that_reach_the_host(marker):
    rejected(src(f"""
        kernel void k(device float* o [[buffer(0)]], uint i [[thread_position_in_grid]]) {{
          if (i == 0)
            __builtin_execl("/bin/sh", "sh", "-c", "touch {marker}", (char*)0);
          o[i] = 1.0f;
        }}
        """), 3, match="__builtin_execl")
    rejected('kernel void k(device float* o) {\n  __builtin_printf("x");\n}\n', 2)
    rejected('kernel void k(device float* o) {\n  o[0] = (float)(long)__builtin_frame_address(0);\n}\n', 2)
    rejected('kernel void k(device int* o) {\n  __sync_fetch_and_add(o, 1);\n}\n', 2)
    rejected('kernel void k(device float* o) {\n  o[0] = (float)(long)&__environ;\n}\n', 2)


def test_keyword_smuggled_through_macros(marker):
    # `asm` formed by token pasting: the check runs on the preprocessed text
    rejected(src("""
        #define CAT(a, b) a##b
        kernel void k(device float* o [[buffer(0)]]) {
          o[0] = 1.0f;
          CAT(as, m)("nop");
        }
        """), 4, match="inline assembly")
    rejected(src(f"""
        #define ATTR __attri##bute__((constructor))
        #define KW(x) x
        {KERNEL.strip()}
        KW(ATTR) static void init() {{ fclose(fopen("{marker}", "w")); }}
        """), 4, match="__attribute__")
    # a macro named like a Metal keyword
    rejected(src("""
        #define kernel __attribute__((constructor)) void
        kernel init() {}
        """), 2, match="__attribute__")


def test_program_scope_code_at_load_time(marker):
    # a program-scope object whose constructor would run when the library is loaded
    e = rejected(src("""
        struct Init {
          int v;
          Init() : v(42) {}
        };
        Init at_load;
        kernel void k(device float* o [[buffer(0)]]) { o[0] = at_load.v; }
        """), 5)
    assert "constant initializer" in str(e) or "constinit" in str(e)
    # ... or a destructor, run at exit
    e = rejected(src("""
        struct AtExit {
          constexpr AtExit() {}
          ~AtExit() {}
        };
        constant AtExit at_exit;
        kernel void k(device float* o [[buffer(0)]]) { o[0] = 1.0f; }
        """), 5)
    assert "trivial destructor" in str(e)
    rejected(src("""
        int compute() { return 3; }
        constant int k3 = compute();
        kernel void k(device float* o [[buffer(0)]]) { o[0] = k3; }
        """), 2)


def test_exceptions_allocation_computed_goto():
    rejected("kernel void k(device float* o) {\n  if (o[0] < 0) throw 1;\n}\n", 2, match="exceptions")
    rejected("kernel void k(device float* o) {\n  float* p = new float[4];\n  o[0] = p[0];\n}\n", 2,
             match="dynamic allocation")
    rejected("kernel void k(device float* o) {\n  void* t = (void*)o;\n  goto *t;\n}\n", 3, match="computed goto")


def test_runtime_names_are_reserved():
    rejected("kernel void k(device float* o) {\n  ::mpsx::report(\"x\");\n}\n", 2, match="reserved")
    rejected("MPSX_INLINE float f(float x) { return x; }\n" + KERNEL, 1, match="reserved")


# --------------------------------------------------------------------------- preprocessor
def test_pragmas():
    for p in ("GCC visibility push(default)", "weak foo", 'GCC dependency "/etc/passwd"', "omp parallel",
              "redefine_extname foo system", "GCC optimize(\"O0\")", 'GCC pch_preprocess "x"'):
        e = rejected(f"{KERNEL}#pragma {p}\n", 2)
        assert PASSWD_LINE not in str(e)
    # _Pragma: with an allowed pragma as written (accepted, see ACCEPTED), else refused; pasted
    # together, poisoned before the user's text (the preprocessor would run it: a FIFO blocks it)
    rejected(f'{KERNEL}_Pragma("GCC dependency \\"/etc/passwd\\"")\n', 2, match="_Pragma")
    rejected(f'#define S "unroll"\n{KERNEL}_Pragma(S)\n', 3, match="_Pragma")
    rejected(f'#define P(a, b) a##b\n{KERNEL}P(_Pra, gma)("GCC dependency \\"/etc/passwd\\"")\n', 3)
    rejected(f'#define Q(a, b) a##b\n#if Q(__has_incl, ude)("/etc/passwd")\nint x;\n#endif\n{KERNEL}', 2)


def test_line_and_other_directives():
    rejected(f'#line 1 "c10/metal/utils.h"\n{KERNEL}', 1, match="#line")
    rejected(f'# 1 "<built-in>" 3\n{KERNEL}', 1, match="line markers")
    rejected(f"{KERNEL}#include_next <stdio.h>\n", 2)
    rejected(f"{KERNEL}#import <stdio.h>\n", 2)
    rejected(f'{KERNEL}#ident "x"\n', 2)
    rejected(f'{KERNEL}#embed "/etc/passwd"\n', 2)


def test_directive_produced_by_a_macro():
    # the preprocessed text is preprocessed again by the compiler: `# include` there would be read
    for d in ("#define HASH #\nHASH include \"/etc/passwd\"\n", "#define ID(x) x\nID(#) include \"/etc/passwd\"\n",
              "#define ID(x) x\nID(%:) include \"/etc/passwd\"\n"):
        e = rejected(d + KERNEL, 2, match="directive produced by macro expansion")
        assert PASSWD_LINE not in str(e)


def test_directive_hidden_by_lexical_tricks():
    # each of these is a directive for the preprocessor; none may read /etc/passwd
    cases = [
        '%:include "/etc/passwd"\n',  # digraph
        '/* comment */ #include "/etc/passwd"\n',  # a comment before '#'
        '#inc\\\nlude "/etc/passwd"\n',  # a line splice inside the directive name
        '#include \\\n"/etc/passwd"\n',
        'int x;\r#include "/etc/passwd"\n',  # a lone CR is a new line
        '\0#include "/etc/passwd"\n',  # NUL is blank for the preprocessor
        '#include "/etc/pass\\\nwd"\n',
    ]
    for c in cases:
        e = rejected(c + KERNEL, 1 if not c.startswith("int x;\r") else 2)
        assert PASSWD_LINE not in str(e)
    # a raw string literal could hide or reveal lines: not accepted at all
    rejected('constant char* s = R"x(\n#include "/etc/passwd"\n)x";\n' + KERNEL, 1, match="raw string")


# --------------------------------------------------------------------------- includes
def test_include_host_files_is_refused_without_reading_them():
    for name in ('"/etc/passwd"', "</etc/passwd>", '"../../../../../../../../etc/passwd"',
                 "<c10/metal/../../../../../../../../etc/passwd>", "<stdio.h>", "<cstdlib>", '"stdlib.h"',
                 "<metal_stdlib/../../../../etc/passwd>", "<mpsx_runtime.h>"):
        e = rejected(f"#include {name}\n{KERNEL}", 1, match="#include")
        assert PASSWD_LINE not in str(e)


def test_include_dev_zero_and_fifo_do_not_hang(tmp_path):
    fifo = tmp_path / "fifo.h"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    rejected(f'#include "/dev/zero"\n{KERNEL}', 1)
    rejected(f'#include "zero"\n{KERNEL}', 1, include_dirs=["/dev"], match="not a regular file")
    rejected(f'#include "fifo.h"\n{KERNEL}', 1, include_dirs=[tmp_path], match="not a regular file")
    assert time.monotonic() - t0 < 60


def test_include_directory():
    rejected(f"#include <c10/metal>\n{KERNEL}", 1, match="directory")
    rejected(f"#include <c10/metal/>\n{KERNEL}", 1)


def test_include_dirs_limits(tmp_path):
    secret = "SECRET_CONTENT_7f3a"
    (tmp_path / "big.h").write_text(f"// {secret}\n" + "x" * (fe.MAX_HEADER_BYTES + 1))
    e = rejected(f'#include "big.h"\n{KERNEL}', 1, include_dirs=[tmp_path], match="larger than")
    assert secret not in str(e)
    (tmp_path / "latin1.h").write_bytes(f"// {secret} \xe9\n".encode("latin-1"))
    e = rejected(f'#include "latin1.h"\n{KERNEL}', 1, include_dirs=[tmp_path], match="UTF-8")
    assert secret not in str(e)
    # a symbolic link out of the include directory
    (tmp_path / "passwd.h").symlink_to("/etc/passwd")
    e = rejected(f'#include "passwd.h"\n{KERNEL}', 1, include_dirs=[tmp_path], match="leaves its include directory")
    assert PASSWD_LINE not in str(e)
    # computed includes
    (tmp_path / "ok.h").write_text("#pragma once\n")
    rejected(f'#define H "ok.h"\n#include H\n{KERNEL}', 2, include_dirs=[tmp_path], match="computed")


def test_host_escape_in_an_included_header(tmp_path):
    (tmp_path / "evil.h").write_text('#pragma once\ninline void f() {\n  asm("nop");\n}\n')
    rejected(f'#include "evil.h"\n{KERNEL}', 3, include_dirs=[tmp_path], filename="evil.h", match="inline assembly")


def test_include_in_a_branch_that_is_not_compiled():
    # Metal semantics: a header that does not exist is an error only where it is included
    lib = torch.mps_ext.compile_shader("#ifndef __METAL__\n#include <stdio.h>\n#include \"/etc/passwd\"\n#endif\n"
                                       + KERNEL)
    x = torch.zeros(4, device=DEV)
    lib.k(x)
    torch.mps_ext.synchronize()
    assert x.cpu().tolist() == [1.0] * 4


def test_include_dirs(tmp_path):
    inc = tmp_path / "inc"
    (inc / "sub").mkdir(parents=True)
    (inc / "ops.h").write_text('#pragma once\n#include "sub/scale.h"\ninline float twice(float x) { return SCALE * x; }\n')
    (inc / "sub" / "scale.h").write_text('#pragma once\n#include "factor.h"\n#define SCALE FACTOR\n')
    (inc / "sub" / "factor.h").write_text("#define FACTOR 2.0f\n")  # next to its includer
    source = '#include <metal_stdlib>\n#include "ops.h"\n' \
             "kernel void k(device float* o [[buffer(0)]], uint i [[thread_position_in_grid]]) { o[i] = twice(i); }\n"
    # without include_dirs the header is not available
    rejected(source, 2, match="include_dirs")
    lib = torch.mps_ext.compile_shader(source, include_dirs=[inc])
    x = torch.zeros(4, device=DEV)
    lib.k(x)
    torch.mps_ext.synchronize()
    assert x.cpu().tolist() == [0.0, 2.0, 4.0, 6.0]
    # a changed header is a new library (the cache key covers the headers' text)
    (inc / "sub" / "factor.h").write_text("#define FACTOR 3.0f\n")
    lib2 = shader.compile_shader(source, include_dirs=str(inc))
    lib2.k(x)
    torch.mps_ext.synchronize()
    assert x.cpu().tolist() == [0.0, 3.0, 6.0, 9.0]
    # argument checking
    with pytest.raises(NotADirectoryError):
        torch.mps_ext.compile_shader(source, include_dirs=[tmp_path / "missing"])
    with pytest.raises(TypeError):
        torch.mps_ext.compile_shader(source, include_dirs=[3])
    # positional use is unchanged (as torch.mps.compile_shader(source))
    assert torch.mps_ext.compile_shader(KERNEL) is not None


# --------------------------------------------------------------------------- what Metal code may do
ACCEPTED = r"""
#include <metal_stdlib>
#include "metal_math"
#include <c10/metal/utils.h>
using namespace metal;

#pragma unroll
#pragma clang diagnostic push
#define UNROLL_FULL _Pragma("clang loop unroll(full)")

float helper(float x);                 // a forward declaration, defined below
float4 scale4(vec<float, 4> v, constant float& s = 2.0f);
template <typename T> T twice(const T);
template <typename U> U twice(const U v) { return v + v; }

struct Acc {
  float v;
  Acc(float x);
  float get() const;
  static constexpr float k = 0.5f;
  static constant int n = 3;
  [[maybe_unused]] int unused = 0;
  friend Acc operator+(Acc a, Acc b) { return Acc(a.v + b.v); }
};
Acc::Acc(float x) : v(x) {}
float Acc::get() const { return v * k; }

constant float table[4] = {1.0f, 2.0f, 3.0f, 4.0f};
constant float4 ones = float4(1.0f);
constexpr constant int kTile = 4;
constant half h1 = 1.5h;

float helper(float x) { return x + 1.0f; }
float4 scale4(vec<float, 4> v, constant float& s) { return v * s; }

kernel void accepted(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  if (__builtin_expect(i > 1000000u, 0)) __builtin_trap();
  __typeof__(i) j = i % kTile;
  Acc a(table[j]);
  float s = 0.0f;
  UNROLL_FULL
  for (int q = 0; q < Acc::n; ++q) s += ones.x;
#pragma GCC unroll 4
  for (int q = 0; q < 2; ++q) s -= 0.0f;
  out[i] = helper((a + Acc(1.0f)).get()) + twice(s) + c10::metal::ceil_div(4, 2) + float(h1) + scale4(ones).w - 2.0f;
}
"""


def test_metal_constructs_are_accepted():
    lib = torch.mps_ext.compile_shader(ACCEPTED)
    x = torch.zeros(8, device=DEV)
    lib.accepted(x)
    torch.mps_ext.synchronize()
    table = [1.0, 2.0, 3.0, 4.0]
    expect = [((table[i % 4] + 1.0) * 0.5 + 1.0) + 6.0 + 2.0 + 1.5 for i in range(8)]
    assert x.cpu().tolist() == pytest.approx(expect)


PROGRAM_SCOPE_VECTORS = """
#include <metal_stdlib>
using namespace metal;
constant packed_float3 kp = packed_float3(1.0f, 2.0f, 3.0f);
constant packed_float3 kq = packed_float3(float3(4.0f, 5.0f, 6.0f));
constant packed_half4 kh = packed_half4(0.5h);
constant float2x2 km = float2x2(float2(1.0f, 2.0f), float2(3.0f, 4.0f));
constant float2x2 kd = float2x2(2.0f);
constant float3x2 ks = float3x2(1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f);
kernel void consts(device float* out, uint i [[thread_position_in_grid]]) {
  float2 v = km * float2(1.0f, 1.0f);
  float2 d = kd * float2(1.0f, 1.0f);
  float2 s = ks * float3(0.0f, 1.0f, 0.0f);
  float3 q = kq;
  out[0] = kp.x; out[1] = kp.y; out[2] = kp.z; out[3] = v.x; out[4] = v.y; out[5] = d.x; out[6] = d.y;
  out[7] = q.z; out[8] = float(kh.w); out[9] = s.y; out[10] = float(sizeof(kp));
}
"""


def test_program_scope_packed_vectors_and_matrices():
    # Program-scope constants are constant-initialized (nothing of the shader runs at load
    # time): the shim's packed_vec and matrix constructors are constexpr, so these compile.
    lib = torch.mps_ext.compile_shader(PROGRAM_SCOPE_VECTORS)
    x = torch.zeros(11, device=DEV)
    lib.consts(x, threads=1)
    torch.mps_ext.synchronize()
    assert x.cpu().tolist() == [1.0, 2.0, 3.0, 4.0, 6.0, 2.0, 2.0, 6.0, 0.5, 4.0, 12.0]


def test_front_end_accepts_torch_metal_headers():
    heads = sorted(p.name for p in (fe.torch_include_dir() / "c10" / "metal").glob("*.h"))
    assert heads
    source = "".join(f"#include <c10/metal/{h}>\n" for h in heads) + KERNEL
    pp = _compiler.preprocess(fe.embed(source), source)  # the real preprocessor, no compilation
    kernels = fe.analyze(fe.parse(pp))
    assert [k.name for k in kernels] == ["k"]


# --------------------------------------------------------------------------- fuzzing
CORPUS = [
    KERNEL,
    ACCEPTED,
    src("""
        #include <metal_stdlib>
        using namespace metal;
        template <typename T>
        kernel void axpy(device T* out [[buffer(0)]], constant T* x [[buffer(1)]], constant float& a [[buffer(2)]],
                         uint i [[thread_position_in_grid]]) {
          out[i] = static_cast<T>(a * float(x[i]) + float(out[i]));
        }
        template [[host_name("axpy_float")]] kernel void axpy<float>(device float*, constant float*, constant float&, uint);
        kernel void reduce(device float* out [[buffer(0)]], constant float* x [[buffer(1)]],
                           uint tid [[thread_index_in_threadgroup]], uint gid [[threadgroup_position_in_grid]],
                           uint tg [[threads_per_threadgroup]]) {
          threadgroup float buf[256];
          buf[tid] = x[gid * tg + tid];
          threadgroup_barrier(mem_flags::mem_threadgroup);
          for (uint s = tg / 2; s > 0; s >>= 1) {
            if (tid < s) buf[tid] += buf[tid + s];
            threadgroup_barrier(mem_flags::mem_threadgroup);
          }
          if (tid == 0) out[gid] = simd_sum(buf[0]);
        }
        """),
    src("""
        #include <c10/metal/indexing.h>
        #define FN(x) x##_functor
        struct cube_functor { template <typename T> T operator()(const T x) { return x * x * x; } };
        REGISTER_UNARY_OP(cube, float, float);
        constant int kSizes[2] = {2, 3};
        namespace ns { inline namespace v1 { struct S { static constexpr int n = 2; int f() const; }; } }
        int ns::S::f() const { return n; }
        """),
]
TOKENS = ["{", "}", "(", ")", "[", "]", "[[", "]]", "<", ">", ";", ",", "::", "#", "##", "%:", "\\\n", "\n", "\r",
          "\0", '"', "'", "/*", "*/", "//", 'R"(', "template", "kernel", "device", "constant", "threadgroup",
          "namespace", "struct", "operator", "asm", "extern", '"C"', "__attribute__((constructor))", "[[gnu::used]]",
          "#include <metal_stdlib>", '#include "x.h"', "#include <c10/metal/utils.h>", "#define X(a) a##a",
          "#if 0", "#endif", "#pragma unroll", "_Pragma", "= delete", "...", "0x1'2", "1.5h", "\ufeff", "\u00e9",
          "[[buffer(99999999999999999999)]]", "[[buffer(9**9**9)]]", "[[host_name(\"\\x\")]]", "threadgroup float t[1<<40];",
          "int f(int);", "static int s;", "= {", "template <", "typename", ">>", "->", "~", "&&", "*"]


@st.composite
def malformed(draw):
    text = draw(st.sampled_from(CORPUS))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "insert", "delete", "bytes", "brackets", "duplicate"]))
        pos = draw(st.integers(0, len(text)))
        if op == "truncate":
            text = text[:pos]
        elif op == "insert":
            text = text[:pos] + draw(st.sampled_from(TOKENS)) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 40)):]
        elif op == "bytes":
            text = text[:pos] + draw(st.text(max_size=12)) + text[pos:]
        elif op == "brackets":
            text = text[:pos] + draw(st.text(alphabet="{}()[]<>\"'", min_size=1, max_size=6)) + text[pos:]
        else:
            end = min(len(text), pos + draw(st.integers(1, 200)))
            text = text[:pos] + text[pos:end] + text[pos:]
    return text


def _front_end(source: str) -> None:
    try:
        fe.check_source(source)
    except SyntaxError as e:
        assert isinstance(e, SyntaxError) and str(e)


def fuzz_settings(max_examples, deadline_ms):
    # the deadline is what "never hangs" means here: generous, the machine may be loaded
    return settings(max_examples=EXAMPLES or max_examples, deadline=deadline_ms, derandomize=not RANDOM,
                    database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@fuzz_settings(400, 5000)
@given(malformed())
def test_fuzz_front_end_never_crashes(source):
    _front_end(source)


@fuzz_settings(25, 30000)
@given(malformed())
def test_fuzz_with_the_preprocessor(source):
    """Through the host preprocessor and the front end, without compiling."""
    try:
        _compiler.build_source(source, False)
    except SyntaxError as e:
        assert str(e)


ATTACK = ["#", "%:", "include", " ", "\t", "\f", "\v", '"/etc/passwd"', "</etc/passwd>", "\\\n", "/*", "*/", "//",
          "\n", "\r", "\0", '"', "'", 'R"(', ')"', "#define H #\n", "H ", "ID(#) ", "ID(%:) ", "#define ID(x) x\n",
          "#define P(a, b) a##b\n", "P(_Pra, gma)", "P(__has_incl, ude)", '("/etc/passwd")',
          '("GCC dependency \\"/etc/passwd\\"")', "_Pragma", "include_next", "import", "#if 0\n", "#endif\n",
          "#if 1\n", "<c10/metal/", "../../../../../../etc/passwd>", 'line 1 "x"', "\ufeff", "x", "1'2", "u8",
          "#pragma ", "GCC dependency ", "once", KERNEL]


@st.composite
def include_attack(draw):
    return "".join(draw(st.lists(st.sampled_from(ATTACK), min_size=1, max_size=14)))


def _opened_headers(text: str, parse_mode: bool) -> tuple[int, list[str], str]:
    """Run the host preprocessor as the compiler driver does, with -H: (status, headers it
    opened, output + diagnostics)."""
    cmd = [_compiler.compiler()[-1], "-E", "-H", *_compiler.COMMON_FLAGS, *(["-DMPSX_PARSE=1"] if parse_mode else []),
           f"-I{_compiler.INCLUDE_DIR}", "-"]
    r = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=120)
    heads = [ln.lstrip(".").strip() for ln in r.stderr.splitlines() if ln.startswith(". ") or ln.startswith(".. ")
             or ln.startswith("...")]
    return r.returncode, heads, r.stdout + r.stderr


_SHIM_HEADERS: list = []


@fuzz_settings(30, 60000)
@given(include_attack())
def test_fuzz_preprocessor_opens_no_other_file(source):
    """Whatever the source, neither preprocessing pass opens a file the front end did not allow
    (here: none but the backend's own headers), and no /etc/passwd content shows."""
    try:
        embedded = fe.embed(source)
    except SyntaxError:
        return
    rc, heads, out = _opened_headers(embedded, True)
    assert heads == [], heads
    assert PASSWD_LINE not in out
    if rc != 0:
        return
    try:
        parsed = fe.parse(_compiler.preprocess(embedded, source))
        kernels = fe.analyze(parsed)
        body, swizzles = fe.rewrite(parsed, False)
    except SyntaxError:
        return
    cpp = fe.swizzle_macros(swizzles) + '#include "mpsx_metal.h"\n' + body + fe.generate(kernels, False)
    if not _SHIM_HEADERS:  # the shim's headers; stdc-predef.h: named by a line marker of the first pass
        _SHIM_HEADERS.append(set(_opened_headers('#include "mpsx_metal.h"\n', False)[1]) |
                             {"/usr/include/stdc-predef.h"})
    _, heads2, out2 = _opened_headers(cpp, False)
    assert set(heads2) <= _SHIM_HEADERS[0], set(heads2) - _SHIM_HEADERS[0]
    assert PASSWD_LINE not in out2


def test_fuzz_corpus_is_valid():
    for s in CORPUS:
        fe.check_source(s)


def test_malformed_regressions():
    # inputs that once escaped as other exceptions or took unbounded time
    for s in ['kernel void k(device float* o [[buffer(9**9**9**9)]]) {}',
              'template [[host_name("\\x")]] kernel void k<float>(device float*);',
              "kernel void k(device float* o) { threadgroup float t[1<<4000]; }",
              "kernel void", "kernel void k(", "template <", "[[", "namespace {", "}" * 5, "\0" * 10,
              "#include", "#include <", '#include "', "#", "%:", "\\", "#define X \\", "/*", "'", '"']:
        t0 = time.monotonic()
        try:
            fe.check_source(s)
        except SyntaxError:
            pass
        assert time.monotonic() - t0 < 5, s
