"""One rank of tests/test_distributed.py, started by torchrun with one mps_ext
device per process (TORCH_MPS_EXT_DEVICE_COUNT=2, rank r on mps_ext:r).

`distributed_worker.py CKPT`: runs every collective on mps_ext tensors
through the public torch.distributed API and checks each result against what
the ranks' inputs imply; then torch's functional collectives, DeviceMesh,
DTensor, tensor parallelism and FSDP2 against single-process results, and
saves an FSDP2 checkpoint (torch.distributed.checkpoint) into CKPT.
`distributed_worker.py CKPT resume`: a restart that loads that checkpoint
and trains on. Prints `rank <r> ok <names>` when all hold."""

import datetime
import os
import sys

import torch
import torch.distributed as dist

import torch_mps_ext  # noqa: F401

CKPT = sys.argv[1]
PHASE = sys.argv[2] if len(sys.argv) > 2 else "main"
torch.mps_ext.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group()  # mps_ext is the accelerator: its backend
rank, world = dist.get_rank(), dist.get_world_size()
dev = torch.device("mps_ext", int(os.environ["LOCAL_RANK"]))  # its own device
checked = []


def check(name, got, want):
    got = got.cpu() if isinstance(got, torch.Tensor) else torch.stack([g.cpu() for g in got])
    assert torch.equal(got, want), f"{name}: rank {rank} got {got}, want {want}"
    if name not in checked:
        checked.append(name)


def close(name, got, want, atol=1e-5):
    torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
    if name not in checked:
        checked.append(name)


def finish():
    # One write per line: the ranks share the pipe, and print() writes the
    # newline separately.
    sys.stdout.write(f"rank {rank} ok {' '.join(checked)}\n")
    sys.stdout.flush()


# FSDP2 (torch.distributed.fsdp.fully_shard): a small MLP trained with Adam
# on a batch split between the ranks, against the same MLP trained on the
# whole batch in one process on CPU.
def make_mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                               torch.nn.ReLU(), torch.nn.Linear(32, 4))


def batch(step):  # the whole batch of a step: the same on every rank
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)


def shard_of(t):
    n = len(t) // world
    return t[rank * n:(rank + 1) * n]


def fsdp_mlp(seed, mesh, **kwargs):
    from torch.distributed.fsdp import fully_shard
    model = make_mlp(seed).to(dev)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train(model, opt, steps, sharded, compute_dtype=None):
    """Adam steps; compute_dtype: the unsharded model computing with its
    parameters and input cast to that dtype, as FSDP2's mixed precision."""
    for step in steps:
        x, y = batch(step)
        if sharded:
            x, y = shard_of(x).to(dev), shard_of(y).to(dev)
        if compute_dtype is None:
            out = model(x)
        else:
            params = {n: p.to(compute_dtype) for n, p in model.named_parameters()}
            out = torch.func.functional_call(model, params, (x.to(compute_dtype),))
        torch.nn.functional.mse_loss(out.float(), y).backward()
        opt.step()
        opt.zero_grad()


def reference(steps):
    model = make_mlp(1)
    train(model, torch.optim.Adam(model.parameters(), lr=1e-2), steps, sharded=False)
    return [p.detach() for p in model.parameters()]


def full_params(model):
    return [p.full_tensor().cpu() for p in model.parameters()]


def state_dicts(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd}


def resume():
    # A new process group, a model with other initial weights: the
    # checkpoint brings back the weights and Adam's state of step 4, and two
    # more steps land where uninterrupted single-process training does.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    model, opt = fsdp_mlp(7, init_device_mesh("mps_ext", (world,)))
    sd = state_dicts(model, opt)
    dcp.load(sd, checkpoint_id=CKPT)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    saved = torch.load(os.path.join(CKPT, f"params_rank{rank}.pt"))
    for got, want in zip(full_params(model), saved, strict=True):
        check("dcp_load", got, want)  # exactly the weights that were saved
    train(model, opt, range(4, 6), sharded=True)
    for got, want in zip(full_params(model), reference(range(6)), strict=True):
        close("dcp_resume_training", got, want)


if PHASE == "resume":
    resume()
    dist.destroy_process_group()
    finish()
    sys.exit(0)

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
future = work.get_future()
work.wait()
check("all_reduce_async_int", t, torch.arange(4) * sum(range(1, world + 1)))
# The work reports the device tensor (gloo's result is its host alias).
for got in (future.wait()[0], work.result()[0]):
    assert got.device == dev and got.data_ptr() == t.data_ptr(), got
checked.append("work_results_on_device")

# A strided view: whatever gloo does with one on CPU (it reads and writes
# numel() elements from the view's first one), it does on mps_ext.
results = {}
for d in ("cpu", dev):
    base = torch.stack([torch.full((4,), rank + 1.0), torch.full((4,), 100.0 * rank)], 1).to(d)
    dist.all_reduce(base[:, 0])
    results[torch.device(d).type] = base.cpu()
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

