"""Sharded data-parallel training on mps_ext with FSDP2, checkpointed and resumed.

    python examples/fsdp2_train.py            (runs the two torchrun lines below)
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --checkpoint DIR
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --checkpoint DIR --resume

Each process drives one mps_ext device (TORCH_MPS_EXT_DEVICE_COUNT=2 gives a
process two; rank r takes mps_ext:r). `init_device_mesh("mps_ext", ...)`
makes the mesh, `fully_shard` shards each block and then the root along the
mesh (each rank holds half of every parameter and of Adam's state), and the
"mps_ext" c10d backend all-gathers parameters and reduce-scatters gradients
over the device memory. The first run trains 5 steps and saves a
torch.distributed.checkpoint; the second, a restart, loads it and trains 5
more. The result is checked against one process training on the whole batch
for 10 steps.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

if not hasattr(torch, "mps_ext"):  # running from a source tree without installing
    import torch_mps_ext  # noqa: F401

STEPS_PER_RUN = 5


def make_model():
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU()) for _ in range(3)]
    return torch.nn.Sequential(*blocks, torch.nn.Linear(32, 4))


def batch(step):
    """The whole batch of a step (every rank makes the same one)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(64, 32, generator=g)
    return x, x[:, :4].sin() + x[:, 4:8].cos()


def train(model, opt, steps, shard=lambda t: t, device="cpu"):
    loss = None
    for step in steps:
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(shard(x).to(device)), shard(y).to(device))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


def main(checkpoint, resume):
    torch.mps_ext.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group()  # mps_ext is the accelerator: its backend
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("mps_ext", (world,))

    model = make_model().to("mps_ext")
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    first = STEPS_PER_RUN if resume else 0
    if resume:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def shard(t):  # this rank's rows of the batch
        n = len(t) // world
        return t[rank * n:(rank + 1) * n]

    loss = train(model, opt, range(first, first + STEPS_PER_RUN), shard, "mps_ext")
    local = model[0][0].weight.to_local()
    # One write per line: the ranks share the terminal.
    sys.stdout.write(f"rank {rank}: steps {first}-{first + STEPS_PER_RUN - 1}, loss on its "
                     f"shard {loss:.4f}; holds {tuple(local.shape)} of "
                     f"{tuple(model[0][0].weight.shape)} on {local.device}\n")
    sys.stdout.flush()

    if not resume:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    else:
        # One process, CPU, whole batch, 10 steps without a restart.
        reference = make_model()
        train(reference, torch.optim.Adam(reference.parameters(), lr=1e-3),
              range(2 * STEPS_PER_RUN))
        diff = max((p.full_tensor().cpu() - r.detach()).abs().max().item()
                   for p, r in zip(model.parameters(), reference.parameters()))
        if rank == 0:
            print(f"largest absolute weight difference from single-process training: "
                  f"{diff:.2e}", flush=True)
        assert diff < 1e-5, diff
    dist.destroy_process_group()


if __name__ == "__main__":
    if "LOCAL_RANK" in os.environ:  # started by torchrun
        parser = argparse.ArgumentParser()
        parser.add_argument("--checkpoint", required=True)
        parser.add_argument("--resume", action="store_true")
        args = parser.parse_args()
        main(args.checkpoint, args.resume)
    else:
        ckpt = tempfile.mkdtemp(prefix="fsdp2_ckpt_")
        env = dict(os.environ, TORCH_MPS_EXT_DEVICE_COUNT="2")
        try:
            for extra in ([], ["--resume"]):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                       "--standalone", os.path.abspath(__file__), "--checkpoint", ckpt, *extra]
                print("$", " ".join(["torchrun"] + cmd[3:]), flush=True)
                rc = subprocess.run(cmd, env=env).returncode
                if rc != 0:
                    sys.exit(rc)
        finally:
            shutil.rmtree(ckpt, ignore_errors=True)
