"""What a model carries across devices: Parameter identity and tied weights
through every conversion path (as on CUDA), and the device RNG state through
everything that saves and restores it (activation checkpointing, fork_rng,
DataLoader workers)."""

import copy
import io

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

DEV = "mps_ext"


class TiedLM(nn.Module):
    """A GPT-2-style language model head: the LM head shares the embedding."""

    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.body(self.emb(tokens)))


def _tied(model):
    return model.head.weight is model.emb.weight


@pytest.mark.parametrize("convert", [
    lambda m: m.to(DEV),
    lambda m: m.to(device=DEV, dtype=torch.float64),
    lambda m: m.to(torch.device(DEV, 0)),
    lambda m: m.mps_ext(),
    lambda m: m.to_empty(device=DEV),
], ids=["to", "to_device_dtype", "to_device_index", "mps_ext", "to_empty"])
def test_conversion_keeps_parameter_objects_and_ties(convert):
    model = TiedLM()
    params = list(model.parameters())
    emb = model.emb.weight
    convert(model)
    assert model.emb.weight.device.type == DEV
    assert _tied(model)
    assert model.emb.weight is emb  # the same Parameter object, as on CUDA
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    model.cpu()
    assert _tied(model) and model.emb.weight is emb


def test_tensor_data_assignment_across_devices():
    p = nn.Parameter(torch.zeros(3))
    p.data = torch.ones(3, device=DEV)
    assert p.device.type == DEV and isinstance(p, nn.Parameter) and p.requires_grad
    assert p.detach().cpu().tolist() == [1.0, 1.0, 1.0]
    p.data = torch.full((2,), 2.0)
    assert p.device.type == "cpu" and p.tolist() == [2.0, 2.0]


def test_gradients_move_with_their_parameters():
    lin = nn.Linear(3, 2)
    lin(torch.randn(4, 3)).sum().backward()
    grad = lin.weight.grad.clone()
    lin.to(DEV)
    assert lin.weight.grad.device.type == DEV
    torch.testing.assert_close(lin.weight.grad.cpu(), grad)


def test_deepcopy_save_load_and_state_dict_keep_ties():
    model = TiedLM().to(DEV)
    assert _tied(copy.deepcopy(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    for location in (None, "cpu", DEV):
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False, map_location=location)
        assert _tied(loaded)
        assert loaded.emb.weight.device.type == (location or DEV)
    state = TiedLM().state_dict()
    model.load_state_dict(state)
    assert _tied(model) and model.emb.weight.device.type == DEV
    torch.testing.assert_close(model.emb.weight.detach().cpu(), state["emb.weight"])


def test_tied_model_trains_as_on_cpu():
    torch.manual_seed(0)
    cpu = TiedLM()
    dev = copy.deepcopy(cpu).to(DEV)
    assert len(list(dev.parameters())) == len(list(cpu.parameters()))
    tokens = torch.randint(0, 50, (4, 12))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (cpu, dev)]
    for _ in range(4):
        losses = []
        for model, opt, device in ((cpu, opts[0], "cpu"), (dev, opts[1], DEV)):
            t = tokens.to(device)
            logits = model(t[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, 50), t[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, pc), pd in zip(cpu.named_parameters(), dev.parameters()):
        torch.testing.assert_close(pd.detach().cpu(), pc.detach(), atol=1e-6, rtol=1e-5, msg=name)
    assert _tied(dev)


# ------------------------------------------------------------- RNG state

def _block():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.5), nn.Linear(32, 16)).to(DEV)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_with_dropout_recomputes_the_same_mask(use_reentrant):
    block = _block()
    x = torch.randn(32, 16, device=DEV, requires_grad=True)
    torch.manual_seed(1)
    out = checkpoint(block, x, use_reentrant=use_reentrant)
    out.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad()
    torch.manual_seed(1)
    ref = block(x)
    ref.square().sum().backward()
    ref_grads = [x.grad] + [p.grad for p in block.parameters()]
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


def test_checkpoint_preserve_rng_state_false_draws_anew():
    # With preserve_rng_state=False the recomputation draws a new mask, as on
    # CUDA; so the gradients differ from the plain forward's.
    block = _block()
    x = torch.randn(32, 16, device=DEV, requires_grad=True)
    torch.manual_seed(1)
    checkpoint(block, x, use_reentrant=False, preserve_rng_state=False).sum().backward()
    g = x.grad.clone()
    x.grad = None
    torch.manual_seed(1)
    block(x).sum().backward()
    assert not torch.equal(g, x.grad)


def test_fork_rng_and_rng_state_all():
    torch.manual_seed(3)
    with torch.random.fork_rng(device_type=DEV):
        inside = torch.rand(4, device=DEV)
    assert torch.equal(inside, torch.rand(4, device=DEV))
    module = torch.get_device_module(DEV)
    states = module.get_rng_state_all()
    first = torch.rand(4, device=DEV)
    module.set_rng_state_all(states)
    assert torch.equal(first, torch.rand(4, device=DEV))


class _Draws(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.rand(2, device=DEV).cpu()


def test_dataloader_workers_seed_the_device_generator():
    # Each worker seeds torch (and so mps_ext) with base_seed + worker id:
    # reproducible for one base seed, different across workers.
    def run():
        loader = torch.utils.data.DataLoader(
            _Draws(), batch_size=1, num_workers=2,
            generator=torch.Generator().manual_seed(7), multiprocessing_context="fork")
        return torch.cat(list(loader))

    a, b = run(), run()
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
