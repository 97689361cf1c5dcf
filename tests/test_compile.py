"""torch.compile on mps_ext (torch_mps_ext/_inductor.py, docs/compile.md):
Inductor's C++ code generator on device memory by default, its Metal code
generator with TORCH_MPS_EXT_INDUCTOR=metal or in MPS fidelity mode.

Compiles are slow (a C++ or shader build per kernel), so the models are
small; the session's Inductor cache (conftest) lets the modes of one model
share their kernel builds."""

import os

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


@pytest.fixture
def generator_setting(monkeypatch):
    """Sets TORCH_MPS_EXT_INDUCTOR for one test (read at each compile)."""
    def set_to(value):
        monkeypatch.setenv("TORCH_MPS_EXT_INDUCTOR", value)
    monkeypatch.delenv("TORCH_MPS_EXT_INDUCTOR", raising=False)
    return set_to


def _row_fn(a, b):
    return (a.sin() * b + a.exp()).sum(1).softmax(0)


# -- which generator, where the buffers live ---------------------------------

def test_default_generator_is_cpp_on_device_memory(generator_setting):
    a, b = torch.randn(64, 100, device=DEV), torch.randn(64, 100, device=DEV)
    before = torch.mps_ext.memory_allocated()
    out, code = run_and_get_code(torch.compile(_row_fn), a, b)
    torch.testing.assert_close(out, _row_fn(a, b))
    assert out.device.type == DEV
    # the output comes from the device's allocator
    assert torch.mps_ext.memory_allocated() - before >= out.numel() * out.element_size()
    src = code[0]
    assert "cpp_fused" in src and "#pragma omp" in src and "kernel void" not in src
    assert "device='mps_ext'" in src and "empty_strided_cpu(" not in src.split("def call")[1]
    # generated kernels run inline: the graph waits for the stream first
    assert "mps_ext_await_stream(0)" in src


def test_metal_generator_is_selectable(generator_setting):
    generator_setting("metal")
    a, b = torch.randn(64, 100, device=DEV), torch.randn(64, 100, device=DEV)
    out, code = run_and_get_code(torch.compile(_row_fn), a, b)
    torch.testing.assert_close(out, _row_fn(a, b))
    src = code[0]
    assert "kernel void" in src and "threadgroup_sum" in src and "cpp_fused" not in src


def test_fidelity_mode_defaults_to_metal_and_the_setting_wins(generator_setting):
    def f(t):
        return torch.nn.functional.silu(t) * 2

    t = torch.randn(300, device=DEV)
    torch.mps_ext.set_fidelity("mps")
    try:
        out, code = run_and_get_code(torch.compile(f), t)
        assert "kernel void" in code[0]
        torch._dynamo.reset()
        generator_setting("cpp")
        out, code = run_and_get_code(torch.compile(f), t)
        assert "cpp_fused" in code[0]
    finally:
        torch.mps_ext.set_fidelity("off")
    torch.testing.assert_close(out, f(t))


def test_generators_do_not_share_cached_graphs(generator_setting):
    # The generator is part of Inductor's FX graph cache key: the same graph
    # compiled again with the other generator is not the cached one.
    def f(t):
        return (t * 3).cos()

    t = torch.randn(33, device=DEV)
    sources = []
    for name in ("metal", "cpp", "metal"):
        generator_setting(name)
        torch._dynamo.reset()
        _, code = run_and_get_code(torch.compile(f), t)
        sources.append(code[0])
    assert ["kernel void" in s for s in sources] == [True, False, True]


def test_bad_generator_setting_is_a_value_error(generator_setting):
    generator_setting("triton")
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed,
                       match="TORCH_MPS_EXT_INDUCTOR must be cpp or metal, got 'triton'"):
        torch.compile(lambda t: t + 1)(torch.ones(3, device=DEV))


def test_compiled_kernels_wait_for_queued_device_work():
    # A non_blocking copy queued behind 200 ms of stream work: the compiled
    # graph's C++ kernel must read the copied values, as an operator would.
    f = torch.compile(lambda t: t * 2 + 1)
    src = torch.arange(4096, dtype=torch.float32).pin_memory()
    dst = torch.zeros(4096, device=DEV)
    f(dst)  # compiled before the work is queued
    torch.mps_ext._sleep(200_000_000)
    dst.copy_(src, non_blocking=True)
    torch.testing.assert_close(f(dst), src.to(DEV) * 2 + 1)


def test_float64_graphs_compile_under_both_generators(generator_setting):
    d = torch.randn(8, 8, dtype=torch.float64, device=DEV)

    def f(t):
        return (t.sin() + 1).sum(0)

    out, code = run_and_get_code(torch.compile(f), d)
    assert out.dtype == torch.float64 and "double" in code[0]
    torch.testing.assert_close(out, f(d), rtol=1e-12, atol=1e-12)
    # Metal has no double: Inductor leaves float64 nodes to aten, which on
    # mps_ext are CPU's kernels -- exactly eager's results.
    generator_setting("metal")
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(f), d)
    assert torch.equal(out, f(d)) and "kernel void" not in code[0]


