"""Helpers of the model zoo (tests/models): a model built on CPU, a deep copy
moved with `.to("mps_ext")`, the same inputs (made on CPU, then moved) fed to
both, and everything compared — outputs, losses, every parameter's gradient,
parameters and buffers after optimizer steps.

Tolerances: the device runs CPU's own kernels on the same bytes, so almost
everything is bit-equal; TOL (float32's assert_close defaults made ten times
tighter in atol) leaves room only for a reduction that could be split
differently across threads. Where a test loosens it, it says why.

Dropout: the device's random numbers come from its Philox generator
(docs/random.md), not CPU's mt19937, so dropout masks differ between the two
sides by design. The CPU-vs-device comparisons run with dropout 0; dropout on
the device is checked against itself (checkpointed vs plain backward).
"""

import contextlib
import copy

import pytest
import torch

DEV = "mps_ext"
TOL = dict(rtol=1.3e-6, atol=1e-6)

heavy = pytest.mark.models_heavy


@pytest.fixture(scope="session")
def zoo_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("model_zoo_cache")


@pytest.fixture(scope="module")
def zoo_env(zoo_cache_dir):
    """Every cache the zoo could touch points into a temporary directory, and
    the Hugging Face hub is offline: nothing is written to the user's home.
    Set for one test module at a time (the rest of the suite keeps its
    environment); the directory is the session's, as huggingface_hub reads
    HF_HOME once, on import."""
    root = zoo_cache_dir
    values = {
        "HF_HOME": str(root / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "XDG_CACHE_HOME": str(root / "xdg"),
        "TORCH_MPS_EXT_SHADER_CACHE": str(root / "shaders"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in values.items():
            mp.setenv(key, value)
        yield root


@pytest.fixture(scope="module")
def transformers(zoo_env):
    """transformers, imported after zoo_env so that huggingface_hub reads the
    temporary HF_HOME; skips only when the package is not installed."""
    tf = pytest.importorskip(
        "transformers",
        reason="transformers is not installed (`make test` installs requirements-test.txt)")
    tf.logging.set_verbosity_error()
    return tf


def shared_groups(model):
    """Names of the parameters that are one tensor (tied weights), as a set of
    tuples: the module's tie structure."""
    by_id = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {tuple(sorted(names)) for names in by_id.values() if len(names) > 1}


def on_device(model):
    """The model built on CPU and a deep copy moved to mps_ext, checked to keep
    the same parameters (count, names, tied weights) and to live on the device."""
    model_dev = copy.deepcopy(model).to(DEV)
    n_cpu = len(list(model.parameters()))
    n_dev = len(list(model_dev.parameters()))
    assert n_dev == n_cpu, (
        f"Module.to({DEV!r}) changed the number of parameters {n_cpu} -> {n_dev} "
        f"(tied weights untied?)")
    assert shared_groups(model_dev) == shared_groups(model)
    assert [n for n, _ in model_dev.named_parameters()] == [n for n, _ in model.named_parameters()]
    for name, t in list(model_dev.named_parameters()) + list(model_dev.named_buffers()):
        assert t.device.type == DEV, name
    return model_dev


def to_dev(obj):
    """A batch (tensor, or tuple/list/dict of them) moved to the device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(DEV)
    if isinstance(obj, dict):
        return {k: to_dev(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_dev(v) for v in obj)
    return obj


def assert_same(actual, expected, what="", **tol):
    """`actual` (on the device) equals `expected` (on CPU) within TOL."""
    assert isinstance(actual, torch.Tensor) and actual.device.type == DEV, what
    tol = tol or TOL
    torch.testing.assert_close(actual.detach().cpu(), expected.detach(), **tol,
                               msg=lambda m: f"{what}: {m}")


def assert_grads(model_dev, model_cpu, **tol):
    """Every parameter's gradient: both None or the same."""
    params_dev = dict(model_dev.named_parameters())
    for name, p in model_cpu.named_parameters():
        g_dev = params_dev[name].grad
        if p.grad is None:
            assert g_dev is None, f"{name}: gradient on the device only"
            continue
        assert g_dev is not None, f"{name}: no gradient on the device"
        assert_same(g_dev, p.grad, f"grad of {name}", **tol)


def assert_state(model_dev, model_cpu, **tol):
    """Every parameter and buffer (BatchNorm's running statistics, ...)."""
    tensors_dev = dict(model_dev.state_dict(keep_vars=True))
    for name, t in model_cpu.state_dict(keep_vars=True).items():
        assert_same(tensors_dev[name], t, name, **tol)


def train_side_by_side(model_cpu, model_dev, batches, loss_fn, make_opt, *,
                       grad_tol=None, state_tol=None, after_backward=None):
    """One optimizer step per batch on both sides: the losses, every gradient
    and every parameter/buffer after each step compared. `loss_fn(model, batch)`
    returns the loss; `make_opt(params)` builds the optimizer (the same call on
    both sides, so each side takes torch's own defaults for its device).
    Returns the CPU losses."""
    opt_cpu = make_opt(model_cpu.parameters())
    opt_dev = make_opt(model_dev.parameters())
    losses = []
    for step, batch in enumerate(batches):
        for opt in (opt_cpu, opt_dev):
            opt.zero_grad(set_to_none=True)
        loss_cpu = loss_fn(model_cpu, batch)
        loss_dev = loss_fn(model_dev, to_dev(batch))
        assert_same(loss_dev, loss_cpu, f"loss at step {step}")
        loss_cpu.backward()
        loss_dev.backward()
        if after_backward is not None:
            after_backward(model_cpu)
            after_backward(model_dev)
        assert_grads(model_dev, model_cpu, **(grad_tol or TOL))
        opt_cpu.step()
        opt_dev.step()
        assert_state(model_dev, model_cpu, **(state_tol or TOL))
        losses.append(loss_cpu.item())
    return losses


@contextlib.contextmanager
def eval_mode(*models):
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def seeded(seed):
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def optimizer(name, impl, **kw):
    """make_opt for train_side_by_side: torch.optim.<name> in its for-loop,
    foreach or fused form."""
    cls = getattr(torch.optim, name)
    form = {"forloop": dict(foreach=False), "foreach": dict(foreach=True),
            "fused": dict(fused=True), "default": {}}[impl]
    return lambda params: cls(params, **kw, **form)


__all__ = ["DEV", "TOL", "heavy", "zoo_env", "transformers", "shared_groups",
           "on_device", "to_dev", "assert_same", "assert_grads", "assert_state",
           "train_side_by_side", "eval_mode", "seeded", "optimizer", "zoo_cache_dir"]
