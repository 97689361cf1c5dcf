"""torch.autocast("mps_ext") and torch.amp.GradScaler("mps_ext")."""

import warnings

import pytest
import torch

import torch_mps_ext  # noqa: F401

DEV = "mps_ext"


def test_supported_dtypes_and_default():
    assert torch.mps_ext.get_amp_supported_dtype() == [torch.float16, torch.bfloat16]
    assert torch.get_autocast_dtype(DEV) == torch.float16
    assert torch.amp.is_autocast_available(DEV)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matmul_and_conv_run_in_the_autocast_dtype(dtype):
    torch.manual_seed(0)
    a, b = torch.randn(16, 32), torch.randn(32, 8)
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    lin = torch.nn.Linear(32, 8)
    with torch.autocast(DEV, dtype=dtype):
        assert torch.is_autocast_enabled(DEV)
        mm = a.to(DEV) @ b.to(DEV)
        conv = torch.nn.functional.conv2d(x.to(DEV), w.to(DEV))
        out = torch.nn.functional.linear(a.to(DEV), lin.weight.to(DEV), lin.bias.to(DEV))
    assert not torch.is_autocast_enabled(DEV)
    # The same kernels on inputs cast to the autocast dtype: bit-equal.
    for got, want in ((mm, a.to(dtype) @ b.to(dtype)),
                      (conv, torch.nn.functional.conv2d(x.to(dtype), w.to(dtype))),
                      (out, torch.nn.functional.linear(a.to(dtype), lin.weight.to(dtype),
                                                       lin.bias.to(dtype)))):
        assert got.dtype == dtype and got.device.type == DEV
        assert torch.equal(got.cpu(), want)


def test_precision_sensitive_ops_run_in_float32_and_multi_input_ops_promote():
    a = torch.randn(4, 8, device=DEV)
    with torch.autocast(DEV):
        h = a @ a.t()  # float16
        assert h.dtype == torch.float16
        assert torch.softmax(h, 1).dtype == torch.float32
        assert torch.log_softmax(h, 1).dtype == torch.float32
        assert torch.nn.functional.cross_entropy(h, torch.tensor([0, 1, 2, 3], device=DEV)).dtype == torch.float32
        assert torch.exp(h).dtype == torch.float32
        assert torch.relu(h).dtype == torch.float16  # not on a list: runs as given
        assert torch.addcmul(h.float(), h, h).dtype == torch.float32  # widest input
    # Outside: unchanged.
    assert (a @ a.t()).dtype == torch.float32


def test_unsupported_dtype_warns_and_disables():
    a = torch.randn(4, 4, device=DEV)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast(DEV, dtype=torch.float64):
            assert (a @ a).dtype == torch.float32
    assert any("In mps_ext autocast, but the target dtype is not supported. Disabling autocast."
               in str(w.message) for w in caught)


def test_binary_cross_entropy_is_refused_like_on_cuda():
    p, t = torch.rand(3, device=DEV), torch.rand(3, device=DEV)
    with torch.autocast(DEV), pytest.raises(RuntimeError) as info:
        torch.nn.functional.binary_cross_entropy(p, t)
    assert str(info.value).startswith(
        "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.")
    torch.nn.functional.binary_cross_entropy(p, t)  # fine outside autocast


def test_grad_scaler_trains_and_skips_steps_with_inf_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4)).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(DEV)
    x = torch.randn(64, 8, device=DEV)
    y = torch.randint(0, 4, (64,), device=DEV)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        with torch.autocast(DEV):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert scaler.get_scale() == 65536.0
    # An inf gradient: the step is skipped and the scale halves.
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    with torch.autocast(DEV):
        loss = torch.nn.functional.cross_entropy(model(x), y) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 32768.0
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)


def test_checkpoint_with_reentrant_backward():
    # torch.utils.checkpoint asks the backend module for its amp dtypes.
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    grads = []
    for device in ("cpu", DEV):
        wd = w.detach().to(device).requires_grad_()
        xd = x.detach().to(device).requires_grad_()
        out = checkpoint(lambda t: (t @ wd).relu(), xd, use_reentrant=True)
        out.sum().backward()
        grads.append((wd.grad.cpu(), xd.grad.cpu()))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def autocast_dtypes():
    """Result dtypes of a few operators under torch.autocast("mps_ext")."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    x5 = torch.randn(1, 2, 3, 4, 4, generator=g).to(DEV)
    half = torch.randn(2, 3, generator=g).to(DEV).half()
    with torch.autocast(DEV):
        out = {
            "conv_transpose3d": F.conv_transpose3d(x5, torch.ones(2, 2, 2, 2, 2, device=DEV)),
            "conv3d": F.conv3d(x5, torch.ones(2, 2, 1, 1, 1, device=DEV)),
            "mm": torch.ones(2, 2, device=DEV) @ torch.ones(2, 2, device=DEV),
            "exp": torch.exp(half),
            "interpolate": F.interpolate(half[None, None], scale_factor=2),
            "batch_norm": F.batch_norm(half, None, None, training=True),
            "gru_cell": torch.nn.GRUCell(3, 3).to(DEV)(torch.ones(2, 3, device=DEV)),
            "rnn_tanh_cell": torch.rnn_tanh_cell(*(torch.ones(3, 3, device=DEV),) * 4),
            # the overloads autocast appends float32 to (torch.norm itself reaches
            # linalg_vector_norm, listed in both)
            "norm.Scalar": torch.ops.aten.norm.Scalar(half, 2),
            "norm.ScalarOpt_dim": torch.ops.aten.norm.ScalarOpt_dim(half, 2, [1]),
        }
        try:
            out["binary_cross_entropy"] = F.binary_cross_entropy(
                torch.full((3,), 0.5, device=DEV), torch.ones(3, device=DEV))
        except RuntimeError as e:
            assert "unsafe to autocast" in str(e)
            out["binary_cross_entropy"] = None
    return {k: v if v is None else v.dtype for k, v in out.items()}


def test_mps_mode_autocasts_with_mps_lists():
    f16, f32 = torch.float16, torch.float32
    shared = {"conv_transpose3d": f16, "conv3d": f16, "mm": f16, "exp": f32,
              "interpolate": f32, "batch_norm": f16, "gru_cell": f16, "rnn_tanh_cell": f16,
              "norm.Scalar": f32, "norm.ScalarOpt_dim": f32, "binary_cross_entropy": None}
    # MPS (torch 2.13's AutocastMPS lists): no half 3-D transposed convolution,
    # batch_norm in float32; gru_cell and upsampling are not listed (they keep
    # their dtypes; what they call is autocast again: rnn_tanh_cell's linears
    # run in float16), nor are norm's dtype-appending overloads; binary_cross_entropy
    # is not refused.
    mps = dict(shared, conv_transpose3d=f32, batch_norm=f32, gru_cell=f32, interpolate=f16,
               binary_cross_entropy=f32, **{"norm.Scalar": f16, "norm.ScalarOpt_dim": f16})
    assert autocast_dtypes() == shared
    torch.mps_ext.set_fidelity("mps")
    try:
        assert autocast_dtypes() == mps
    finally:
        torch.mps_ext.set_fidelity("off")
    assert autocast_dtypes() == shared  # the mode is read per call
