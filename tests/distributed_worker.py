"""One rank of tests/test_distributed.py, started by torchrun: runs every
collective on mps_ext tensors through the public torch.distributed API and
checks each result against what the ranks' inputs imply. Prints
`rank <r> ok <names>` when all hold."""

import datetime
import sys

import torch
import torch.distributed as dist

import torch_mps_ext  # noqa: F401

dist.init_process_group()  # mps_ext is the accelerator: its backend
rank, world = dist.get_rank(), dist.get_world_size()
dev = torch.device("mps_ext")
checked = []


def check(name, got, want):
    got = got.cpu() if isinstance(got, torch.Tensor) else torch.stack([g.cpu() for g in got])
    assert torch.equal(got, want), f"{name}: rank {rank} got {got}, want {want}"
    checked.append(name)


assert dist.get_backend_config() in ("mps_ext:mps_ext", "undefined"), dist.get_backend_config()
pg = dist.distributed_c10d._get_default_group()
assert pg.name() == "mps_ext", pg.name()

t = torch.full((5,), rank + 1.0, device=dev)
dist.all_reduce(t)
check("all_reduce", t, torch.full((5,), sum(range(1, world + 1)) * 1.0))

t = torch.tensor([rank * 1.0, -rank], device=dev)
dist.all_reduce(t, op=dist.ReduceOp.MAX)
check("all_reduce_max", t, torch.tensor([world - 1.0, 0.0]))

t = torch.arange(4, device=dev) * (rank + 1)  # int64
work = dist.all_reduce(t, async_op=True)
work.wait()
check("all_reduce_async_int", t, torch.arange(4) * sum(range(1, world + 1)))

# A strided view: whatever gloo does with one on CPU (it reads and writes
# numel() elements from the view's first one), it does on mps_ext.
results = {}
for d in ("cpu", dev):
    base = torch.stack([torch.full((4,), rank + 1.0), torch.full((4,), 100.0 * rank)], 1).to(d)
    dist.all_reduce(base[:, 0])
    results[str(d)] = base.cpu()
check("strided_view", results["mps_ext"], results["cpu"])

b = torch.arange(3.0, device=dev) + 10 * rank
dist.broadcast(b, src=world - 1)
check("broadcast", b, torch.arange(3.0) + 10 * (world - 1))

r = torch.full((2,), rank + 1.0, device=dev)
dist.reduce(r, dst=0)
if rank == 0:
    check("reduce", r, torch.full((2,), sum(range(1, world + 1)) * 1.0))

outs = [torch.empty(2, device=dev) for _ in range(world)]
dist.all_gather(outs, torch.full((2,), rank * 10.0, device=dev))
check("all_gather", outs, torch.stack([torch.full((2,), i * 10.0) for i in range(world)]))

o = torch.empty(world * 2, device=dev)
dist.all_gather_single(o, torch.full((2,), rank + 0.5, device=dev))
check("all_gather_single", o, torch.arange(world).repeat_interleave(2) + 0.5)

rs = torch.empty(2, device=dev)
dist.reduce_scatter_single(rs, torch.arange(world * 2.0, device=dev))
check("reduce_scatter_single", rs, (torch.arange(2.0) + 2 * rank) * world)

a2a = torch.empty(world, device=dev)
dist.all_to_all_single(a2a, torch.arange(world, device=dev, dtype=torch.float32) + 100 * rank)
check("all_to_all_single", a2a, torch.arange(world) * 100.0 + rank)

g = [torch.empty(1, device=dev) for _ in range(world)] if rank == 0 else None
dist.gather(torch.tensor([rank * 2.0], device=dev), g, dst=0)
if rank == 0:
    check("gather", g, torch.stack([torch.tensor([i * 2.0]) for i in range(world)]))

s = torch.empty(1, device=dev)
dist.scatter(s, [torch.tensor([i + 7.0], device=dev) for i in range(world)] if rank == 0
             else None, src=0)
check("scatter", s, torch.tensor([rank + 7.0]))

if rank == 0:
    dist.send(torch.tensor([42.0, 43.0], device=dev), dst=1)
