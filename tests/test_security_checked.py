"""Checked mode that checks (issue 17 item 4, docs/shaders.md "Checked mode").

With TORCH_MPS_EXT_SHADER_CHECKED=1 every device-pointer access of a kernel is bounds-checked
against the extent of the argument it derives from -- through pointer arithmetic, helper
functions (nested), `&p[i]`, casts, references turned back into pointers, atomics and the
tensors of a list -- and an access outside it is reported at synchronize() as
torch.AcceleratorError naming the kernel, the argument and the element, with the neighbouring
memory untouched.  The attack of the issue (a helper writing 1,024 elements past the end of
its argument, reached by pointer arithmetic) runs in a fresh interpreter, unchecked first (it
does overwrite the neighbour: the test can fail) and then checked.  Kernels that are correct
give bit-equal results in both modes, threadgroup memory included.
"""

import textwrap
import warnings

import pytest
import torch

import torch_mps_ext  # noqa: F401  (registers the mps_ext device)
from conftest import run_python

DEV = "mps_ext"
CHECKED = "TORCH_MPS_EXT_SHADER_CHECKED"
OOB = r"out-of-bounds access in kernel '{k}': argument '{a}' accessed element {e}, but the buffer bound to it " \
      r"holds elements \[{lo}, {hi}\)"


@pytest.fixture(scope="module", autouse=True)
def private_cache(private_shader_cache):
    return private_shader_cache


@pytest.fixture
def checked(monkeypatch):
    monkeypatch.setenv(CHECKED, "1")


def compile_src(text: str):
    return torch.mps_ext.compile_shader(textwrap.dedent(text))


def sync():
    torch.mps_ext.synchronize()


def raises_oob(kernel: str, arg: str, elem: int, lo: int, hi: int) -> None:
    with pytest.raises(torch.AcceleratorError, match=OOB.format(k=kernel, a=arg, e=elem, lo=lo, hi=hi)):
        sync()
    # the device keeps working after the report
    assert (torch.ones(2, device=DEV) + 1).cpu().tolist() == [2.0, 2.0]


def guarded(n: int, pad: int = 1024, seed: int = 0):
    """An n-element tensor followed by a random neighbour in the same storage."""
    base = torch.rand(n + pad, generator=torch.Generator().manual_seed(seed)).to(DEV)
    return base[:n], base[n:], base[n:].cpu().numpy().tobytes()


ATTACK = r'''
import os, torch, torch_mps_ext
SRC = """
#include <metal_stdlib>
using namespace metal;
// a helper writing n elements from p: reached with a pointer 1024 elements past the end
void fill(device float* p, uint n, float v) { for (uint i = 0; i < n; ++i) p[i] = v; }
kernel void attack(device float* out [[buffer(0)]], constant uint& n [[buffer(1)]],
                   uint idx [[thread_position_in_grid]]) {
  if (idx == 0) fill(out + n, 1024, 7.0f);
}
"""
def run():
    lib = torch.mps_ext.compile_shader(SRC)
    base = torch.rand(2048, generator=torch.Generator().manual_seed(1)).to("mps_ext")
    out, neighbour = base[:1024], base[1024:]
    before = neighbour.cpu().numpy().tobytes()
    lib.attack(out, 1024, threads=1)
    try:
        torch.mps_ext.synchronize()
        print("NO ERROR")
    except torch.AcceleratorError as e:
        print("ERR", e)
    print("NEIGHBOUR", "unchanged" if neighbour.cpu().numpy().tobytes() == before else "overwritten")
os.environ.pop("TORCH_MPS_EXT_SHADER_CHECKED", None)
run()
os.environ["TORCH_MPS_EXT_SHADER_CHECKED"] = "1"
run()
x = torch.zeros(3, device="mps_ext")
print("STILL WORKS", (x + 1).cpu().tolist())
'''


def test_attack_pointer_arithmetic_into_a_helper():
    proc = run_python(ATTACK, env={CHECKED: None})
    lines = proc.stdout.splitlines()
    # unchecked: the helper overwrites the neighbour (what checked mode is for)
    assert lines[0:2] == ["NO ERROR", "NEIGHBOUR overwritten"], proc.stdout
    # checked: reported with kernel, argument and element; the neighbour keeps its bytes
    assert lines[2] == ("ERR out-of-bounds access in kernel 'attack': argument 'out' accessed element "
                        "1024, but the buffer bound to it holds elements [0, 1024)"), proc.stdout
    assert lines[3] == "NEIGHBOUR unchanged", proc.stdout
    assert lines[4] == "STILL WORKS [1.0, 1.0, 1.0]", proc.stdout