# Once a collective has been waited for, gloo's threads hold nothing of it:
# the last references to the tensors are the caller's, released where the
# GIL can be taken (a gloo thread releasing a tensor whose Python object it
# kept alive, while the interpreter shuts down, aborts the process). Without
# the wait for gloo's release, about a third of these were still held.
held = 0
for i in range(200):
    t = torch.full((1,), float(rank))
    if i % 2:
        dist.broadcast(t, 0)
    else:
        work = dist.all_reduce(t, async_op=True)
        work.wait()
        del work
    held += t._use_count() != 1
check("cpu_tensors_released_by_the_waiter", torch.tensor(held), torch.tensor(0))

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
dist.monitored_barrier(timeout=datetime.timedelta(seconds=60), wait_all_ranks=True)
checked.append("barriers")

# torch's functional collectives (what DTensor and FSDP2 use) find the
# backend by the tensors' device type.
import torch.distributed._functional_collectives as funcol  # noqa: E402

x = torch.arange(4.0, device=dev) + 10 * rank
check("funcol_all_reduce", funcol.all_reduce(x, "sum", pg),
      sum(torch.arange(4.0) + 10 * r for r in range(world)))
check("funcol_all_gather", funcol.all_gather_tensor(x, 0, pg),
      torch.cat([torch.arange(4.0) + 10 * r for r in range(world)]))
check("funcol_reduce_scatter", funcol.reduce_scatter_tensor(x, "sum", 0, pg),
      sum(torch.arange(4.0) + 10 * r for r in range(world)).chunk(world)[rank])
got = funcol.all_to_all_single(x, None, None, pg)
check("funcol_all_to_all", got, torch.cat([(torch.arange(4.0) + 10 * r).chunk(world)[rank]
                                           for r in range(world)]))

# DeviceMesh, both ways, 1-D and 2-D; each dimension's group is an mps_ext
# group (collectives on it land in device tensors).
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: E402

mesh = init_device_mesh("mps_ext", (world,))
mesh_2d = init_device_mesh("mps_ext", (world, 1), mesh_dim_names=("dp", "tp"))
by_name = init_device_mesh(device_type="mps_ext", mesh_shape=(world,))
built = DeviceMesh("mps_ext", list(range(world)))
built_2d = DeviceMesh("mps_ext", [[r] for r in range(world)], mesh_dim_names=("dp", "tp"))
for m in (mesh, mesh_2d, by_name, built, built_2d):
    assert type(m.device_type) is str and m.device_type == "mps_ext", m.device_type
    assert m.get_coordinate()[0] == rank, (m, m.get_coordinate())
for m, dim in ((mesh, 0), (mesh_2d, "dp"), (built, 0), (built_2d, "dp")):
    t = torch.full((2,), rank + 1.0, device=dev)
    dist.all_reduce(t, group=m.get_group(dim))
    check("device_mesh", t, torch.full((2,), sum(range(1, world + 1)) * 1.0))
t = torch.full((2,), rank + 1.0, device=dev)
dist.all_reduce(t, group=mesh_2d.get_group("tp"))  # one rank per tp group
check("device_mesh_2d", t, torch.full((2,), rank + 1.0))
try:
    init_device_mesh("mps_ext:0", (world,))  # torch's own check still holds
    raise AssertionError("init_device_mesh accepted a device with an index")
except RuntimeError as e:
    assert "Device type with index is not supported but got mps_ext:0" in str(e), e
checked.append("device_mesh_errors")

# DTensor: sharded and replicated tensors on the mesh, ops through the
# device's kernels, results equal to the same computation in one process.
from torch.distributed.tensor import (DTensor, Partial, Replicate, Shard,  # noqa: E402
                                      distribute_tensor)

