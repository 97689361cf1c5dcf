"""Representative operators on mps_ext against CPU: same values, dtypes,
shapes and strides, and the same aliasing (views, in-place, out=)."""

import pytest
import torch
import torch.nn.functional as F

DEV = "mps_ext"


def _gen(seed=0):
    g = torch.Generator().manual_seed(seed)
    return g


def _inputs():
    g = _gen()
    return {
        "a": torch.randn(4, 5, generator=g),
        "b": torch.randn(4, 5, generator=g),
        "c": torch.randn(5, 3, generator=g),
        "v": torch.randn(5, generator=g),
        "i": torch.randint(-5, 6, (4, 5), generator=g),
        "img": torch.randn(2, 3, 8, 8, generator=g),
        "w": torch.randn(4, 3, 3, 3, generator=g),
        "idx": torch.tensor([0, 2, 3]),
        "mask": torch.randn(4, 5, generator=g) > 0,
        "h": torch.randn(4, 5, generator=g).half(),
        "z": torch.randn(4, 5, dtype=torch.complex64, generator=g),
    }


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(e, device) for e in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _assert_same(dev, cpu):
    if isinstance(cpu, torch.Tensor):
        assert isinstance(dev, torch.Tensor)
        assert dev.device.type == DEV, dev.device
        assert dev.dtype == cpu.dtype
        assert dev.shape == cpu.shape
        if cpu.is_contiguous() or dev.numel() > 1:
            assert dev.stride() == cpu.stride(), (dev.stride(), cpu.stride())
        torch.testing.assert_close(dev.cpu(), cpu, equal_nan=True)
    elif isinstance(cpu, (list, tuple)):
        assert len(dev) == len(cpu)
        for d, c in zip(dev, cpu):
            _assert_same(d, c)
    else:
        assert dev == cpu