def test_helper_that_reads(checked):
    lib = compile_src("""
        #include <metal_stdlib>
        using namespace metal;
        template <typename T> T sum(device const T* p, uint n) {
          T s = 0;
          for (uint i = 0; i < n; ++i) s += p[i];
          return s;
        }
        kernel void window(device float* out, device const float* inp, constant uint& w,
                           uint i [[thread_position_in_grid]]) {
          out[i] = sum(inp + i, w);
        }
    """)
    inp = torch.arange(8.0, device=DEV)
    out = torch.zeros(6, device=DEV)
    lib.window(out, inp, 3)
    sync()
    assert out.cpu().tolist() == [3.0, 6.0, 9.0, 12.0, 15.0, 18.0]
    lib.window(out, inp, 4)  # the last thread reads inp[5 + 3] = inp[8]
    raises_oob("window", "inp", 8, 0, 8)


def test_nested_helpers_and_address_of_element(checked):
    lib = compile_src("""
        #include <metal_stdlib>
        using namespace metal;
        void put(device float* q, int k, float v) { q[k] = v; }
        void middle(device float* row, int k, float v) { put(row + 4, k - 4, v); }
        device float* at(device float* base, int k) { return base + k; }
        kernel void nested(device float* out [[buffer(0)]], constant int& k [[buffer(1)]],
                           uint i [[thread_position_in_grid]]) {
          if (i != 0) return;
          device float* r = &out[2];       // an element's address keeps the bounds
          middle(r - 2, k, 1.0f);
          *at(out, k + 1) = 2.0f;
        }
    """)
    out, neighbour, before = guarded(16)
    lib.nested(out, 5, threads=1)
    sync()
    assert out.cpu()[5:7].tolist() == [1.0, 2.0]
    lib.nested(out, 16, threads=1)  # middle() writes out[16], then at() gives out + 17
    raises_oob("nested", "out", 16, 0, 16)
    assert neighbour.cpu().numpy().tobytes() == before


def test_device_references(checked):
    lib = compile_src("""
        #include <metal_stdlib>
        using namespace metal;
        void bump(device float& x, float v) { x += v; }
        kernel void refs(device float* out [[buffer(0)]], device float& total [[buffer(1)]],
                         constant int& k [[buffer(2)]], uint i [[thread_position_in_grid]]) {
          if (i != 0) return;
          bump(out[k], 1.0f);               // checked where the reference is formed
          device float* t = &total;         // a reference's address: the argument's bounds
          t[k - 3] = 5.0f;
        }
    """)
    out, neighbour, before = guarded(4)
    total, tn, tbefore = guarded(1, pad=8, seed=1)
    lib.refs(out, total, 3, threads=1)
    sync()
    assert total.cpu().tolist() == [5.0]
    lib.refs(out, total, 4, threads=1)  # out[4], then total's element 1
    raises_oob("refs", "out", 4, 0, 4)
    assert neighbour.cpu().numpy().tobytes() == before
    lib.refs(out, total, 2, threads=1)  # out[2] is fine; total[-1] is not
    raises_oob("refs", "total", -1, 0, 1)
    assert tn.cpu().numpy().tobytes() == tbefore


def test_casts_atomics_and_list_entries(checked):
    lib = compile_src("""
        #include <metal_stdlib>
        using namespace metal;
        kernel void vec4(device float* out, constant uint& n, uint i [[thread_position_in_grid]]) {
          if (i == 0) reinterpret_cast<device float4*>(out)[n] = float4(1.0f);
        }
        kernel void count(device atomic_int* bins, constant uint& n, uint i [[thread_position_in_grid]]) {
          atomic_fetch_add_explicit(bins + (i % n), 1, memory_order_relaxed);
        }
        kernel void scatter(constant float* const* srcs [[buffer(0)]], constant uint& k [[buffer(1)]],
                            uint i [[thread_position_in_grid]]) {
          device float* dst = (device float*)srcs[1];   // a pointer read from the list
          if (i == 0) dst[k] = 9.0f;
        }
    """)
    out, neighbour, before = guarded(8)
    lib.vec4(out, 1, threads=1)
    sync()
    assert out.cpu()[4:].tolist() == [1.0] * 4
    lib.vec4(out, 2, threads=1)  # float4 elements: the buffer holds [0, 2)
    raises_oob("vec4", "out", 2, 0, 2)
    assert neighbour.cpu().numpy().tobytes() == before

    bins, bneighbour, bbefore = guarded(4)
    bins = bins.view(torch.int32).zero_()
    lib.count(bins, 4, threads=64)
    sync()
    assert bins.cpu().tolist() == [16] * 4
    lib.count(bins, 5, threads=64)
    raises_oob("count", "bins", 4, 0, 4)
    assert bneighbour.cpu().numpy().tobytes() == bbefore

    a = torch.zeros(4, device=DEV)
    b, bn, bb = guarded(4)
    lib.scatter([a, b], 3, threads=1)
    sync()
    assert b.cpu()[3].item() == 9.0
    lib.scatter([a, b], 4, threads=1)
    raises_oob("scatter", r"srcs\[1\]", 4, 0, 4)
    assert bn.cpu().numpy().tobytes() == bb