torch.manual_seed(0)
a, b = torch.randn(8, 6), torch.randn(6, 4)
da = distribute_tensor(a.to(dev), mesh, [Shard(0)])
assert da.to_local().device == dev and da.to_local().shape == (8 // world, 6)
check("dtensor_shard", da.to_local(), a.chunk(world)[rank])
c = da @ distribute_tensor(b.to(dev), mesh, [Replicate()])  # row-sharded matmul
assert c.placements == (Shard(0),), c.placements
close("dtensor_matmul", c.full_tensor(), a @ b)
c = distribute_tensor(a.to(dev), mesh, [Shard(1)]) @ distribute_tensor(b.to(dev), mesh, [Shard(0)])
assert c.placements == (Partial(),), c.placements  # contracted dimension sharded
c = c.redistribute(mesh, [Shard(1)])  # reduce-scatter
assert c.to_local().shape == (8, 4 // world)
close("dtensor_redistribute", c.full_tensor(), a @ b)
r = (da.relu() * 2 + 1).sum(dim=0)  # pointwise and a reduction across shards
assert isinstance(r, DTensor) and r.to_local().device == dev
close("dtensor_ops", r.full_tensor(), (a.relu() * 2 + 1).sum(dim=0))
# Random DTensors (torch's RNG tracker over the device's Philox generator):
# one tensor, every shard its own part of it, the same on every rank.
import torch.distributed.tensor as dtensor  # noqa: E402

rand = dtensor.randn(8, 4, device_mesh=mesh, placements=[Shard(0)]).full_tensor().cpu()
everyone = [None] * world
dist.all_gather_object(everyone, rand)
assert all(torch.equal(e, rand) for e in everyone), everyone
assert not torch.equal(rand[:4], rand[4:]) and rand.std() > 0.5, rand
checked.append("dtensor_random")

# Tensor parallelism: a Linear pair split column-wise then row-wise over the
# "tp" dimension of a 2-D mesh (1 x world: sharded; world x 1: whole), equal
# to the unsharded pair in output and gradients.
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,  # noqa: E402
                                               parallelize_module)

for shape in ((1, world), (world, 1)):
    tp_mesh = init_device_mesh("mps_ext", shape, mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    pair = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    pair.load_state_dict(ref.state_dict())
    pair = parallelize_module(pair.to(dev), tp_mesh["tp"],
                              {"0": ColwiseParallel(), "2": RowwiseParallel()})
    assert pair[0].weight.to_local().shape == (16 // shape[1], 8)
    x = torch.randn(4, 8)
    out = pair(x.to(dev))
    out.sum().backward()
    want = ref(x)
    want.sum().backward()
    close("tensor_parallel", out, want.detach())
    for p, q in zip(pair.parameters(), ref.parameters(), strict=True):
        close("tensor_parallel_grads", p.grad.full_tensor(), q.grad)

# FSDP2, fp32: per layer and on the root, sharded along dim 0 of each
# parameter; after 4 Adam steps equal to single-process training.
from torch.distributed.fsdp import MixedPrecisionPolicy  # noqa: E402

model, opt = fsdp_mlp(1, mesh)
for p in model.parameters():
    assert p.placements == (Shard(0),) and p.to_local().device == dev, p
train(model, opt, range(4), sharded=True)
for got, want in zip(full_params(model), reference(range(4)), strict=True):
    close("fsdp2", got, want)

# fully_shard without a mesh makes one over the default group with
# init_device_mesh (the adapted one, as FSDP imports it by name).
from torch.distributed.fsdp import fully_shard  # noqa: E402

lone = fully_shard(torch.nn.Linear(8, 4).to(dev))
assert lone.weight.device_mesh.device_type == "mps_ext" and lone.weight.device_mesh.size() == world
checked.append("fsdp2_default_mesh")

# ... saved with torch.distributed.checkpoint (loaded by the restart).
import torch.distributed.checkpoint as dcp  # noqa: E402

dcp.save(state_dicts(model, opt), checkpoint_id=CKPT)
torch.save(full_params(model), os.path.join(CKPT, f"params_rank{rank}.pt"))
checked.append("dcp_save")

# FSDP2 with bf16 parameters (MixedPrecisionPolicy): layers compute in
# bf16, the sharded parameters and Adam stay fp32; the result is what one
# process computing in bf16 gets, within bf16's precision, and not fp32's.
seen = set()
model, opt = fsdp_mlp(1, mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
for layer in model:
    if isinstance(layer, torch.nn.Linear):
        layer.register_forward_pre_hook(lambda m, args: seen.add((m.weight.dtype, args[0].dtype)))
train(model, opt, range(4), sharded=True)
assert seen == {(torch.bfloat16, torch.bfloat16)}, seen
assert all(p.dtype == torch.float32 for p in model.parameters())
emulated = make_mlp(1)
train(emulated, torch.optim.Adam(emulated.parameters(), lr=1e-2), range(4), sharded=False,
      compute_dtype=torch.bfloat16)
bf16 = full_params(model)
for got, want in zip(bf16, emulated.parameters(), strict=True):
    close("fsdp2_bf16", got, want.detach(), atol=1e-2)
assert max((g - w).abs().max() for g, w in zip(bf16, reference(range(4)))) > 1e-4

# Last: a rank that never arrives. dist.monitored_barrier names it.
if rank == 0:
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=2))
        raise AssertionError("monitored_barrier passed without rank 1")
    except RuntimeError as e:
        assert "Rank 1 failed to pass monitoredBarrier in 2000 ms" in str(e), e
    checked.append("monitored_barrier_names_missing_rank")
else:
    finish()
dist.destroy_process_group()
if rank == 0:
    finish()