elif rank == 1:
    got = torch.zeros(2, device=dev)
    dist.recv(got, src=0)
    check("send_recv", got, torch.tensor([42.0, 43.0]))

objs = [None] * world
dist.all_gather_object(objs, {"rank": rank})
assert objs == [{"rank": i} for i in range(world)], objs
checked.append("all_gather_object")

# A copy still queued on the current stream (behind 20 ms of device time)
# lands before gloo reads the tensor.
side = torch.mps_ext.Stream()
late = torch.zeros(3, device=dev)
src = torch.full((3,), rank + 1.0).pin_memory()
with torch.mps_ext.stream(side):
    torch.mps_ext._sleep(20_000_000)
    late.copy_(src, non_blocking=True)
    dist.all_reduce(late)
check("after_stream_work", late, torch.full((3,), sum(range(1, world + 1)) * 1.0))

c = torch.ones(2)  # CPU tensors in the same group go to gloo as they are
dist.all_reduce(c)
check("cpu_tensor", c, torch.full((2,), float(world)))

# DDP's logging data has device timings (csrc/core/DdpTimer.cpp): without a
# timer for the device type DDP records none (and warns).
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 16).to(dev))
for _ in range(11):  # DDP samples timings in its first iterations
    ddp(torch.randn(8, 16, device=dev)).sum().backward()
stats = ddp._get_ddp_logging_data()
assert stats.get("avg_forward_compute_time", 0) > 0, stats
assert stats.get("avg_backward_compute_time", 0) > 0, stats
checked.append("ddp_timings")

# nn.SyncBatchNorm across the ranks (csrc/aten/SyncBatchNorm.cpp): each rank
# normalizes its shard with the statistics of the whole batch, so outputs,
# gradients and running statistics equal one BatchNorm over the whole batch
# on CPU. Shards differ in size (5 and 3 rows), as the merge weighs counts.
torch.manual_seed(0)
full = torch.randn(8, 4, 3, 3, dtype=torch.float64)
grad = torch.randn(8, 4, 3, 3, dtype=torch.float64)
ref = torch.nn.BatchNorm2d(4, dtype=torch.float64)
with torch.no_grad():
    ref.weight.uniform_(0.5, 1.5)
    ref.bias.uniform_(-0.5, 0.5)
sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
    torch.nn.Sequential(torch.nn.BatchNorm2d(4, dtype=torch.float64))).to(dev)
sync[0].load_state_dict(ref.state_dict())
x_ref = full.clone().requires_grad_()
ref(x_ref).backward(grad)
rows = slice(0, 5) if rank == 0 else slice(5, 8)
x = full[rows].to(dev).requires_grad_()
out = sync(x)
out.backward(grad[rows].to(dev))
dist.all_reduce(sync[0].weight.grad)  # DDP would average; the sum is the full-batch grad
dist.all_reduce(sync[0].bias.grad)
torch.testing.assert_close(out.detach().cpu(), torch.nn.functional.batch_norm(
    full, None, None, ref.weight.detach(), ref.bias.detach(), training=True)[rows])
torch.testing.assert_close(x.grad.cpu(), x_ref.grad[rows])
torch.testing.assert_close(sync[0].weight.grad.cpu(), ref.weight.grad)
torch.testing.assert_close(sync[0].bias.grad.cpu(), ref.bias.grad)
torch.testing.assert_close(sync[0].running_mean.cpu(), ref.running_mean)
torch.testing.assert_close(sync[0].running_var.cpu(), ref.running_var)
checked.append("sync_batch_norm")

dist.barrier()
# dist.monitored_barrier() accepts gloo groups only (by name); the group's
# own method is gloo's.
pg.monitored_barrier(datetime.timedelta(seconds=60), wait_all_ranks=True)
checked.append("barriers")
dist.destroy_process_group()
# One write per line: the ranks share the pipe, and print() writes the
# newline separately.
sys.stdout.write(f"rank {rank} ok {' '.join(checked)}\n")
sys.stdout.flush()