def test_pointer_into_no_buffer_and_null(checked):
    lib = compile_src("""
        #include <metal_stdlib>
        using namespace metal;
        kernel void stray(device float* out, constant ulong& addr, uint i [[thread_position_in_grid]]) {
          device float* p = (device float*)addr;
          if (i == 0) p[0] = 1.0f;
        }
    """)
    out = torch.zeros(4, device=DEV)
    other = torch.zeros(4, device=DEV)
    lib.stray(out, other.data_ptr(), threads=1)  # a tensor that was not passed to the kernel
    with pytest.raises(torch.AcceleratorError, match=r"out-of-bounds access in kernel 'stray': a device "
                       r"pointer that points into none of the buffers bound to the kernel was dereferenced"):
        sync()
    assert other.cpu().tolist() == [0.0] * 4
    lib.stray(out, 0, threads=1)
    with pytest.raises(torch.AcceleratorError, match=r"kernel 'stray': a null device pointer was dereferenced"):
        sync()


CORRECT = """
#include <metal_stdlib>
#include <c10/metal/utils.h>
#include <c10/metal/atomic.h>
using namespace metal;

// no a * b + c: the host compiler may contract it into a fused multiply-add in one build and
// not in the other (the checks change what is vectorized), a last-bit difference
float mix3(device const float* a, device const float* b) { return (a[0] - b[0]) + 2.0f * (a[1] - b[1]) + a[2] / b[2]; }
void store(device float* o, float v) { *o = v; }

kernel void rows(device float* out, device const float* m, device const float* v,
                 uint i [[thread_position_in_grid]]) {
  store(&out[i], mix3(m + 3 * i, v));
}

// threadgroup memory through a helper: untouched by checked mode (not a device pointer)
float tg_sum(threadgroup float* s, uint n) { float a = 0; for (uint k = 0; k < n; ++k) a += s[k]; return a; }
kernel void groups(device float* out, constant float4* x, uint i [[thread_position_in_grid]],
                   uint lid [[thread_position_in_threadgroup]], uint gid [[threadgroup_position_in_grid]]) {
  threadgroup float shared[64];
  float4 v = x[i];
  shared[lid] = simd_sum(v.x - v.y + v.z - v.w);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lid == 0) out[gid] = tg_sum(shared, 64);
}

kernel void hist(device atomic<uint>* bins, device const float* x, uint i [[thread_position_in_grid]]) {
  c10::metal::AtomicType<float>::atomic_add(reinterpret_cast<device atomic<float>*>(bins), 0, x[i]);
  atomic_fetch_add_explicit(bins + 1 + (i % 3), 1u, memory_order_relaxed);
}
"""


def _run_correct():
    lib = compile_src(CORRECT)
    g = torch.Generator().manual_seed(0)
    m, v = torch.randn(64, 3, generator=g), torch.randn(3, generator=g)
    x = torch.randn(256, 4, generator=g)
    rows = torch.zeros(64, device=DEV)
    lib.rows(rows, m.to(DEV), v.to(DEV))
    groups = torch.zeros(4, device=DEV)
    lib.groups(groups, x.to(DEV), threads=256, group_size=64)
    bins = torch.zeros(4, dtype=torch.int32, device=DEV)
    lib.hist(bins, torch.ones(30, device=DEV), threads=30, group_size=1)
    sync()
    return [t.cpu().numpy().tobytes() for t in (rows, groups, bins)], lib


def test_correct_kernels_are_bit_equal_in_both_modes(monkeypatch):
    monkeypatch.delenv(CHECKED, raising=False)
    plain, lib_plain = _run_correct()
    monkeypatch.setenv(CHECKED, "1")
    with warnings.catch_warnings():
        # instrumented as written (torch's atomics included): no fallback to unchecked
        warnings.simplefilter("error")
        with_checks, lib_checked = _run_correct()
    assert not lib_plain._checked and lib_checked._checked  # two different builds
    assert with_checks == plain
    bins = torch.frombuffer(bytearray(plain[2]), dtype=torch.int32)
    assert bins[1:].tolist() == [10, 10, 10] and bins[0].view(torch.float32).item() == 30.0


def test_source_that_cannot_be_instrumented_runs_unchecked_with_a_warning(checked):
    # `device float *a, *b;`: the second declarator stays a raw pointer, and a checked pointer
    # does not convert to one implicitly -- the source is compiled unchecked, with a warning
    src = """
        kernel void two(device float* out, uint i [[thread_position_in_grid]]) {
          device float *a = out, *b = out;
          a[i] = 1.0f; b[i] += 1.0f;
        }
    """
    with pytest.warns(UserWarning, match=r"^TORCH_MPS_EXT_SHADER_CHECKED: this shader cannot be instrumented "
                      r"with bounds checks; running it unchecked\."):
        lib = compile_src(src)
    assert not lib._checked
    out = torch.zeros(4, device=DEV)
    lib.two(out)
    sync()
    assert out.cpu().tolist() == [2.0] * 4


def test_source_with_an_error_is_a_syntax_error_without_the_warning(checked, recwarn):
    with pytest.raises(SyntaxError, match=r"Failed to compile shader"):
        compile_src("kernel void bad(device float* out, uint i [[thread_position_in_grid]]) { out[i] = nope; }")
    assert not [w for w in recwarn if "cannot be instrumented" in str(w.message)]
