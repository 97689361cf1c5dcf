"""Nested tensors on mps_ext (torch.nested, strided layout): the inference
fast paths of nn.TransformerEncoder and nn.MultiheadAttention (which torch
takes for PrivateUse1 devices) and nested autograd, as on CPU: CPU's nested
kernels run on nested host views of the device buffer
(csrc/aten/Fallback.cpp)."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

DEV = "mps_ext"
pytestmark = pytest.mark.filterwarnings("ignore:.*nested tensors is in prototype")


def _padded_batch():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 5:] = True
    mask[2, 3:] = True
    return x, mask


def test_transformer_encoder_fast_path_with_padding_mask():
    x, mask = _padded_batch()
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, dropout=0.0)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    dev = copy.deepcopy(enc).to(DEV)
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=mask)
        got = dev(x.to(DEV), src_key_padding_mask=mask.to(DEV))
    assert got.device.type == DEV
    torch.testing.assert_close(got.cpu(), ref)


def test_multihead_attention_fast_path():
    x, mask = _padded_batch()
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    dev = copy.deepcopy(mha).to(DEV)
    with torch.no_grad():
        ref = mha(x, x, x, key_padding_mask=mask, need_weights=False)[0]
        xd = x.to(DEV)
        got = dev(xd, xd, xd, key_padding_mask=mask.to(DEV), need_weights=False)[0]
    torch.testing.assert_close(got.cpu(), ref)


def test_nested_tensor_ops_in_inference():
    parts = [torch.randn(2, 4), torch.randn(3, 4)]
    lin = nn.Linear(4, 5)
    with torch.no_grad():
        ref = lin(torch.nested.nested_tensor(parts) + 1).to_padded_tensor(0.0)
        nt = torch.nested.nested_tensor(parts, device=DEV)
        got = copy.deepcopy(lin).to(DEV)(nt + 1).to_padded_tensor(0.0)
    assert nt.is_nested and nt.device.type == DEV
    torch.testing.assert_close(got.cpu(), ref)
    with warnings.catch_warnings():
        assert [t.cpu().tolist() for t in nt.unbind()] == [p.tolist() for p in parts]


def _nested_chain(device, parts, lin):
    """A small nested computation with autograd; returns (loss input, leaves)."""
    nt = torch.nested.nested_tensor([p.to(device) for p in parts], requires_grad=True)
    m = copy.deepcopy(lin).to(device)
    h = torch.relu(m(nt))
    scores = torch.matmul(h, h.transpose(-1, -2)).softmax(-1)
    out = torch.matmul(scores, h)
    return out, nt, m


def test_nested_tensor_autograd_matches_cpu():
    torch.manual_seed(0)
    parts = [torch.randn(2, 4), torch.randn(3, 4), torch.randn(1, 4)]
    lin = nn.Linear(4, 6)
    grads = {}
    for device in ("cpu", DEV):
        out, nt, m = _nested_chain(device, parts, lin)
        assert out.is_nested and out.requires_grad and out.device.type == device
        cot = torch.arange(out.to_padded_tensor(0.0).numel(), dtype=torch.float32)
        cot = cot.reshape(out.to_padded_tensor(0.0).shape).to(device) / 10
        (out.to_padded_tensor(0.0) * cot).sum().backward()
        assert nt.grad.is_nested and nt.grad.device.type == device
        grads[device] = ([g.cpu() for g in nt.grad.unbind()], m.weight.grad.cpu(),
                         m.bias.grad.cpu())
    (nt_got, w_got, b_got), (nt_ref, w_ref, b_ref) = grads[DEV], grads["cpu"]
    for g, r in zip(nt_got, nt_ref):
        torch.testing.assert_close(g, r)
    torch.testing.assert_close(w_got, w_ref)
    torch.testing.assert_close(b_got, b_ref)


def test_nested_size_metadata_stays_on_the_host():
    # As on CUDA: a nested tensor's sizes are a CPU tensor on every device.
    nt = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)], device=DEV)
    sizes = nt._nested_tensor_size()
    assert sizes.device.type == "cpu"
    assert sizes.tolist() == [[2, 4], [3, 4]]
    del sizes
    torch.testing.assert_close(nt.to_padded_tensor(0.0).cpu()[1], nt.unbind()[1].cpu())
