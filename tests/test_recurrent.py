"""Recurrent networks on mps_ext against CPU: ATen sends every accelerator's
LSTM/GRU cells to the fused-cell operators (csrc/aten/RnnCells.cpp), so these
check forward, every gradient and a few optimizer steps against CPU's unfused
cells, across the layer options users combine."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

DEV = "mps_ext"


def _tol(dtype):
    # The forward adds the gates in CPU's order (bit-equal per step); the
    # per-step input projection and the closed-form backward round
    # differently from CPU's sequence-wide GEMM and autograd graph.
    return dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)


def _compare_module(make, inputs, dtype, steps=3):
    torch.manual_seed(0)
    cpu = make().to(dtype)
    dev = copy.deepcopy(cpu).to(DEV)
    assert len(list(dev.parameters())) == len(list(cpu.parameters()))
    opt_c = torch.optim.Adam(cpu.parameters(), lr=1e-2)
    opt_d = torch.optim.Adam(dev.parameters(), lr=1e-2)
    for _ in range(steps):
        out_c = cpu(*inputs(lambda t: t))
        out_d = dev(*inputs(lambda t: t.to(DEV)))
        flat_c = _flatten(out_c)
        flat_d = _flatten(out_d)
        for a, b in zip(flat_c, flat_d):
            torch.testing.assert_close(b.cpu(), a, **_tol(dtype))
        loss_c = sum((t.float() ** 2).sum() for t in flat_c)
        loss_d = sum((t.float() ** 2).sum() for t in flat_d)
        opt_c.zero_grad()
        opt_d.zero_grad()
        loss_c.backward()
        loss_d.backward()
        for (name, pc), pd in zip(cpu.named_parameters(), dev.parameters()):
            assert pd.grad is not None, name
            torch.testing.assert_close(pd.grad.cpu(), pc.grad, **_tol(dtype), msg=name)
        opt_c.step()
        opt_d.step()
    for pc, pd in zip(cpu.parameters(), dev.parameters()):
        torch.testing.assert_close(pd.detach().cpu(), pc.detach(), **_tol(dtype))


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, nn.utils.rnn.PackedSequence):
        return [out.data]
    flat = []
    for o in out:
        flat.extend(_flatten(o))
    return flat


def _seq(shape, dtype):
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=dtype)
    return lambda move: (move(x),)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("options", [
    dict(),
    dict(batch_first=True),
    dict(bidirectional=True),
    dict(num_layers=2),
    dict(num_layers=2, bidirectional=True, batch_first=True),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_layers_match_cpu(kind, options):
    cls = getattr(nn, kind)
    shape = (3, 5, 4) if options.get("batch_first") else (5, 3, 4)
    _compare_module(lambda: cls(4, 6, **options), _seq(shape, torch.float32), torch.float32)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_float64_and_no_bias(kind):
    cls = getattr(nn, kind)
    _compare_module(lambda: cls(4, 6, bias=False, num_layers=2), _seq((5, 3, 4), torch.float64),
                    torch.float64)


def test_lstm_projection_and_initial_state():
    torch.manual_seed(2)
    h0 = torch.randn(2, 3, 3)
    c0 = torch.randn(2, 3, 6)
    x = torch.randn(5, 3, 4)
    _compare_module(lambda: nn.LSTM(4, 6, num_layers=2, proj_size=3),
                    lambda move: (move(x), (move(h0), move(c0))), torch.float32)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_packed_sequences(kind):
    torch.manual_seed(3)
    x = torch.randn(4, 6, 5)  # batch_first
    lengths = torch.tensor([6, 4, 3, 1])  # lengths stay on CPU, as torch requires

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(nn, kind)(5, 7, batch_first=True, bidirectional=True)

        def forward(self, x):
            packed = pack_padded_sequence(x, lengths, batch_first=True)
            out, _ = self.rnn(packed)
            padded, _ = pad_packed_sequence(out, batch_first=True)
            return padded

    _compare_module(Packed, lambda move: (move(x),), torch.float32)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_over_a_sequence(kind):
    torch.manual_seed(4)
    xs = torch.randn(6, 3, 4)

    class Unrolled(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = getattr(nn, kind)(4, 5)

        def forward(self, xs):
            state = None
            outs = []
            for x in xs:
                state = self.cell(x, state)
                outs.append(state[0] if isinstance(state, tuple) else state)
            return torch.stack(outs)

    _compare_module(Unrolled, lambda move: (move(xs),), torch.float32)
    _compare_module(lambda: Unrolled().double(), lambda move: (move(xs.double()),),
                    torch.float64)


def test_unbatched_cell_and_gradcheck():
    # Unbatched input (the module adds the batch dim) and the fused cells'
    # backward against numerical derivatives, including double backward
    # (which takes the differentiable composite backward).
    cell = nn.LSTMCell(3, 4).double().to(DEV)
    out = cell(torch.randn(3, dtype=torch.float64, device=DEV))
    assert out[0].shape == (4,)
    x = torch.randn(2, 3, dtype=torch.float64, device=DEV, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, device=DEV, requires_grad=True)
    c = torch.randn(2, 4, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h, c: cell(x, (h, c)), (x, h, c))
    assert torch.autograd.gradgradcheck(lambda x, h, c: cell(x, (h, c)), (x, h, c))
    gru = nn.GRUCell(3, 4).double().to(DEV)
    assert torch.autograd.gradcheck(lambda x, h: gru(x, h), (x, h))
    assert torch.autograd.gradgradcheck(lambda x, h: gru(x, h), (x, h))


def test_dropout_between_layers_is_seeded():
    # Dropout between layers draws from the device generator: the same seed
    # gives the same output, another seed another one.
    lstm = nn.LSTM(4, 8, num_layers=3, dropout=0.5).to(DEV)
    x = torch.randn(5, 2, 4, device=DEV)
    torch.manual_seed(5)
    a, _ = lstm(x)
    torch.manual_seed(5)
    b, _ = lstm(x)
    torch.manual_seed(6)
    c, _ = lstm(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    a.sum().backward()
    assert all(p.grad is not None for p in lstm.parameters())


def test_fused_cell_rejects_mismatched_state():
    igates = torch.randn(2, 8, device=DEV)
    with pytest.raises(RuntimeError, match="does not match gates of size"):
        torch.ops.aten._thnn_fused_lstm_cell(igates, igates, torch.randn(2, 3, device=DEV))
    with pytest.raises(RuntimeError, match="must be 2-D and of the same size"):
        torch.ops.aten._thnn_fused_gru_cell(igates, igates[:, :6], torch.randn(2, 2, device=DEV))