OPS = {
    # elementwise and type promotion
    "add": lambda t: t["a"] + t["b"],
    "add_alpha": lambda t: torch.add(t["a"], t["b"], alpha=2.5),
    "sub_scalar": lambda t: t["a"] - 3,
    "mul_broadcast": lambda t: t["a"] * t["v"],
    "div_int_float": lambda t: t["i"] / 2,
    "floor_divide": lambda t: torch.floor_divide(t["i"], 3),
    "int_plus_float_tensor": lambda t: t["i"] + t["a"],
    "half_plus_float": lambda t: t["h"] + t["a"],
    "cpu_scalar_tensor": lambda t: t["a"] * torch.tensor(3.0),
    "pow": lambda t: t["a"].abs().pow(1.5),
    "exp_log": lambda t: t["a"].exp().log1p(),
    "sigmoid_tanh": lambda t: torch.sigmoid(t["a"]) + torch.tanh(t["b"]),
    "where": lambda t: torch.where(t["mask"], t["a"], t["b"]),
    "clamp": lambda t: t["a"].clamp(-0.5, 0.5),
    "comparison": lambda t: (t["a"] > t["b"]) & (t["i"] != 0),
    "complex_mul_conj": lambda t: t["z"] * t["z"].conj(),
    "cast": lambda t: t["a"].to(torch.int32).to(torch.float64),
    # reductions
    "sum": lambda t: t["a"].sum(),
    "sum_dim_keepdim": lambda t: t["a"].sum(1, keepdim=True),
    "mean_dtype": lambda t: t["i"].float().mean(0),
    "max_dim": lambda t: t["a"].max(1),
    "argmin": lambda t: t["a"].argmin(),
    "std_var": lambda t: torch.std_mean(t["a"], dim=0),
    "cumsum": lambda t: t["a"].cumsum(1),
    "prod_int": lambda t: t["i"].prod(0),
    "norm": lambda t: torch.linalg.vector_norm(t["a"], 2, dim=1),
    "logsumexp": lambda t: t["a"].logsumexp(1),
    "topk": lambda t: t["a"].topk(2, dim=1),
    "sort": lambda t: t["a"].sort(1),
    "unique": lambda t: torch.unique(t["i"], return_counts=True),
    # linear algebra
    "matmul": lambda t: t["a"] @ t["c"],
    "mv": lambda t: t["a"].mv(t["v"]),
    "bmm": lambda t: torch.bmm(t["a"].expand(2, 4, 5), t["c"].expand(2, 5, 3)),
    "addmm": lambda t: torch.addmm(t["v"][:3], t["a"], t["c"]),
    "linalg_solve": lambda t: torch.linalg.solve(
        t["a"][:4, :4] + 4 * torch.eye(4, device=t["a"].device), t["a"][:, :2]),
    # nn
    "conv2d": lambda t: F.conv2d(t["img"], t["w"], padding=1),
    "conv2d_stride": lambda t: F.conv2d(t["img"], t["w"], stride=2),
    "max_pool2d": lambda t: F.max_pool2d(t["img"], 2),
    "avg_pool2d": lambda t: F.avg_pool2d(t["img"], 2),
    "batch_norm": lambda t: F.batch_norm(t["img"], None, None, training=True),
    "layer_norm": lambda t: F.layer_norm(t["a"], (5,)),
    "softmax": lambda t: F.softmax(t["a"], dim=1),
    "log_softmax": lambda t: F.log_softmax(t["a"], dim=0),
    "cross_entropy": lambda t: F.cross_entropy(t["a"], t["idx"].new_tensor([0, 1, 4, 2])),
    "gelu_silu": lambda t: F.gelu(t["a"]) + F.silu(t["b"]),
    "interpolate": lambda t: F.interpolate(t["img"], scale_factor=2, mode="bilinear"),
    "embedding": lambda t: F.embedding(t["idx"], t["c"]),
    # indexing
    "index_select": lambda t: t["a"].index_select(0, t["idx"]),
    "advanced_index": lambda t: t["a"][t["idx"]],
    "advanced_index_cpu_indices": lambda t: t["a"][torch.tensor([1, 3])],
    "boolean_mask": lambda t: t["a"][t["mask"]],
    "gather": lambda t: t["a"].gather(1, t["idx"].expand(4, 3)),
    "nonzero": lambda t: t["mask"].nonzero(),
    "masked_fill": lambda t: t["a"].masked_fill(t["mask"], -1.0),
    "scatter_add": lambda t: torch.zeros(4, 5, device=t["a"].device).scatter_add(
        1, t["idx"].expand(4, 3), t["a"][:, :3]),
    # shape and views
    "transpose_contiguous": lambda t: t["a"].t().contiguous(),
    "slice_step": lambda t: t["a"][:, ::2],
    "reshape_noncontig": lambda t: t["a"].t().reshape(-1),
    "cat": lambda t: torch.cat([t["a"], t["b"]], 1),
    "stack": lambda t: torch.stack([t["a"], t["b"]]),
    "split": lambda t: t["a"].split(2, dim=1),
    "flip_roll": lambda t: t["a"].flip(0).roll(1, 1),
    "permute_mul": lambda t: t["img"].permute(0, 2, 3, 1) * 2,
    "channels_last": lambda t: t["img"].contiguous(memory_format=torch.channels_last),
    "expand_add": lambda t: t["v"].expand(4, 5) + 1,
    "diagonal": lambda t: t["a"].diagonal(),
    "unfold": lambda t: t["v"].unfold(0, 2, 1),
    "view_as_real": lambda t: torch.view_as_real(t["z"]),
    "tril": lambda t: t["a"].tril(),
    # factories with a device argument
    "arange": lambda t: torch.arange(10, device=t["a"].device) * 2,
    "full": lambda t: torch.full((2, 3), 7, device=t["a"].device),
    "linspace": lambda t: torch.linspace(0, 1, 7, device=t["a"].device),
    "eye": lambda t: torch.eye(3, 4, device=t["a"].device, dtype=torch.int64),
    "zeros_like": lambda t: torch.zeros_like(t["a"]) + torch.ones_like(t["i"]),
    "tensor_ctor": lambda t: torch.tensor([[1, 2], [3, 4]], device=t["a"].device),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_matches_cpu(name):
    fn = OPS[name]
    cpu_in = _inputs()
    dev_in = _to(cpu_in, DEV)
    expected = fn(cpu_in)
    actual = fn(dev_in)
    _assert_same(actual, expected)
    # The op did not touch its inputs.
    for k in cpu_in:
        torch.testing.assert_close(dev_in[k].cpu(), cpu_in[k])


def test_at_least_forty_ops_are_covered():
    assert len(OPS) >= 40


def test_views_share_memory_and_write_through():
    x = torch.zeros(4, 6, device=DEV)
    v = x[1:3, ::2]
    assert v.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    v.fill_(5)
    t = x.t()
    t[0, 0] = 9
    d = x.diagonal()
    d.add_(1)
    expected = torch.zeros(4, 6)
    expected[1:3, ::2] = 5
    expected[0, 0] = 9
    expected.diagonal().add_(1)
    assert torch.equal(x.cpu(), expected)


def test_inplace_on_views_and_out_variants():
    a = torch.arange(12.0).reshape(3, 4)
    d = a.to(DEV)
    a[:, 1].mul_(10)
    d[:, 1].mul_(10)
    a.t()[2].add_(a[0, :3])
    d.t()[2].add_(d[0, :3])
    assert torch.equal(d.cpu(), a)
    out = torch.empty(0, device=DEV)
    ret = torch.mul(d, 2, out=out)
    assert ret is out and out.shape == (3, 4)
    assert torch.equal(out.cpu(), a * 2)
    # out= with a non-contiguous destination writes through the view.
    big = torch.zeros(3, 8, device=DEV)
    torch.add(d, 1, out=big[:, ::2])
    assert torch.equal(big.cpu()[:, ::2], a + 1)
    assert torch.equal(big.cpu()[:, 1::2], torch.zeros(3, 4))
    vals, idx = torch.empty(0, device=DEV), torch.empty(0, dtype=torch.long, device=DEV)
    torch.max(d, 1, out=(vals, idx))
    exp_vals, exp_idx = a.max(1)
    assert torch.equal(vals.cpu(), exp_vals) and torch.equal(idx.cpu(), exp_idx)


def test_inplace_ops_keep_identity_and_storage():
    x = torch.randn(5, device=DEV)
    ptr = x.data_ptr()
    y = x.add_(1).mul_(2).clamp_(min=0)
    assert y is x and x.data_ptr() == ptr
    x.resize_(20)
    assert x.shape == (20,)
    x.resize_(2, 2)
    assert x.shape == (2, 2)
    x.set_()
    assert x.numel() == 0 and x.device.type == DEV


def test_set_shares_storage():
    a = torch.arange(6.0, device=DEV)
    b = torch.empty(0, device=DEV)
    b.set_(a.untyped_storage(), 2, (2, 2), (2, 1))
    assert torch.equal(b.cpu(), torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    b.set_(a)
    assert b.data_ptr() == a.data_ptr() and b.shape == a.shape


def test_item_and_tolist():
    x = torch.tensor([1.5, 2.5], device=DEV)
    assert x[1].item() == 2.5
    assert x.tolist() == [1.5, 2.5]
    assert int(torch.tensor(7, device=DEV)) == 7
    assert bool(torch.tensor(True, device=DEV))


def test_copies_between_devices_and_dtypes():
    a = torch.arange(10, dtype=torch.int32)
    d = a.to(DEV, dtype=torch.float16)
    assert d.dtype == torch.float16 and d.device.type == DEV
    back = d.to("cpu", torch.float64)
    assert torch.equal(back, a.double())
    dst = torch.empty(10, dtype=torch.float64, device=DEV)
    dst.view(5, 2).copy_(a.view(2, 5).t())  # strided source, dtype change
    assert torch.equal(dst.cpu(), a.view(2, 5).t().reshape(-1).double())
    host = torch.empty(5)
    host.copy_(d[::2])
    assert torch.equal(host, a[::2].float())


def test_mixing_device_and_host_tensors_raises_like_cuda():
    d = torch.ones(3, device=DEV)
    with pytest.raises(RuntimeError) as info:
        d + torch.ones(3)
    assert "Expected all tensors to be on the same device, but found at least two devices, " \
        "mps_ext:0 and cpu!" in str(info.value)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        torch.cat([d, torch.ones(3)])
    # 0-dim CPU tensors are scalars, as on CUDA.
    assert torch.equal((d * torch.tensor(2.0)).cpu(), torch.full((3,), 2.0))


def test_autograd_through_device_ops():
    x = torch.randn(4, 3, requires_grad=True)
    xd = x.detach().to(DEV).requires_grad_()
    def f(t):
        return (t.sin() * t.t().mean(0, keepdim=True).t()).pow(2).sum()
    f(x).backward()
    f(xd).backward()
    assert xd.grad.device.type == DEV
    torch.testing.assert_close(xd.grad.cpu(), x.grad)


def test_new_outputs_live_in_device_memory():
    torch.mps_ext.empty_cache()
    before = torch.mps_ext.current_allocated_memory()
    a = torch.ones(1 << 18, device=DEV)
    b = a * 3  # a new output of a fallback kernel: lent from the device pool
    assert torch.mps_ext.current_allocated_memory() - before == 2 * (1 << 20)
    del a, b
    assert torch.mps_ext.current_allocated_memory() == before


def test_scaled_dot_product_attention_takes_cpus_route():
    # CPU runs its flash kernel where it applies and the math decomposition
    # where the mask requires grad; mps_ext must pick the same (bit-equal
    # results), forward and backward.
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    mask = torch.randn(3, 6)
    for mask_grad in (False, True):
        outs, grads = [], []
        for device in ("cpu", "mps_ext"):
            leaves = [t.clone().to(device).requires_grad_() for t in (q, k, v)]
            m = mask.clone().to(device).requires_grad_(mask_grad)
            out = torch.nn.functional.scaled_dot_product_attention(*leaves, attn_mask=m)
            out.sum().backward()
            outs.append(out.detach().cpu())
            grads.append([t.grad.cpu() for t in leaves] + ([m.grad.cpu()] if mask_grad else []))
        assert torch.equal(outs[0], outs[1])
        for a, b in zip(*grads):
            assert torch.equal(a, b)


# The hot pointwise ops (csrc/aten/HotOps.cpp) run CPU's structured kernels
# on the device tensors; calls TensorIterator would convert on CPU (mixed
# dtypes, half with a Python number) take the fallback. Either way: CPU's
# result, dtype and strides, bit for bit, and CPU's errors.
HOT_CASES = {
    "add": lambda x, y: x + y,
    "sub_alpha": lambda x, y: torch.sub(x, y, alpha=2),
    "mul": lambda x, y: x * y,
    "div": lambda x, y: x / y,
    "neg": lambda x, y: -x,
    "relu": lambda x, y: torch.relu(x),
    "clamp_min": lambda x, y: torch.clamp_min(x, 0.1),
    "threshold_backward": lambda x, y: torch.ops.aten.threshold_backward(x, y, 0.0),
    "python_float": lambda x, y: x * 0.3 + 1.5,
    "python_int_on_int": lambda x, y: x.int() * 3 - 2,
    "int_true_divide": lambda x, y: x.int() / 2,
    "int_plus_float": lambda x, y: x.int() + 1.5,
    "half_times_python_float": lambda x, y: x.half() * 0.1,
    "bfloat16_plus_python_float": lambda x, y: x.bfloat16() + 0.1,
    "double_cpu_scalar_tensor": lambda x, y: x + torch.tensor(2.0, dtype=torch.float64),
    "scalar_tensor_first": lambda x, y: torch.tensor(3.0) - x,
    "broadcast": lambda x, y: x[:, :1] * y,
    "transposed": lambda x, y: x.t() + y.t(),
    "int_relu": lambda x, y: x.int().relu(),
    "bool_mul": lambda x, y: (x > 0) * True,
}


@pytest.mark.parametrize("name", sorted(HOT_CASES))
def test_hot_ops_match_cpu_bit_for_bit(name):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g) * 4, torch.randn(5, 3, generator=g)
    fn = HOT_CASES[name]
    want = fn(x, y)
    got = fn(x.to("mps_ext"), y.to("mps_ext"))
    assert got.device.type == "mps_ext"
    assert got.dtype == want.dtype and got.stride() == want.stride()
    assert torch.equal(got.cpu(), want)


def test_hot_inplace_ops_match_cpu():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    x, y = a.to("mps_ext"), b.to("mps_ext")
    storage = x.untyped_storage().data_ptr()
    for t, u in ((a, b), (x, y)):
        t.add_(u, alpha=2).mul_(0.9).div_(3).sub_(u).neg_().relu_().clamp_min_(0.05)
        t.mul_(torch.tensor(2.0))
    assert torch.equal(x.cpu(), a)
    assert x.untyped_storage().data_ptr() == storage


@pytest.mark.parametrize("bad", [
    lambda d: torch.randn(3, device=d).add_(torch.randn(4, 3, device=d)),
    lambda d: torch.ones(3, dtype=torch.int, device=d).div_(2),
    lambda d: torch.ones(3, dtype=torch.bool, device=d) - torch.ones(3, dtype=torch.bool, device=d),
    lambda d: torch.ones(3, dtype=torch.bool, device=d).relu(),
    lambda d: torch.ones(3, device=d) + torch.ones(4, device=d),
    lambda d: torch.ones(2, 3, device=d).expand(3, 2, 3).add_(1),
    lambda d: torch.ones(3, device=d).add(torch.ones(3, device=d), alpha=1j),
])
def test_hot_op_errors_are_cpus(bad):
    with pytest.raises(RuntimeError) as cpu:
        bad("cpu")
    with pytest.raises(RuntimeError) as dev:
        bad("mps_ext")
    assert str(dev.value) == str(cpu.value)
