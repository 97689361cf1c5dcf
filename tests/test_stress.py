"""Concurrency stress (issue 17 item 7): 8 Python threads on 2 devices at once.

Each thread, in a process with TORCH_MPS_EXT_DEVICE_COUNT=2, takes turns on
both devices, and on each device on its own side stream and on the default
stream. Every iteration allocates, copies in (synchronously and non_blocking
from pinned memory behind queued device time), runs fallback and native ops,
moves data between the devices, records and waits on events, uses a tensor on
another stream (record_stream), copies back non_blocking, synchronizes, and
checks every result against the same computation on CPU (bit-equal: the
device runs CPU's kernels on the same bytes). Random numbers are checked by
reproducibility: a private generator seeded with s yields, on any device,
stream and thread, exactly what it yielded for s in the main thread before
the threads started. The devices' default generators are shared by all
threads: their draws must all differ and their offsets must advance by
exactly the blocks the draws took (docs/random.md), so no reservation was
lost to a race. At the end the allocated memory of both devices is back to
where it started.

The stress runs for a fixed number of iterations (a few seconds here), with a
soft deadline that stops the threads early on a slow machine (each thread must
still complete a minimum) and faulthandler dumping every thread's stack if the
process hangs.
"""

import json
import time

from conftest import run_python

THREADS = 8
ITERATIONS = 200         # per thread
MIN_ITERATIONS = 20      # per thread, when the soft deadline stopped it early
SOFT_DEADLINE_S = 20.0
HANG_DUMP_S = 60.0

