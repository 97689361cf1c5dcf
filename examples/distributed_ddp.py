"""Data-parallel training across processes on mps_ext: torch.distributed + DDP.

    torchrun --nproc-per-node 2 examples/distributed_ddp.py
    python examples/distributed_ddp.py        (runs the torchrun line above)

`init_process_group()` with no backend takes the accelerator's: mps_ext's is
the "mps_ext" c10d backend, collectives on gloo over the device memory. Each
process trains the same model on its shard of the batch; DDP averages the
gradients, so after training every rank holds the weights one process gets
by training on the whole batch. The example checks exactly that.

Across machines, start the same script with torchrun's --nnodes/--node-rank/
--master-addr options: gloo talks TCP.
"""

import os
import subprocess
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

if not hasattr(torch, "mps_ext"):  # running from a source tree without installing
    import torch_mps_ext  # noqa: F401


def make_model():
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 3))


def train(model, x, y, steps=20):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return loss.item()


def main():
    dist.init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("mps_ext")

    g = torch.Generator().manual_seed(0)  # the same data on every rank
    x = torch.randn(256, 16, generator=g)
    y = (x[:, :8].sum(1) > 0).long() + (x[:, 8:].sum(1) > 0).long()
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)

    torch.manual_seed(rank)  # different initial weights: DDP starts all from rank 0's
    model = DDP(make_model().to(device))
    loss = train(model, x[shard].to(device), y[shard].to(device))
    print(f"rank {rank} of {world}: cross-entropy loss on its shard of the batch {loss:.4f}",
          flush=True)  # one write: the ranks share the terminal

    # One process, CPU, whole batch, rank 0's initial weights.
    torch.manual_seed(0)
    reference = make_model()
    train(reference, x, y)
    diff = max((p.detach().cpu() - r.detach()).abs().max().item()
               for p, r in zip(model.module.parameters(), reference.parameters()))
    worst = torch.tensor([diff], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"largest absolute weight difference from single-process training: "
              f"{worst.item():.2e}")
    assert worst.item() < 1e-5, worst.item()
    dist.destroy_process_group()


if __name__ == "__main__":
    if "LOCAL_RANK" in os.environ:  # started by torchrun
        main()
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--standalone", os.path.abspath(__file__)]
        print("$", " ".join(["torchrun"] + cmd[3:]), flush=True)
        sys.exit(subprocess.run(cmd).returncode)
