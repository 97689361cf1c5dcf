"""torch.distributed on mps_ext: the "mps_ext" c10d backend (a C++ backend,
gloo over the device memory), through the public API, in real processes
started by torchrun: collectives, functional collectives, DeviceMesh,
DTensor, tensor parallelism, FSDP2 and its checkpoints across a restart."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch without distributed/gloo")


def torchrun(*args, nproc=2, timeout=300):
    """Runs tests/distributed_worker.py with `args` on `nproc` processes, one
    mps_ext device each; returns {rank: names of the checks that held}."""
    env = dict(os.environ, TORCH_MPS_EXT_DEVICE_COUNT=str(nproc),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", os.path.join(ROOT, "tests", "distributed_worker.py"),
         *map(str, args)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    lines = {line.split()[1]: line.split()[3:] for line in proc.stdout.splitlines()
             if line.startswith("rank ")}
    assert sorted(lines) == [str(r) for r in range(nproc)], proc.stdout
    return lines


def test_backend_is_registered_for_the_device():
    assert "mps_ext" in dist.Backend.backend_list
    assert dist.Backend.MPS_EXT == "mps_ext"
    assert dist.get_default_backend_for_device("mps_ext") == "mps_ext"
    assert dist.get_default_backend_for_device("cpu") == "gloo"  # unchanged
    assert sorted(dist.Backend.backend_capability["mps_ext"]) == ["cpu", "mps_ext"]


def test_two_processes_collectives_sharding_and_a_restart(tmp_path):
    # One launch runs every check of the worker; the second is a restart
    # that loads the FSDP2 checkpoint the first saved and trains on.
    ckpt = tmp_path / "ckpt"
    lines = torchrun(ckpt)
    names = ("all_reduce all_reduce_max all_reduce_async_int work_results_on_device "
             "strided_view broadcast "
             "all_gather all_gather_single reduce_scatter_single all_to_all_single scatter "
             "all_gather_object after_stream_work cpu_tensor cpu_tensors_released_by_the_waiter "
             "ddp_timings sync_batch_norm "
             "barriers funcol_all_reduce funcol_all_gather funcol_reduce_scatter "
             "funcol_all_to_all device_mesh device_mesh_2d device_mesh_errors dtensor_shard "
             "dtensor_matmul dtensor_redistribute dtensor_ops dtensor_random tensor_parallel "
             "tensor_parallel_grads fsdp2 fsdp2_default_mesh dcp_save fsdp2_bf16").split()
    for rank, checked in lines.items():
        assert set(names) <= set(checked), (rank, sorted(set(names) - set(checked)))
    assert "reduce" in lines["0"] and "gather" in lines["0"]
    assert "monitored_barrier_names_missing_rank" in lines["0"]
    assert "send_recv" in lines["1"]
    assert (ckpt / ".metadata").exists()

    lines = torchrun(ckpt, "resume")
    for rank, checked in lines.items():
        assert checked == ["dcp_load", "dcp_resume_training"], (rank, checked)


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
    # What _compat adapts for mps_ext leaves gloo groups and CPU meshes to
    # torch: monitored_barrier and init_device_mesh work as they did.
    code = """
import torch, torch_mps_ext, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
dist.monitored_barrier()
print("cpu mesh", init_device_mesh("cpu", (1,)).device_type)
try:
    dist.all_reduce(torch.ones(2, device="mps_ext"))
except RuntimeError as e:
    print("RuntimeError:", e)
"""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert "cpu mesh cpu\n" in proc.stdout, proc.stdout + proc.stderr
    assert "RuntimeError: No backend type associated with device type mps_ext" in proc.stdout, \
        proc.stdout + proc.stderr


def test_process_group_operator_refuses_a_group_without_its_cpu_backend():
    # torch_mps_ext.distributed builds the "mps_ext" group from a group with
    # gloo for CPU tensors; anything else is refused with a clear error.
    from torch._C._distributed_c10d import HashStore, ProcessGroup
    plain = ProcessGroup(HashStore(), 0, 1)
    with pytest.raises(RuntimeError, match="mps_ext process group: expected a group with one "
                                           "backend, for CPU tensors"):
        torch.ops.mps_ext._process_group(plain.boxed())
