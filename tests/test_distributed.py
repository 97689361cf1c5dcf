"""torch.distributed on mps_ext: the "mps_ext" c10d backend (gloo over the
device memory), through the public API, in real processes started by
torchrun."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch without distributed/gloo")


def torchrun(script, nproc=2, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", script],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_backend_is_registered_for_the_device():
    assert "mps_ext" in dist.Backend.backend_list
    assert dist.Backend.MPS_EXT == "mps_ext"
    assert dist.get_default_backend_for_device("mps_ext") == "mps_ext"
    assert dist.get_default_backend_for_device("cpu") == "gloo"  # unchanged
    assert sorted(dist.Backend.backend_capability["mps_ext"]) == ["cpu", "mps_ext"]


def test_collectives_across_two_processes():
    out = torchrun(os.path.join(ROOT, "tests", "distributed_worker.py"))
    names = ("all_reduce all_reduce_max all_reduce_async_int strided_view broadcast "
             "all_gather all_gather_single reduce_scatter_single all_to_all_single scatter "
             "all_gather_object after_stream_work cpu_tensor ddp_timings sync_batch_norm "
             "barriers").split()
    lines = {line.split()[1]: line.split()[3:] for line in out.splitlines()
             if line.startswith("rank ")}
    assert sorted(lines) == ["0", "1"], out
    for rank, checked in lines.items():
        assert set(names) <= set(checked), (rank, checked)
    assert "reduce" in lines["0"] and "gather" in lines["0"]
    assert "send_recv" in lines["1"]


def test_host_alias_keeps_memory_and_refuses_cpu_tensors():
    t = torch.arange(6.0, device="mps_ext").view(2, 3).t()
    alias = torch.ops.mps_ext._host_alias(t)
    assert alias.device.type == "cpu" and alias.stride() == t.stride()
    alias[0, 0] = 100.0
    assert t[0, 0].item() == 100.0  # the same memory
    del t
    assert alias[0, 0].item() == 100.0 and alias[2, 1].item() == 5.0  # still alive
    with pytest.raises(RuntimeError,
                       match="_host_alias: expected an mps_ext tensor, got a tensor on cpu"):
        torch.ops.mps_ext._host_alias(torch.ones(2))


def test_gloo_backend_alone_refuses_mps_ext_tensors():
    # init_process_group("gloo") does not cover mps_ext: torch's own error.
    code = """
import torch, torch_mps_ext, torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
try:
    dist.all_reduce(torch.ones(2, device="mps_ext"))
except RuntimeError as e:
    print("RuntimeError:", e)
"""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert "RuntimeError: No backend type associated with device type mps_ext" in proc.stdout, \
        proc.stdout + proc.stderr
