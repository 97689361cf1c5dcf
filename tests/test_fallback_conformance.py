"""Regression tests for the fallback bugs the OpInfo sweep found (fast; the
sweep itself is tests/test_opinfo.py)."""

import torch
import torch_mps_ext  # noqa: F401
import torch.nn.functional as F

DEV = "mps_ext"


def test_conj_and_neg_views_copy_both_ways():
    # _copy_from went through the conjugate fallback, which cloned on the
    # device, which copied through _copy_from: infinite recursion.
    a = torch.randn(3, 4, dtype=torch.complex64)
    d = a.to(DEV)
    assert torch.equal(d.conj().cpu(), a.conj().resolve_conj())
    assert torch.equal(d.t().conj().cpu(), a.t().conj().resolve_conj())
    assert torch.equal(a.conj().to(DEV).cpu(), a.conj().resolve_conj())
    r = torch.randn(5)
    assert torch.equal(r.to(DEV)._neg_view().cpu(), -r)
    assert torch.equal(r._neg_view().to(DEV).cpu(), -r)


def test_negative_view_copied_into_another_dtype_keeps_its_sign():
    # CPU's dense float32<->float16 conversion copy ignores the negative bit
    # (torch 2.13, the CPU bug test_mps.py's test_neg_bit guards MPS against):
    # every copy to, from and on the device converts the resolved values.
    v = torch.randn(4, 4)
    for layout in (lambda t: t, lambda t: t.T):
        for src, want in ((v, -v), (v.half(), -v.half()), (v.bfloat16(), -v.bfloat16())):
            for dtype in (torch.float16, torch.float32, torch.int32):
                expected = layout(want).to(dtype)
                host = torch.empty(4, 4, dtype=dtype)
                host.copy_(layout(src.to(DEV))._neg_view())  # device -> CPU
                on_dev = torch.empty(4, 4, dtype=dtype, device=DEV)
                on_dev.copy_(layout(src.to(DEV))._neg_view())  # device -> device
                up = torch.empty(4, 4, dtype=dtype, device=DEV)
                up.copy_(layout(src)._neg_view())  # CPU -> device
                assert torch.equal(host, expected)
                assert torch.equal(on_dev.cpu(), expected)
                assert torch.equal(up.cpu(), expected)


def test_convolution_forward_and_backward_run_cpu_kernels():
    # convolution_overrideable / convolution_backward_overrideable have no
    # CPU kernel: the fallback runs convolution / convolution_backward.
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    xd, wd, bd = (t.detach().to(DEV).requires_grad_() for t in (x, w, b))
    y = F.conv2d(x, w, b, stride=2, padding=1)
    yd = F.conv2d(xd, wd, bd, stride=2, padding=1)
    assert yd.device.type == DEV
    assert torch.equal(yd.cpu(), y)
    g = torch.randn_like(y)
    y.backward(g)
    yd.backward(g.to(DEV))
    for t, td in ((x, xd), (w, wd), (b, bd)):
        assert td.grad.device.type == DEV
        torch.testing.assert_close(td.grad.cpu(), t.grad)
    wt = torch.randn(3, 2, 3, 3)
    torch.testing.assert_close(
        F.conv_transpose2d(xd.detach(), wt.to(DEV), stride=2).cpu(),
        F.conv_transpose2d(x.detach(), wt, stride=2))


def test_grouped_complex_convolution():
    # Its CPU kernel frees a raw_allocate()d scratch buffer through the CPU
    # allocator's raw_deleter: lent pool memory must go back to the pool
    # (was "free(): invalid pointer").
    x = torch.randn(2, 4, 8, 8, dtype=torch.complex64)
    w = torch.randn(2, 2, 3, 3, dtype=torch.complex64)
    kw = dict(stride=(3, 2), padding=(2, 1), groups=2, dilation=(4, 4))
    torch.testing.assert_close(F.conv2d(x.to(DEV), w.to(DEV), **kw).cpu(),
                               F.conv2d(x, w, **kw))


def test_ops_with_cpu_and_composite_kernels_match_cpu_bitwise():
    # native_layer_norm has a CompositeExplicitAutograd kernel, which won over
    # the fallback and computed rstd with other rounding than CPU's kernel.
    torch.manual_seed(0)
    x, w, b = torch.randn(1) * 5, torch.randn(1), torch.randn(1)
    y = F.layer_norm(x, (1,), w, b)
    yd = F.layer_norm(x.to(DEV), (1,), w.to(DEV), b.to(DEV))
    assert torch.equal(yd.cpu(), y)
    x = torch.randn(2, 4, 5)
    assert torch.equal(F.group_norm(x.to(DEV), 2).cpu(), F.group_norm(x, 2))


def test_composite_kernel_calling_a_cpu_stub():
    # conj_physical_'s CompositeExplicitAutograd kernel calls a DispatchStub
    # ("missing kernel for mps_ext"): it runs on host views instead.
    a = torch.randn(6, dtype=torch.complex64)
    d = a.to(DEV)
    assert d.conj_physical_() is d
    assert torch.equal(d.cpu(), a.conj())


def test_out_argument_math_bits_are_written_back():
    # linalg_lu_solve(left=False, out=) leaves `out` a conjugate view on CPU;
    # the fallback wrote back sizes and strides but not the conj bit.
    torch.manual_seed(0)
    A = torch.randn(3, 3, dtype=torch.complex64)
    B = torch.randn(4, 3, dtype=torch.complex64)
    LU, piv = torch.linalg.lu_factor(A)
    out = torch.empty(4, 3, dtype=torch.complex64)
    torch.linalg.lu_solve(LU, piv, B, left=False, out=out)
    dout = torch.empty(4, 3, dtype=torch.complex64, device=DEV)
    torch.linalg.lu_solve(LU.to(DEV), piv.to(DEV), B.to(DEV), left=False, out=dout)
    assert dout.is_conj() == out.is_conj()
    torch.testing.assert_close(dout.cpu(), out)


def test_index_lists_with_none_and_device_checking_out_overloads():
    # x[:, idx, :, idx] passes a Tensor?[] with None entries (read as
    # undefined tensors: "tensor does not have a device").
    x = torch.randn(5, 5, 5, 5)
    assert torch.equal(x.to(DEV)[:, (0, 1), :, (0, 1)].cpu(), x[:, (0, 1), :, (0, 1)])
    # mode.values checks for CPU/CUDA/XPU itself: runs on host views.
    y = torch.randn(300)
    v = torch.empty(0, device=DEV)
    i = torch.empty(0, dtype=torch.long, device=DEV)
    torch.mode(y.to(DEV), out=(v, i))
    assert torch.equal(v.cpu(), torch.mode(y).values)
