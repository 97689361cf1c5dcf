"""Issue 17's crash findings, each in a fresh interpreter: bad grids, bad
argument kinds, expanded outputs and faulting kernels end in a clear Python
exception or a device error at synchronize(), never a dead process; waits
for device work answer Ctrl-C; the watchdog stops a runaway kernel; bad
memory fractions are refused."""

import pytest
import torch

from conftest import run_python

KERNELS = '''
import torch, torch_mps_ext
lib = torch.mps_ext.compile_shader("""
kernel void full(device float* out, constant float& val, uint idx [[thread_position_in_grid]]) {
  if (idx < 4) out[idx] = val;
}
kernel void nul(device float* out, uint idx [[thread_position_in_grid]]) {
  device float* p = nullptr;
  if (idx == 0) p[1 << 20] = out[0];
}
kernel void spin(device float* out, constant long& spins, uint i [[thread_position_in_grid]]) {
  float acc = 0.0f;
  for (long k = 0; k < spins; ++k) acc += metal::precise::sin(float(k) * 1e-3f);
  out[i] = acc;
}
""")
x = torch.zeros(4, device="mps_ext")
def still_works():
    lib.full(x, 3.0)
    torch.mps_ext.synchronize()
    assert x.cpu().tolist() == [3.0] * 4
    assert (torch.ones(3, device="mps_ext") * 2).cpu().tolist() == [2.0] * 3
    print("STILL WORKS")
'''


def _caught(statement, exc):
    """Body that runs `statement`, prints `ERR <message>` for `exc`, then checks
    the device still works."""
    return f"""
try:
    {statement}
except {exc} as e:
    print("ERR", e)
still_works()"""


def _run(body, env=None, timeout=300):
    proc = run_python(KERNELS + body, env=env, check=False, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STILL WORKS" in proc.stdout, proc.stdout
    return proc.stdout


def test_largest_1d_grid_runs_without_arithmetic_fault():
    _run("lib.full(x, 1.0, threads=2**32 - 1)\ntorch.mps_ext.synchronize()\nstill_works()")


@pytest.mark.parametrize("arg", ["1.5", "[1.0, 2.0]", "torch.tensor(1.5)"])
def test_number_bound_to_device_pointer_is_a_type_error(arg):
    out = _run(_caught(f"lib.full({arg}, 1.0, threads=4)", "TypeError"))
    assert ("ERR kernel 'full': argument 0 ('out') is a device pointer (device float*); pass an "
            "mps_ext tensor, not a number or a list") in out


def test_expanded_output_is_refused():
    out = _run(_caught('lib.full(torch.zeros(1, device="mps_ext").expand(4), 1.0)', "ValueError"))
    assert "ERR kernel 'full': argument 0 ('out') is written through, but the tensor's" in out


def test_error_buf_idx_out_of_range_is_refused():
    out = _run(_caught("lib.full(x, 1.0, error_buf_idx=7)", "ValueError"))
    assert "ERR error_buf_idx=7 is not a buffer index of kernel 'full' (its buffers: [0, 1])" in out


def test_null_dereference_is_a_device_error():
    out = _run("lib.nul(x)" + _caught("torch.mps_ext.synchronize()", "torch.AcceleratorError"))
    assert "ERR kernel 'nul' faulted: SIGSEGV (invalid memory access) at address" in out
    assert "the launch was abandoned" in out


def test_watchdog_stops_a_runaway_kernel():
    out = _run("""
import time
t0 = time.time()
lib.spin(x, 10**13, threads=1)
try:
    torch.mps_ext.synchronize()
except torch.AcceleratorError as e:
    print("ERR", e, round(time.time() - t0))
still_works()""", env={"TORCH_MPS_EXT_KERNEL_TIMEOUT_S": "1"})
    assert ("ERR kernel 'spin' faulted: ran longer than TORCH_MPS_EXT_KERNEL_TIMEOUT_S=1 and was "
            "stopped") in out


@pytest.mark.parametrize("wait", ["torch.mps_ext.synchronize()",
                                  "torch.mps_ext.current_stream().synchronize()",
                                  "ev.synchronize()"])
def test_waits_answer_ctrl_c(wait):
    # A kernel that runs for minutes; SIGINT after 0.5 s must interrupt the
    # wait within about a second (the kernel itself runs on).
    out = _run(f"""
import os, signal, threading, time
# Python leaves SIGINT ignored when it starts with it ignored (a background
# job of a non-interactive shell): Ctrl-C's handler, as in a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)
lib.spin(x, 10**13, threads=1)
ev = torch.mps_ext.Event()
ev.record()
threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
t0 = time.time()
try:
    {wait}
except KeyboardInterrupt:
    print("INTERRUPTED", time.time() - t0 < 3)
print("STILL WORKS")
os._exit(0)  # the runaway kernel is still on its stream
""", env={"TORCH_MPS_EXT_KERNEL_TIMEOUT_S": None})
    assert "INTERRUPTED True" in out


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, 2.5])
def test_memory_fraction_refuses_nan_inf_and_out_of_range(bad):
    before = torch.mps_ext.get_per_process_memory_fraction()
    with pytest.raises(ValueError, match=r"^Invalid fraction value: .*\. Allowed range: 0~2$"):
        torch.mps_ext.set_per_process_memory_fraction(bad)
    assert torch.mps_ext.get_per_process_memory_fraction() == before