STRESS = r"""
import faulthandler, gc, json, math, sys, threading, time, traceback
import torch
import torch.nn.functional as F
import torch_mps_ext

faulthandler.dump_traceback_later(HANG_DUMP_S, exit=True)
assert torch.mps_ext.device_count() == 2
DEVS = [torch.device("mps_ext", 0), torch.device("mps_ext", 1)]


def draws(gen, device):
    # One fixed sequence of random ops on a private generator.
    return [
        torch.randn(1000, generator=gen, device=device),
        torch.rand(70_000, generator=gen, device=device),  # parallel chunks
        torch.rand(257, dtype=torch.float64, generator=gen, device=device),
        torch.randint(-50, 50, (300,), generator=gen, device=device),
        torch.bernoulli(torch.full((129,), 0.3, device=device), generator=gen),
        torch.empty(64, 3, device=device).normal_(2.0, 0.5, generator=gen),
        torch.randperm(77, generator=gen, device=device),
        torch.multinomial(torch.arange(1.0, 9.0, device=device), 5, generator=gen),
        torch.empty(40, 33, device=device).t().uniform_(-1, 1, generator=gen),
    ]


SEEDS = list(range(100, 100 + 16))
REFERENCE = {}
for s in SEEDS:
    g = torch.Generator(device=DEVS[0]).manual_seed(s)
    REFERENCE[s] = [t.cpu() for t in draws(g, DEVS[0])]
    del g
DEFAULT_DRAW = 64  # float32 elements per default-generator draw: 16 blocks

torch.mps_ext.synchronize(0)
torch.mps_ext.synchronize(1)
gc.collect()
baseline = [torch.mps_ext.memory_allocated(i) for i in range(2)]
torch.mps_ext.manual_seed_all(7)
offsets_before = [int.from_bytes(bytes(torch.mps_ext.get_rng_state(i)[8:].tolist()), "little")
                  for i in range(2)]

errors = []
done = [0] * THREADS
default_draws = [[] for _ in range(2)]
draws_lock = threading.Lock()
start_barrier = threading.Barrier(THREADS)
deadline = [None]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def equal(dev_tensor, cpu_tensor, what):
    got = dev_tensor.cpu()
    check(dev_tensor.device.type == "mps_ext", f"{what}: on {dev_tensor.device}")
    check(got.dtype == cpu_tensor.dtype and got.shape == cpu_tensor.shape,
          f"{what}: {got.dtype}{tuple(got.shape)} vs {cpu_tensor.dtype}{tuple(cpu_tensor.shape)}")
    check(torch.equal(got, cpu_tensor), f"{what}: values differ from CPU")


def iteration(tid, it, side, cpu_gen):
    d = (tid + it) % 2
    dev = DEVS[d]
    other = DEVS[1 - d]
    use_side = (it // 2) % 2 == 0
    stream = side[d] if use_side else torch.mps_ext.default_stream(d)
    torch.mps_ext.set_device(d)
    check(torch.mps_ext.current_device() == d, "current device is per thread")
    m, k, n = (int(x) for x in torch.randint(1, 48, (3,), generator=cpu_gen))
    a = torch.randn(m, k, generator=cpu_gen)
    b = torch.randn(k, n, generator=cpu_gen)
    idx = torch.randint(0, m, (2 * m + 1,), generator=cpu_gen)
    big = torch.randn(256, 384, generator=cpu_gen)  # above the intra-op grain
    with torch.mps_ext.stream(stream):
        check(torch.mps_ext.current_stream() == stream, "stream context")
        # Copy in: a synchronously, b non_blocking from pinned memory behind
        # queued device time (ops drain the stream, so they see b's bytes).
        da = a.to("mps_ext")  # the current device
        check(da.device == dev, f"'mps_ext' is the current device {dev}")
        pb = b.pin_memory()
        torch.mps_ext._sleep(50_000)  # 50 us of queued device time
        db = pb.to(dev, non_blocking=True)
        ready = torch.mps_ext.Event()
        ready.record()
        di = idx.to(dev)
        dbig = big.to(dev)
        # Fallback (CPU kernels on host views) and native (HotOps) ops.
        equal(da @ db, a @ b, "matmul")
        equal((da + 1.5) * da.relu() - da / 3, (a + 1.5) * a.relu() - a / 3, "pointwise")
        equal(da.sum(0), a.sum(0), "sum")
        equal(dbig.exp().sum(1), big.exp().sum(1), "large pointwise and reduction")
        equal(F.softmax(da, dim=-1), F.softmax(a, dim=-1), "softmax")
        equal(torch.cat([da, da.t().contiguous().t() * 2], 1), torch.cat([a, a * 2], 1), "cat")
        equal(da[di], a[idx], "index")
        equal(torch.sort(da, dim=0).values, torch.sort(a, dim=0).values, "sort")
        acc = torch.zeros(m, k, device=dev)
        acc.index_add_(0, di, da[di])
        acc_cpu = torch.zeros(m, k).index_add_(0, idx, a[idx])
        equal(acc, acc_cpu, "index_add_")
        c = da.clone()
        c.mul_(2).add_(da[:1])  # in place, broadcast row
        equal(c, a * 2 + a[:1], "in place")
        # Cross-device copies, both ways.
        moved = (da * 3).to(other)
        check(moved.device == other, "to(other device)")
        equal(moved.to(dev), a * 3, "device round trip")
        equal(moved, a * 3, "on the other device")
    # The default stream waits for the side stream's copy, then computes.
    default = torch.mps_ext.default_stream(d)
    ready.wait(default)
    with torch.mps_ext.stream(default):
        total = db.sum()
    # A tensor made on one stream used on another: record_stream keeps its
    # block from being reused until that stream passed this use.
    consumer = side[d] if not use_side else default
    shared = torch.full((4096,), float(it), device=dev)
    with torch.mps_ext.stream(consumer):
        torch.mps_ext._sleep(20_000)
        shared.record_stream(consumer)
        res = shared * 2
        back = torch.empty(4096, pin_memory=True)
        back.copy_(res, non_blocking=True)
    del shared
    overwrite = torch.full((4096,), -1.0, device=dev)  # may take a freed block
    consumer.synchronize()
    check(torch.equal(back, torch.full((4096,), 2.0 * it)), "non_blocking copy back")
    check(torch.equal(total.cpu(), b.sum()), "sum after event wait")
    ev = torch.Event("mps_ext") if it % 3 == 0 else torch.mps_ext.Event(enable_timing=True)
    with torch.mps_ext.stream(stream):
        ev.record()
    ev.synchronize()
    check(ev.query(), "event completed after synchronize")
    del overwrite
    # Random numbers: a private generator reproduces the main thread's values
    # on whichever device and stream this is.
    seed = SEEDS[(tid * 7 + it) % len(SEEDS)]
    with torch.mps_ext.stream(stream):
        g = torch.Generator(device=dev).manual_seed(seed)
        for i, (x, ref) in enumerate(zip(draws(g, dev), REFERENCE[seed])):
            check(x.device == dev, f"draw {i} device")
            check(torch.equal(x.cpu(), ref), f"draw {i} of seed {seed} not reproduced")
        # The shared default generator: kept for the end's checks.
        r = torch.rand(DEFAULT_DRAW, device=dev)
        check(bool(((r >= 0) & (r < 1)).all()), "rand range")
        with draws_lock:
            default_draws[d].append(r.cpu())
    if it % 4 == 3:
        torch.mps_ext.synchronize(d)


def worker(tid):
    try:
        side = [torch.mps_ext.Stream(device=i) for i in range(2)]
        cpu_gen = torch.Generator().manual_seed(1000 + tid)
        start_barrier.wait()
        for it in range(ITERATIONS):
            if time.monotonic() > deadline[0]:
                break
            iteration(tid, it, side, cpu_gen)
            done[tid] += 1
        for i in range(2):
            torch.mps_ext.synchronize(i)
    except BaseException:
        errors.append(f"thread {tid}, iteration {done[tid]}:\n{traceback.format_exc()}")


threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
start = time.monotonic()
deadline[0] = start + SOFT_DEADLINE_S
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.monotonic() - start
check(torch.mps_ext.current_device() == 0, "the main thread's device is its own")
torch.mps_ext.synchronize(0)
torch.mps_ext.synchronize(1)
offsets_after = [int.from_bytes(bytes(torch.mps_ext.get_rng_state(i)[8:].tolist()), "little")
                 for i in range(2)]
seen = [len({tuple(r[:4].tolist()) for r in default_draws[i]}) for i in range(2)]
default_draws = None
gc.collect()
after = [torch.mps_ext.memory_allocated(i) for i in range(2)]
print(json.dumps({"errors": errors, "done": done, "elapsed": elapsed,
                  "baseline": baseline, "after": after,
                  "draws": [seen, offsets_before, offsets_after]}))
"""