def test_dynamic_shapes():
    f = torch.compile(lambda t: torch.nn.functional.silu(t) * 2, dynamic=True)
    for n in (7, 300, 1025):
        t = torch.randn(n, device=DEV)
        torch.testing.assert_close(f(t), torch.nn.functional.silu(t) * 2)


# -- models: compile and train like eager ------------------------------------

class PreNormBlock(torch.nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(),
                                       torch.nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return (x + self.mlp(self.ln2(x))).mean(1)


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Conv2d(4, 8, 3), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))

    def forward(self, x):
        return self.body(x)


class SmallLSTM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(6, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _encoder():
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                             batch_first=True)
    return torch.nn.Sequential(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                               torch.nn.Flatten(), torch.nn.Linear(16 * 6, 5))


MODELS = {
    "transformer_block": (PreNormBlock, (4, 6, 16)),
    "transformer_encoder": (_encoder, (4, 6, 16)),
    "cnn": (SmallCNN, (4, 3, 8, 8)),
    "lstm": (SmallLSTM, (4, 5, 6)),
}
MODES = ["default", "reduce-overhead", "max-autotune-no-cudagraphs"]


def _pair(name):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    eager = make().to(DEV)
    compiled = make().to(DEV)
    compiled.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).to(DEV)
    y = torch.randint(0, 5, (shape[0],), generator=g).to(DEV)
    return eager, compiled, x, y


def _step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _assert_trains_like_eager(eager, compiled, run_compiled, x, y, steps=3):
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    for i in range(steps):
        le = _step(eager, opt_e, x, y)
        lc = run_compiled(x, y)
        assert lc.device.type == DEV
        torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-5, msg=f"step {i}")
    for (n, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-3, atol=1e-4, msg=n)
        assert pc.device.type == DEV


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_model_compiles_and_trains_like_eager(name, mode):
    eager, compiled, x, y = _pair(name)
    fwd = torch.compile(compiled, mode=mode)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1, momentum=0.9)
    _assert_trains_like_eager(eager, compiled, lambda x, y: _step(fwd, opt, x, y), x, y)


@pytest.mark.parametrize("name", list(MODELS))
def test_no_graph_break_from_the_device(name):
    # torch._dynamo.explain on mps_ext breaks exactly where it breaks on CPU
    # (Dynamo's own limits), and no break reason is about the device.
    eager, _, x, _ = _pair(name)
    on_cpu = torch._dynamo.explain(eager.to("cpu"))(x.to("cpu"))
    torch._dynamo.reset()
    on_dev = torch._dynamo.explain(eager.to(DEV))(x)
    assert on_dev.graph_break_count == on_cpu.graph_break_count
    reasons = [str(b.reason) for b in on_dev.break_reasons]
    assert reasons == [str(b.reason) for b in on_cpu.break_reasons]
    assert not any("mps_ext" in r or "PrivateUse1" in r for r in reasons)


@pytest.mark.parametrize("name", ["transformer_block", "cnn"])
def test_dynamic_shapes_models_train_like_eager(name):
    # one compiled graph for every batch size (dynamic=True), training
    eager, compiled, x, y = _pair(name)
    fwd = torch.compile(compiled, dynamic=True)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1, momentum=0.9)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    for n in (2, 3, 4):
        le = _step(eager, opt_e, x[:n], y[:n])
        torch.testing.assert_close(_step(fwd, opt, x[:n], y[:n]), le, rtol=1e-4, atol=1e-5)
    for pe, pc in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-3, atol=1e-4)


def test_compiled_whole_training_step():
    # forward, backward and the optimizer step in one torch.compile
    eager, compiled, x, y = _pair("transformer_block")
    # eps well above rounding noise: the attention's key bias has an exactly
    # zero gradient in exact arithmetic, and Adam with a tiny eps turns its
    # rounding noise (different in any two kernels) into full-size steps.
    opt = torch.optim.AdamW(compiled.parameters(), lr=1e-2, eps=1e-3)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-2, eps=1e-3)

    @torch.compile
    def train_step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    for i in range(3):
        le = _step(eager, opt_e, x, y)
        torch.testing.assert_close(train_step(x, y), le, rtol=1e-4, atol=1e-5, msg=f"step {i}")
    for pe, pc in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-3, atol=1e-4)


# -- registration -------------------------------------------------------------

def test_import_does_not_import_inductor():
    proc = run_python("""
        import sys, torch, torch_mps_ext
        print("torch._inductor" in sys.modules)
        assert torch.mps_ext.Scheduling.__name__ == "MpsExtScheduling"
        print("torch._inductor.codegen.cpp" in sys.modules)
    """, env={"TORCH_MPS_EXT_INDUCTOR": None})
    assert proc.stdout.split() == ["False", "True"]


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'torch.mps_ext' has no attribute 'nope'"):
        torch.mps_ext.nope


def test_cache_goes_where_inductor_is_told():
    # conftest points TORCHINDUCTOR_CACHE_DIR at the session's tmp folder:
    # compiled mps_ext graphs are cached there, as CPU's are.
    cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    torch.compile(lambda t: t.cos() * 5)(torch.randn(17, device=DEV))
    found = [f for _, _, files in os.walk(cache) for f in files if f.endswith(".so")]
    assert found
