"""Sparse COO and compressed (CSR/CSC/BSR) tensors on mps_ext: CPU's sparse
kernels run on host views of the members (csrc/aten/SparseFallback.cpp).
Every test runs the same thing on CPU and compares: layout, device, dtype,
values and (after coalesce) indices, gradients."""

import copy
import io

import pytest
import torch
import torch.nn as nn
from conftest import run_python

DEV = "mps_ext"
pytestmark = pytest.mark.filterwarnings(
    "ignore:Sparse CSR tensor support is in beta state",
    "ignore:Sparse invariant checks are implicitly disabled")

COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def _coo(dtype=torch.float32, device="cpu", size=(3, 4)):
    """A COO tensor with duplicate entries (uncoalesced)."""
    i = torch.tensor([[0, 2, 1, 0, 2], [1, 3, 0, 1, 0]])
    v = torch.tensor([1.5, -2.0, 3.0, 4.0, 0.5]).to(dtype)
    return torch.sparse_coo_tensor(i, v, size, device=device)


def _to_dev(x):
    return x.to(DEV) if isinstance(x, torch.Tensor) else x


def _check_same(got, ref, *, exact=False):
    """got (mps_ext) is what ref (CPU) is: layout, dtype, device, contents."""
    if isinstance(ref, (tuple, list)):
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            _check_same(g, r, exact=exact)
        return
    if not isinstance(ref, torch.Tensor):
        assert got == ref
        return
    assert got.device.type == DEV, got.device
    assert got.layout == ref.layout
    assert got.dtype == ref.dtype
    assert got.shape == ref.shape
    tol = dict(rtol=0, atol=0) if exact else {}
    if ref.layout == torch.sparse_coo:
        assert got.is_coalesced() == ref.is_coalesced()
        assert got.sparse_dim() == ref.sparse_dim() and got.dense_dim() == ref.dense_dim()
        g, r = got.coalesce(), ref.coalesce()
        assert torch.equal(g.indices().cpu(), r.indices())
        torch.testing.assert_close(g.values().cpu(), r.values(), **tol)
    elif ref.layout in COMPRESSED:
        members = {torch.sparse_csr: ("crow_indices", "col_indices"),
                   torch.sparse_bsr: ("crow_indices", "col_indices"),
                   torch.sparse_csc: ("ccol_indices", "row_indices"),
                   torch.sparse_bsc: ("ccol_indices", "row_indices")}[ref.layout]
        for m in members:
            assert torch.equal(getattr(got, m)().cpu(), getattr(ref, m)())
        torch.testing.assert_close(got.values().cpu(), ref.values(), **tol)
    else:
        torch.testing.assert_close(got.cpu(), ref, **tol)


def _same_on_both(fn, *args, exact=False):
    dev_args = [_to_dev(a) for a in args]  # before fn, which may write its arguments
    ref = fn(*args)
    got = fn(*dev_args)
    _check_same(got, ref, exact=exact)
    return got, ref


# --- creation and conversion ---------------------------------------------

def test_sparse_coo_tensor_on_device_keeps_its_members():
    i = torch.tensor([[0, 1, 1], [2, 0, 2]], device=DEV)
    v = torch.tensor([3.0, 4.0, 5.0], device=DEV)
    s = torch.sparse_coo_tensor(i, v, (2, 3))
    ref = torch.sparse_coo_tensor(i.cpu(), v.cpu(), (2, 3))
    _check_same(s, ref, exact=True)
    assert s.is_sparse and s.device == v.device
    # As on CPU, the tensor is built over the given indices and values.
    assert s._values().data_ptr() == v.data_ptr()
    assert s._indices().data_ptr() == i.data_ptr()
    v[0] = 10.0
    assert s.to_dense()[0, 2].item() == 10.0


def test_sparse_coo_tensor_factory_with_device_argument():
    s = torch.sparse_coo_tensor([[0, 1], [1, 0]], [1.0, 2.0], (2, 2), device=DEV)
    ref = torch.sparse_coo_tensor([[0, 1], [1, 0]], [1.0, 2.0], (2, 2))
    _check_same(s, ref, exact=True)
    assert s._indices().device.type == DEV and s._values().device.type == DEV
    empty = torch.sparse_coo_tensor(size=(4, 5), device=DEV)
    _check_same(empty, torch.sparse_coo_tensor(size=(4, 5)), exact=True)
    assert empty._nnz() == 0
    z = torch.zeros(3, 4, layout=torch.sparse_coo, device=DEV)
    _check_same(z, torch.zeros(3, 4, layout=torch.sparse_coo), exact=True)


