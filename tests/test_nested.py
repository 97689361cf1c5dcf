"""Nested tensors on mps_ext (torch.nested, strided layout), as far as the
inference fast paths of nn.TransformerEncoder and nn.MultiheadAttention take
them for PrivateUse1 devices: CPU's nested kernels run on nested host views
of the device buffer (csrc/aten/Fallback.cpp)."""

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


def test_nested_tensors_with_grad_are_refused_clearly():
    nt = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)], device=DEV)
    lin = nn.Linear(4, 5).to(DEV)
    with pytest.raises(RuntimeError, match="nested tensors are supported for inference only "
                                           r"\(aten::linear with an argument that requires grad\)"):
        lin(nt)
