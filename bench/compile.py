"""torch.compile on mps_ext against torch.compile on CPU, and against eager
mps_ext (docs/compile.md).

Each workload gives two rows:

- ``compile_<w>``: compiled on mps_ext / compiled on CPU (Inductor's C++
  backend) -- the ratio that matters; target 1.1.
- ``compile_<w>_vs_eager``: compiled on mps_ext / the same function eager on
  mps_ext (the "cpu" column is eager mps_ext here); target 1.0.

Workloads: issue 16's four (a fused MLP-ish expression, a transcendental
reduction, softmax of a layer norm, a pre-norm transformer block's forward
and backward) and a whole compiled training step (forward, backward, AdamW).
``compile_time_cold``/``compile_time_warm``: seconds to compile the
transformer block's forward+backward from an empty Inductor cache / from a
warm one (FX graph cache hit), mps_ext / CPU; target 1.2.

    python -m bench compile_gelu_mlp compile_gelu_mlp_vs_eager ...
"""

import contextlib
import torch

from bench.common import compare

_COMPILED: dict = {}  # (workload, device) -> the compiled callable, shared by both rows


def _gelu_mlp(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1024, generator=g).to(device)
    w = torch.randn(1024, 1024, generator=g).mul_(0.03).to(device)
    b = torch.randn(1024, generator=g).to(device)

    def f(x, w, b):
        h = x @ w + b
        return torch.nn.functional.gelu(h) * torch.sigmoid(h) + torch.tanh(h).exp()
    return f, (x, w, b)


def _transcendental_sum(device):
    x = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0)).to(device)

    def f(x):
        return (x.sin() * x.cos() + x.exp().log1p()).sum(-1)
    return f, (x,)


def _softmax_layer_norm(device):
    x = torch.randn(64, 128, 512, generator=torch.Generator().manual_seed(0)).to(device)

    def f(x):
        return torch.softmax(torch.nn.functional.layer_norm(x, (512,)) * 0.125, -1)
    return f, (x,)


class PreNormBlock(torch.nn.Module):
    """A pre-norm transformer block: MultiheadAttention + MLP, residuals."""

    def __init__(self, d=256, heads=4):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(),
                                       torch.nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


def _block_model(device):
    torch.manual_seed(0)
    return PreNormBlock().to(device), torch.randn(8, 128, 256).to(device)


def _transformer_block(device):
    model, x = _block_model(device)

    def f(x):
        out = model(x)
        out.square().mean().backward()
        return out
    return f, (x,)


def _train_step(device):
    model, x = _block_model(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def f(x):
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss
    return f, (x,)


def _pair(name, build):
    """The two rows' factories: device -> zero-argument callable."""
    def compiled(device):
        key = (name, device)
        if key not in _COMPILED:
            f, args = build(device)
            _COMPILED[key] = (torch.compile(f), args)
        f, args = _COMPILED[key]
        return lambda: f(*args)

    def compiled_vs_eager(side):
        if side == "mps_ext":
            return compiled("mps_ext")
        f, args = build("mps_ext")  # the "cpu" column: eager mps_ext
        return lambda: f(*args)
    return [(f"compile_{name}", compiled), (f"compile_{name}_vs_eager", compiled_vs_eager)]


def _compile_time(warm):
    """Compiles (first call of torch.compile) the transformer block's
    forward+backward. Cold: Inductor's caches emptied each time (a fresh
    cache directory, in-memory caches cleared); warm: Dynamo reset, Inductor's
    caches kept (the FX graph cache hits)."""
    from torch._inductor.utils import fresh_cache

    def make(device):
        model, x = _block_model(device)

        def f(x):
            model(x).square().mean().backward()

        def once():
            torch._dynamo.reset()
            with fresh_cache() if not warm else contextlib.nullcontext():
                torch.compile(f)(x)
        return once
    return make


WORKLOADS = [
    *_pair("gelu_mlp", _gelu_mlp),
    *_pair("transcendental_sum", _transcendental_sum),
    *_pair("softmax_layer_norm", _softmax_layer_norm),
    *_pair("transformer_block", _transformer_block),
    *_pair("train_step", _train_step),
]
WORKLOADS = [(n, make, dict(inner=3, repeats=7, warmup=2)) for n, make in WORKLOADS] + [
    ("compile_time_cold", _compile_time(False), dict(inner=1, repeats=3, warmup=0)),
    ("compile_time_warm", _compile_time(True), dict(inner=1, repeats=3, warmup=1)),
]

TARGETS = {name: (1.0 if name.endswith("_vs_eager") else 1.2 if "_time_" in name else 1.1)
           for name, _, _ in WORKLOADS}
