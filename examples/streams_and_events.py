"""Streams and events on mps_ext: timing a workload, and a two-stream pipeline.

Run: python examples/streams_and_events.py

1. Events with enable_timing=True measure device time around a workload.
2. A copy stream moves batch i+1 from pinned host memory to the device
   (non_blocking) while the compute stream works on batch i; events order the
   two streams, record_stream tells the allocator the compute stream used a
   buffer the copy stream allocated. Results are checked against the CPU.
"""

import time

import torch

import torch_mps_ext  # noqa: F401  (registers the mps_ext device)

DEV = "mps_ext"


def check(cond, what):
    if not cond:
        raise SystemExit(f"CHECK FAILED: {what}")
    print(f"  ok: {what}")


def time_a_workload():
    print("1. Timing a workload with events")
    a = torch.randn(384, 384, device=DEV)
    start = torch.mps_ext.Event(enable_timing=True)
    end = torch.mps_ext.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(10):
        a = torch.tanh(a @ a)
    end.record()
    end.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    ms = start.elapsed_time(end)
    print(f"  10 x (384x384 matmul + tanh): {ms:.2f} ms device time, {wall_ms:.2f} ms wall")
    check(ms > 0, "elapsed_time is positive")
    check(ms <= wall_ms + 5, "device time fits in the wall time around it")


def pipeline(batches, weight, copy_stream, overlap=True):
    """Sum of relu(x @ weight) over batches, copies on copy_stream."""
    compute = torch.mps_ext.current_stream()
    results = []

    def load(host):
        with torch.mps_ext.stream(copy_stream):
            dev = host.to(DEV, non_blocking=True)  # queued on copy_stream
            ready = torch.mps_ext.Event()
            ready.record()
        return dev, ready

    nxt = load(batches[0])
    for i in range(len(batches)):
        dev, ready = nxt
        if overlap and i + 1 < len(batches):
            nxt = load(batches[i + 1])  # copies while we compute batch i
        ready.wait(compute)              # compute stream waits for its batch
        dev.record_stream(compute)       # dev was allocated on copy_stream
        out = torch.relu(dev @ weight).sum(dim=1)
        results.append(out.to("cpu", non_blocking=True))  # into pinned memory
        if not overlap and i + 1 < len(batches):
            nxt = load(batches[i + 1])
    done = torch.mps_ext.Event()
    done.record(compute)
    done.synchronize()  # the non_blocking copies back are complete now
    return torch.cat(results)


def two_stream_pipeline():
    print("2. Two-stream pipeline: copy batch i+1 while computing batch i")
    torch.manual_seed(0)
    batches = [torch.randn(1024, 512).pin_memory() for _ in range(8)]
    check(all(b.is_pinned() for b in batches), "host batches are pinned")
    weight_cpu = torch.randn(512, 64)
    weight = weight_cpu.to(DEV)
    copy_stream = torch.mps_ext.Stream()

    expected = torch.cat([torch.relu(b @ weight_cpu).sum(dim=1) for b in batches])
    t0 = time.perf_counter()
    got = pipeline(batches, weight, copy_stream, overlap=True)
    t_pipe = time.perf_counter() - t0
    t0 = time.perf_counter()
    got_serial = pipeline(batches, weight, copy_stream, overlap=False)
    t_serial = time.perf_counter() - t0
    print(f"  pipelined {t_pipe * 1e3:.1f} ms, one batch at a time {t_serial * 1e3:.1f} ms")
    check(torch.allclose(got, expected, rtol=1e-4, atol=1e-3), "pipelined results match the CPU")
    check(torch.allclose(got_serial, expected, rtol=1e-4, atol=1e-3), "serial results match the CPU")
    check(copy_stream.query(), "copy stream has drained")

    # The consumer really waits: a copy held back on the copy stream
    # (_sleep queues device time) is still seen by the compute stream.
    host = torch.full((1 << 16,), 2.0).pin_memory()
    dev = torch.zeros(1 << 16, device=DEV)
    with torch.mps_ext.stream(copy_stream):
        torch.mps_ext._sleep(50_000_000)  # 50 ms of queued work
        dev.copy_(host, non_blocking=True)
    check(not copy_stream.query(), "the delayed copy is still pending")
    torch.mps_ext.current_stream().wait_stream(copy_stream)
    check(dev.sum().item() == 2.0 * (1 << 16), "wait_stream orders the consumer after the copy")


if __name__ == "__main__":
    time_a_workload()
    two_stream_pipeline()
    torch.mps_ext.synchronize()
    print("all checks passed")