def test_threads_streams_devices_against_cpu():
    code = (f"THREADS, ITERATIONS, SOFT_DEADLINE_S, HANG_DUMP_S = "
            f"{THREADS}, {ITERATIONS}, {SOFT_DEADLINE_S}, {HANG_DUMP_S}\n" + STRESS)
    t0 = time.monotonic()
    proc = run_python(code, env={"TORCH_MPS_EXT_DEVICE_COUNT": "2"},
                      timeout=HANG_DUMP_S + 60)
    wall = time.monotonic() - t0
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["errors"], "\n".join(result["errors"])
    assert min(result["done"]) >= MIN_ITERATIONS, (
        f"iterations per thread {result['done']} in {result['elapsed']:.1f} s")
    assert result["after"] == result["baseline"], (
        f"allocated bytes per device before {result['baseline']}, after {result['after']}")
    # Every draw from a shared default generator was distinct, and its offset
    # moved by exactly the blocks those draws reserved (64 words = 16 blocks).
    seen, before, after = result["draws"]
    for d in range(2):
        n = sum(done // 2 + (done % 2 if (tid % 2) == d else 0)
                for tid, done in enumerate(result["done"]))
        assert seen[d] == n, f"mps_ext:{d}: {n} draws, {seen[d]} distinct"
        assert after[d] - before[d] == 16 * n, f"mps_ext:{d}: offset {before[d]} -> {after[d]}"
    assert wall < 60, f"stress took {wall:.1f} s"