def test_fiber_stack_is_sized_from_the_kernels_frame():
    # 384 KiB of private memory under a barrier: more than the default 256 KiB
    # fiber stack. The compiler's frame sizes (-fstack-usage) size the stacks
    # of the library's fibers, so the kernel runs; a kernel needing more than
    # the limit is refused before it is launched, saying what it needs.
    out = _run('''
big = torch.mps_ext.compile_shader("""
#include <metal_stdlib>
using namespace metal;
kernel void big(device float* out, uint i [[thread_position_in_grid]]) {
  float a[96 * 1024];
  for (int k = 0; k < 96 * 1024; ++k) a[k] = float(k + i);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = a[(i * 7919) % (96 * 1024)];
}
kernel void huge(device float* out, uint i [[thread_position_in_grid]]) {
  float a[1536 * 1024];
  for (int k = 0; k < 1536 * 1024; ++k) a[k] = float(k + i);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = a[(i * 7919) % (1536 * 1024)];
}
""")
y = torch.zeros(8, device="mps_ext")
big.big(y, threads=8, group_size=8)
torch.mps_ext.synchronize()
print("BIG", y.cpu().tolist() == [float((i * 7919) % (96 * 1024) + i) for i in range(8)])
y.zero_()
try:
    big.huge(y, threads=8, group_size=8)
except RuntimeError as e:
    print("ERR", e)
torch.mps_ext.synchronize()
print("UNTOUCHED", y.cpu().tolist() == [0.0] * 8)
still_works()''')
    assert "BIG True" in out
    assert ("ERR kernel 'huge' needs 6.0 MiB of stack per thread (its private arrays and the functions "
            "it calls, as measured by the compiler), more than the 4 MiB limit for a thread of a kernel "
            "that synchronizes (threadgroup_barrier, simd-group functions); keep large arrays in "
            "threadgroup or device memory") in out
    assert "UNTOUCHED True" in out


def test_fiber_stack_overflow_is_a_device_error():
    # Recursion (which Metal forbids, so no frame size bounds it) overflows the
    # fiber's stack: the guard page below each used stack turns the overflow
    # into a device error instead of a write into the neighbouring fiber's stack.
    out = _run('''
deep = torch.mps_ext.compile_shader("""
#include <metal_stdlib>
using namespace metal;
float down(uint d) {
  volatile float pad[256];
  pad[d % 256] = float(d);
  return d == 0 ? 0.0f : down(d - 1) + pad[d % 256];
}
kernel void deep(device float* out, constant uint& depth, uint i [[thread_position_in_grid]]) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = down(depth);
}
""")
y = torch.zeros(8, device="mps_ext")
deep.deep(y, 100, threads=8, group_size=8)
torch.mps_ext.synchronize()
print("SHALLOW", y.cpu().tolist() == [5050.0] * 8)
deep.deep(y, 1 << 20, threads=8, group_size=8)
try:
    torch.mps_ext.synchronize()
except torch.AcceleratorError as e:
    print("ERR", e)
still_works()''')
    assert "SHALLOW True" in out
    assert "ERR kernel 'deep' faulted: SIGSEGV (invalid memory access)" in out