def test_to_device_and_back_keeps_layout_and_flags():
    cpu = _coo()
    dev = cpu.to(DEV)
    _check_same(dev, cpu, exact=True)
    assert not dev.is_coalesced()
    back = dev.cpu()
    assert back.layout == torch.sparse_coo and back.device.type == "cpu"
    assert torch.equal(back._indices(), cpu._indices())
    assert torch.equal(back._values(), cpu._values())
    coalesced = cpu.coalesce().to(DEV)
    assert coalesced.is_coalesced()
    assert coalesced.to("cpu").is_coalesced()


def test_dense_to_sparse_and_back():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3)
    x[x.abs() < 0.7] = 0
    _same_on_both(lambda t: t.to_sparse(), x, exact=True)
    _same_on_both(lambda t: t.to_sparse(2), x, exact=True)
    _same_on_both(lambda t: t.to_sparse().to_dense(), x, exact=True)
    _same_on_both(lambda t: t[:, :, 0].to_sparse_csr(), x, exact=True)
    _same_on_both(lambda t: t[:, :, 0].to_sparse_csc(), x, exact=True)
    _same_on_both(lambda t: t[:, :4, 0].to_sparse_bsr((2, 2)), x, exact=True)
    _same_on_both(lambda t: t[:, :, 0].to_sparse_csr().to_dense(), x, exact=True)
    _same_on_both(lambda t: t.to_sparse().to_sparse_csr(), x[:, :, 0], exact=True)
    _same_on_both(lambda t: t.to_sparse_csr().to_sparse(), x[:, :, 0], exact=True)


def test_sparse_csr_tensor_on_device():
    crow = torch.tensor([0, 2, 2, 3])
    col = torch.tensor([0, 3, 1])
    val = torch.tensor([1.0, 2.0, 3.0])
    ref = torch.sparse_csr_tensor(crow, col, val, (3, 4))
    got = torch.sparse_csr_tensor(crow, col, val, (3, 4), device=DEV)
    _check_same(got, ref, exact=True)
    assert got.crow_indices().device.type == DEV
    torch.testing.assert_close(got.to_dense().cpu(), ref.to_dense())
    back = got.cpu()
    assert back.layout == torch.sparse_csr and back.device.type == "cpu"
    _check_same(ref.to(DEV), ref, exact=True)


def test_coalesce_and_members():
    cpu = _coo()
    dev = cpu.to(DEV)
    _same_on_both(lambda s: s.coalesce(), cpu, exact=True)
    _same_on_both(lambda s: s._indices(), cpu, exact=True)
    _same_on_both(lambda s: s._values(), cpu, exact=True)
    assert dev._nnz() == cpu._nnz() == 5
    assert dev.coalesce()._nnz() == cpu.coalesce()._nnz() == 4
    with pytest.raises(RuntimeError, match="Cannot get indices on an uncoalesced tensor"):
        dev.indices()
    # A kernel's result over an argument's members keeps them (unsqueeze
    # shares the values, as on CPU).
    for x in (cpu.coalesce(), dev.coalesce()):
        u = x.unsqueeze(0)
        assert u._values().data_ptr() == x._values().data_ptr(), x.device
        assert u.device == x.device
    # Members are views: writing one shows in the tensor, as on CPU.
    c = dev.coalesce()
    c.values().mul_(2)
    torch.testing.assert_close(c.to_dense().cpu(), cpu.to_dense() * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.bool,
                                   torch.complex64])
def test_dtypes(dtype):
    _same_on_both(lambda s: s.coalesce(), _coo(dtype), exact=True)
    _same_on_both(lambda s: s.to_dense(), _coo(dtype), exact=True)


