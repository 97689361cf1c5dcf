"""torch.compile on mps_ext: Inductor's Metal code generator, its kernels
built by torch.mps_ext.compile_shader (torch_mps_ext/_inductor.py)."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from conftest import run_python

DEV = "mps_ext"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_training_step_matches_eager_and_runs_metal_kernels():
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                                torch.nn.LayerNorm(64), torch.nn.Linear(64, 5)).to(DEV)
    compiled_model = torch.nn.Sequential(*[torch.nn.Linear(32, 64), torch.nn.GELU(),
                                           torch.nn.LayerNorm(64), torch.nn.Linear(64, 5)]).to(DEV)
    compiled_model.load_state_dict(eager.state_dict())
    x = torch.randn(16, 32, device=DEV)
    y = torch.randint(0, 5, (16,), device=DEV)

    def step(model, opt):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.1)
    fwd = torch.compile(compiled_model)
    losses = []
    for i in range(3):
        le = step(eager, opt_e)
        if i == 0:
            lc, code = run_and_get_code(step, fwd, opt_c)
        else:
            lc = step(fwd, opt_c)
        losses.append((le.item(), lc.item()))
    for le, lc in losses:
        assert lc == pytest.approx(le, rel=1e-5, abs=1e-6)
    for pe, pc in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-5, atol=1e-6)
    assert pc.device.type == DEV
    source = "\n".join(code)
    assert "kernel void" in source  # fused Metal kernels, built by compile_shader
    assert "device='mps_ext'" in source and "device='cpu'" not in source


def test_fused_pointwise_and_reduction_kernels():
    def f(a, b):
        return (a.sin() * b + a.exp()).sum(1).softmax(0)

    a, b = torch.randn(64, 100, device=DEV), torch.randn(64, 100, device=DEV)
    out, code = run_and_get_code(torch.compile(f), a, b)
    torch.testing.assert_close(out, f(a, b))
    assert out.device.type == DEV
    src = code[0]
    assert src.count("kernel void") >= 1 and "threadgroup_sum" in src


def test_dynamic_shapes():
    f = torch.compile(lambda t: torch.nn.functional.silu(t) * 2, dynamic=True)
    for n in (7, 300, 1025):
        t = torch.randn(n, device=DEV)
        torch.testing.assert_close(f(t), torch.nn.functional.silu(t) * 2)


def test_float64_graphs_run_cpu_kernels():
    # Metal has no double: Inductor leaves float64 nodes to aten, which on
    # mps_ext are CPU's kernels -- exactly eager's results.
    d = torch.randn(8, 8, dtype=torch.float64, device=DEV)

    def f(t):
        return (t.sin() + 1).sum(0)

    out, code = run_and_get_code(torch.compile(f), d)
    assert out.dtype == torch.float64 and torch.equal(out, f(d))
    assert "kernel void" not in code[0]


def test_import_does_not_import_inductor():
    proc = run_python("""
        import sys, torch, torch_mps_ext
        print("torch._inductor.codegen.mps" in sys.modules)
        assert torch.mps_ext.Scheduling.__name__ == "MetalScheduling"
        print("torch._inductor.codegen.mps" in sys.modules)
    """)
    assert proc.stdout.split() == ["False", "True"]


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'torch.mps_ext' has no attribute 'nope'"):
        torch.mps_ext.nope
