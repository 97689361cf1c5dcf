"""Whole models on mps_ext give CPU's results."""

import copy

from conftest import run_python

import torch

DEV = "mps_ext"


def _train(model, data, target, device, steps, opt_cls=torch.optim.SGD, **opt_kw):
    model = copy.deepcopy(model).to(device)
    opt = opt_cls(model.parameters(), **opt_kw)
    data, target = data.to(device), target.to(device)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def test_mlp_training_matches_cpu():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 5))
    data = torch.randn(128, 20, generator=g)
    target = torch.randint(0, 5, (128,), generator=g)
    m_cpu, l_cpu = _train(model, data, target, "cpu", 30, lr=0.1, momentum=0.9)
    m_dev, l_dev = _train(model, data, target, DEV, 30, lr=0.1, momentum=0.9)
    assert l_dev[-1] < l_dev[0] * 0.7  # it learns
    torch.testing.assert_close(torch.tensor(l_dev), torch.tensor(l_cpu), rtol=1e-5, atol=1e-6)
    for p_dev, p_cpu in zip(m_dev.parameters(), m_cpu.parameters()):
        assert p_dev.device.type == DEV
        torch.testing.assert_close(p_dev.cpu(), p_cpu, rtol=1e-5, atol=1e-6)


def test_cnn_with_batchnorm_and_adam_matches_cpu():
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    data = torch.randn(16, 3, 12, 12, generator=g)
    target = torch.randint(0, 4, (16,), generator=g)
    m_cpu, l_cpu = _train(model, data, target, "cpu", 8, torch.optim.Adam, lr=1e-2)
    m_dev, l_dev = _train(model, data, target, DEV, 8, torch.optim.Adam, lr=1e-2)
    torch.testing.assert_close(torch.tensor(l_dev), torch.tensor(l_cpu), rtol=1e-4, atol=1e-5)
    bn_cpu, bn_dev = m_cpu[1], m_dev[1]
    torch.testing.assert_close(bn_dev.running_mean.cpu(), bn_cpu.running_mean, rtol=1e-4, atol=1e-5)
    assert bn_dev.num_batches_tracked.item() == 8


def test_training_frees_its_memory():
    torch.mps_ext.empty_cache()
    base = torch.mps_ext.current_allocated_memory()
    model = torch.nn.Linear(256, 256).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        model(torch.ones(32, 256, device=DEV)).square().mean().backward()
        opt.step()
    del model, opt
    assert torch.mps_ext.current_allocated_memory() == base


BACKWARD_THREAD = """
import threading, torch, torch_mps_ext
w = torch.randn(8, 8, device="mps_ext", requires_grad=True)
loss = (w @ w).relu().sum()
threads = []
loss.grad_fn.register_prehook(lambda g: threads.append(threading.get_ident()))
loss.backward()
print(threads == [threading.get_ident()], torch.autograd.is_multithreading_enabled(),
      torch.allclose(w.grad.cpu(), torch.func.grad(lambda v: (v @ v).relu().sum())(w.detach().cpu())))
"""


def test_backward_runs_on_the_calling_thread():
    # mps_ext kernels run on the host: torch's per-device autograd thread
    # would only add hand-offs and a second OpenMP team (torch_mps_ext/_autograd.py).
    out = run_python(BACKWARD_THREAD, env={"TORCH_MPS_EXT_AUTOGRAD_DEVICE_THREAD": None})
    assert out.stdout.split() == ["True", "False", "True"]


def test_device_thread_setting_keeps_torchs_default():
    out = run_python(BACKWARD_THREAD, env={"TORCH_MPS_EXT_AUTOGRAD_DEVICE_THREAD": "1"})
    assert out.stdout.split() == ["False", "True", "True"]