def test_second_device():
    out = run_python("""
        import warnings
        import torch, torch_mps_ext
        warnings.simplefilter("ignore")
        i, v = torch.tensor([[0, 1, 1], [2, 0, 2]]), torch.tensor([3.0, 4.0, 5.0])
        cpu = torch.sparse_coo_tensor(i, v, (2, 3))
        made = torch.sparse_coo_tensor(i, v, (2, 3), device="mps_ext:1")
        moved = cpu.to("mps_ext:1")
        for t in (made, moved, moved * 2, moved.coalesce(), moved.to_sparse_csr()):
            members = (t._values(),) if t.is_sparse else (t.crow_indices(), t.values())
            print(t.device, *[m.device for m in members])
        print((moved * 2).to_dense().cpu().tolist())
    """, env={"TORCH_MPS_EXT_DEVICE_COUNT": "2"}).stdout.split("\n")
    for line in out[:5]:
        assert set(line.split()) == {"mps_ext:1"}, out
    assert out[5] == str((torch.tensor([[0, 0, 3.0], [4, 0, 5]]) * 2).tolist())


# --- elementwise, promotion, reductions, matmul -------------------------

def test_elementwise_ops():
    a = _coo()
    b = torch.sparse_coo_tensor([[1, 2, 0], [0, 3, 2]], [1.0, 2.0, -1.0], (3, 4))
    d = torch.randn(3, 4)
    _same_on_both(lambda x, y: x + y, a, b)
    _same_on_both(lambda x, y: torch.add(x, y, alpha=2), a, b)
    _same_on_both(lambda x, y: x - y, a, b)
    _same_on_both(lambda x, y: x * y, a, b)
    _same_on_both(lambda x, y: y + x, a, d)
    _same_on_both(lambda x, y: y.add_(x, alpha=3), a, d)
    _same_on_both(lambda x, y: x * y, a, d)
    _same_on_both(lambda x: x * 2.5, a)
    _same_on_both(lambda x: x / 4, a)
    _same_on_both(lambda x: -x, a)
    _same_on_both(lambda x: x.abs(), a)
    _same_on_both(lambda x: torch.sin(x), a)
    _same_on_both(lambda x: x.pow(2), a)
    csr = d.to_sparse_csr()
    _same_on_both(lambda x: x * 3, csr)
    _same_on_both(lambda x, y: x + y, csr, csr)


def test_sparse_resize():
    _same_on_both(lambda s: s.clone().sparse_resize_((5, 6), 2, 0), _coo(), exact=True)
    _same_on_both(lambda s: s.clone().sparse_resize_and_clear_((4, 4, 2), 2, 1), _coo(),
                  exact=True)
    _same_on_both(lambda s: torch.zeros_like(s), _coo(), exact=True)
    _same_on_both(lambda s: s.t().coalesce(), _coo(), exact=True)
    _same_on_both(lambda s: s.index_select(1, torch.tensor([3, 1]).to(s.device)), _coo(),
                  exact=True)
    _same_on_both(lambda s: torch.cat([s, s], dim=1), _coo(), exact=True)


def test_in_place_ops_write_the_callers_tensor():
    a, b = _coo(), _coo().coalesce() * 3
    da, db = a.to(DEV), b.to(DEV)
    out = da.add_(db)
    a.add_(b)
    assert out is da
    _check_same(da, a)
    da.mul_(2)
    a.mul_(2)
    _check_same(da, a)
    da.zero_()
    a.zero_()
    _check_same(da, a, exact=True)
    # copy_ between sparse tensors, across devices both ways.
    target = torch.sparse_coo_tensor(size=(3, 4), device=DEV)
    target.copy_(b)
    _check_same(target, b, exact=True)
    host = torch.sparse_coo_tensor(size=(3, 4))
    host.copy_(db)
    assert host.device.type == "cpu"
    assert torch.equal(host.to_dense(), b.to_dense())


def test_type_promotion():
    f = _coo(torch.float32)
    i = _coo(torch.int32)
    dbl = _coo(torch.float64)
    _same_on_both(lambda x, y: x + y, i, f)
    _same_on_both(lambda x, y: x * y, f, dbl)
    _same_on_both(lambda x: x * 2.5, i)
    _same_on_both(lambda x: x + x, i)
    _same_on_both(lambda x, y: y + x, i, torch.ones(3, 4, dtype=torch.float16))
    _same_on_both(lambda x: x.to(torch.float64), f)


