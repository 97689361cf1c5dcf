"""torch.compile on mps_ext (Inductor's Metal kernels, built by compile_shader)
against CPU eager: the same function, compiled on mps_ext, eager on CPU.

    python -m bench compile_fused_arith_4M compile_fused_transcendental_4M

Informational rows (no target): fused arithmetic runs faster than CPU eager
(one pass over memory instead of one per op); the transcendental one is
slower, mostly from torch's c10::metal::erf, whose branch keeps the shader
loop scalar (docs/compile.md).
"""

import torch


def _fused(fn):
    def make(device):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(4 << 20, generator=g).to(device)
        b = torch.randn(4 << 20, generator=g).to(device)
        f = torch.compile(fn) if device == "mps_ext" else fn
        return lambda: f(a, b)
    return make


def arith(a, b):
    return (a * b + 1.0) * 0.5 - a


def transcendental(a, b):
    return torch.nn.functional.gelu(a * b + a.sin()) * 0.5 + b.exp()


WORKLOADS = [
    ("compile_fused_arith_4M", _fused(arith), dict(inner=5)),
    ("compile_fused_transcendental_4M", _fused(transcendental), dict(inner=3)),
]