def test_reductions():
    # Hybrid (a dense dimension), with duplicates.
    s = torch.sparse_coo_tensor([[0, 2, 1, 0], [1, 3, 0, 1]], torch.arange(8.0).reshape(4, 2),
                                (3, 4, 2))
    _same_on_both(lambda x: torch.sparse.sum(x), s)
    _same_on_both(lambda x: torch.sparse.sum(x, dim=0), s)
    _same_on_both(lambda x: torch.sparse.sum(x, dim=(0, 1)), s)
    _same_on_both(lambda x: x.sum(), s)
    _same_on_both(lambda x: x.sum(dim=1), s)
    _same_on_both(lambda x: torch.sparse.softmax(x, 1), s)
    _same_on_both(lambda x: torch.sparse.log_softmax(x, 0), s)


def test_matmul():
    torch.manual_seed(0)
    s = _coo()
    d = torch.randn(4, 5)
    bias = torch.randn(3, 5)
    _same_on_both(lambda x, y: x @ y, s, d)
    _same_on_both(lambda x, y: torch.sparse.mm(x, y), s, d)
    _same_on_both(lambda x, y: torch.mm(x, y), s, d)
    _same_on_both(lambda b, x, y: torch.addmm(b, x, y, beta=0.5, alpha=2), bias, s, d)
    _same_on_both(lambda b, x, y: torch.sparse.addmm(b, x, y), bias, s, d)
    _same_on_both(lambda x, y: x @ y.t(), s, s)  # sparse @ sparse -> sparse
    _same_on_both(lambda x, y: torch.mv(x, y), s, torch.randn(4))
    _same_on_both(lambda x, y: x @ y, s.to_dense().to_sparse_csr(), d)
    _same_on_both(lambda x, y: y @ x, s, torch.randn(5, 3))  # dense @ sparse
    mask = (torch.rand(3, 5) > 0.5).float().to_sparse_csr()
    _same_on_both(lambda m, a, b: torch.sparse.sampled_addmm(m, a, b, beta=0.5),
                  mask, torch.randn(3, 4), d)


# --- gradients -------------------------------------------------------------

def test_sparse_mm_backward():
    torch.manual_seed(0)
    grads = {}
    for device in ("cpu", DEV):
        s = _coo(device=device).coalesce().requires_grad_()
        d = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)).to(device)
        d.requires_grad_()
        out = torch.sparse.mm(s, d)
        (out * out).sum().backward()
        grads[device] = (s.grad, d.grad)
    (sg, dg), (rsg, rdg) = grads[DEV], grads["cpu"]
    assert sg.layout == torch.sparse_coo
    _check_same(sg, rsg)
    _check_same(dg, rdg)


def test_to_dense_and_values_backward():
    grads = {}
    for device in ("cpu", DEV):
        v = torch.tensor([1.0, 2.0, 3.0], device=device, requires_grad=True)
        s = torch.sparse_coo_tensor([[0, 1, 1], [2, 0, 2]], v, (2, 3))
        w = torch.arange(6.0, device=device).reshape(2, 3)
        (s.to_dense() * w).sum().backward()
        grads[device] = v.grad
    _check_same(grads[DEV], grads["cpu"])


def test_sparse_embedding_with_sparse_adam():
    torch.manual_seed(0)
    ref = nn.Embedding(10, 4, sparse=True)
    dev = copy.deepcopy(ref).to(DEV)
    opt_ref = torch.optim.SparseAdam(ref.parameters(), lr=0.1)
    opt_dev = torch.optim.SparseAdam(dev.parameters(), lr=0.1)
    for step in range(3):
        idx = torch.tensor([[1, 2, 4, 1], [4, 3, 8, 0]]) + step % 2
        for model, opt, where in ((ref, opt_ref, "cpu"), (dev, opt_dev, DEV)):
            opt.zero_grad()
            model(idx.to(where)).pow(2).sum().backward()
            opt.step()
        assert dev.weight.grad.layout == torch.sparse_coo
        _check_same(dev.weight.grad, ref.weight.grad)
    torch.testing.assert_close(dev.weight.detach().cpu(), ref.weight.detach())


def test_accumulated_sparse_grads():
    grads = {}
    for device in ("cpu", DEV):
        emb = nn.Embedding(6, 3, sparse=True).to(device)
        with torch.no_grad():
            emb.weight.copy_(torch.arange(18.0).reshape(6, 3))
        for idx in ([0, 2, 2], [5, 0]):
            emb(torch.tensor(idx, device=device)).sum().backward()
        grads[device] = emb.weight.grad
    _check_same(grads[DEV], grads["cpu"], exact=True)


# --- serialization, printing ---------------------------------------------

@pytest.mark.parametrize("make", [lambda: _coo(), lambda: _coo().coalesce(),
                                  lambda: torch.eye(3).to_sparse_csr()])
def test_save_and_load_round_trip(make):
    ref = make()
    buf = io.BytesIO()
    torch.save({"t": ref.to(DEV)}, buf)
    buf.seek(0)
    got = torch.load(buf)["t"]
    _check_same(got, ref, exact=True)
    buf.seek(0)
    on_cpu = torch.load(buf, map_location="cpu")["t"]
    assert on_cpu.device.type == "cpu" and on_cpu.layout == ref.layout


def test_load_onto_the_device_and_modules_with_sparse_buffers():
    ref = _coo().coalesce()
    buf = io.BytesIO()
    torch.save(ref, buf)
    buf.seek(0)
    _check_same(torch.load(buf, map_location=DEV), ref, exact=True)

    class Graph(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("adj", ref.clone())
            self.w = nn.Parameter(torch.arange(8.0).reshape(4, 2))

        def forward(self):
            return torch.sparse.mm(self.adj, self.w)

    cpu = Graph()
    dev = copy.deepcopy(cpu).to(DEV)
    _check_same(dev.adj, cpu.adj, exact=True)
    _check_same(dev(), cpu())
    _check_same(dev.state_dict()["adj"], cpu.state_dict()["adj"], exact=True)


def test_repr_and_deepcopy():
    dev = _coo().to(DEV)
    text = repr(dev)
    assert "layout=torch.sparse_coo" in text and "device='mps_ext:0'" in text
    clone = copy.deepcopy(dev)
    _check_same(clone, _coo(), exact=True)
    _check_same(dev.clone(), _coo(), exact=True)


# --- errors --------------------------------------------------------------

def test_unsupported_combinations_raise_cpus_error():
    dev, cpu = _coo().to(DEV), _coo()
    msg = r"add\(sparse, dense\) is not supported. Use add\(dense, sparse\) instead."
    for s, d in ((cpu, torch.ones(3, 4)), (dev, torch.ones(3, 4, device=DEV))):
        with pytest.raises(RuntimeError, match=msg):
            s + d


def test_mixed_devices_are_refused():
    dev, cpu = _coo().to(DEV), _coo()
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device, but "
                                           "found at least two devices, mps_ext:0 and cpu!"):
        dev + cpu
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        torch.sparse.mm(dev, torch.randn(4, 2))


def test_operator_without_a_cpu_sparse_kernel():
    dev, cpu = _coo().to(DEV), _coo()
    with pytest.raises(NotImplementedError, match="'aten::cumsum' with arguments from the "
                                                  "'SparseCPU' backend"):
        cpu.cumsum(0)
    with pytest.raises(NotImplementedError, match="'aten::cumsum' with arguments from the "
                                                  "'Sparsemps_ext' backend: CPU has no kernel "
                                                  "for this layout either"):
        dev.cumsum(0)
    csr = torch.eye(3, device=DEV).to_sparse_csr()
    with pytest.raises(NotImplementedError, match="'aten::cumsum' with arguments from the "
                                                  "'SparseCsrmps_ext' backend"):
        csr.cumsum(0)


def test_invalid_construction_is_refused_as_on_cpu():
    i = torch.tensor([[0, 5]])
    v = torch.tensor([1.0, 2.0])
    msg = r"size is inconsistent with indices: for dim 0, size is 3 but found index 5"
    with pytest.raises(RuntimeError, match=msg):
        torch.sparse_coo_tensor(i, v, (3,), check_invariants=True)
    with pytest.raises(RuntimeError, match=msg):
        torch.sparse_coo_tensor(i.to(DEV), v.to(DEV), (3,), check_invariants=True)
    crow, col, val = torch.tensor([0, 2, 1]), torch.tensor([0, 1]), torch.tensor([1.0, 2.0])
    for device in ("cpu", DEV):
        with pytest.raises(RuntimeError, match=r"`crow_indices\[\.\.\., -1\] == nnz` is not "
                                               "satisfied"):
            torch.sparse_csr_tensor(crow, col, val, (2, 2), check_invariants=True,
                                    device=device)
