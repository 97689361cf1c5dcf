"""Streams and events on mps_ext: timing a workload, and a two-stream pipeline.

Run: python examples/streams_and_events.py

1. Events with enable_timing=True measure device time around a workload.
2. A copy stream moves batch i+1 from pinned host memory to the device
   (non_blocking) while the compute stream works on batch i; events order the
   two streams, record_stream tells the allocator the compute stream used a
   buffer the copy stream allocated. Results are checked against the CPU.
   Then the pipeline and the one-batch-at-a-time loop are timed, after a
   warm-up, next to the copies and the compute alone. The streams of this
   emulated device are host threads: overlapping can save at most the copies'
   time, and saves less when the copies and the matmul compete for the cores.
"""

import statistics
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
    got = pipeline(batches, weight, copy_stream, overlap=True)
    got_serial = pipeline(batches, weight, copy_stream, overlap=False)
    check(torch.allclose(got, expected, rtol=1e-4, atol=1e-3), "pipelined results match the CPU")
    check(torch.allclose(got_serial, expected, rtol=1e-4, atol=1e-3), "serial results match the CPU")
    check(copy_stream.query(), "copy stream has drained")

    # Timing. The runs above were the warm-up: the first one pays for the
    # allocator's first blocks and the streams' worker threads. Then both ways
    # in alternating order, the median of each (a machine's other load moves
    # single runs a lot), and the two halves of the work on their own.
    def ms(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def copies_only():
        with torch.mps_ext.stream(copy_stream):
            for b in batches:
                b.to(DEV, non_blocking=True)
        copy_stream.synchronize()

    on_device = [b.to(DEV) for b in batches]

    def compute_only():
        for d in on_device:
            torch.relu(d @ weight).sum(dim=1)
        torch.mps_ext.synchronize()

    copies_only()
    compute_only()
    runs = {"pipelined": [], "serial": [], "copies": [], "compute": []}
    for r in range(7):
        for overlap in ((True, False) if r % 2 else (False, True)):
            runs["pipelined" if overlap else "serial"].append(
                ms(lambda: pipeline(batches, weight, copy_stream, overlap=overlap)))
        runs["copies"].append(ms(copies_only))
        runs["compute"].append(ms(compute_only))
    t = {k: statistics.median(v) for k, v in runs.items()}
    mib = batches[0].numel() * batches[0].element_size() / 2**20
    print(f"  {len(batches)} batches, each a {mib:.0f} MiB copy to the device and a "
          f"{tuple(batches[0].shape)} @ {tuple(weight.shape)} matmul;")
    print("  wall time, median of 7 runs after a warm-up:")
    print(f"    copies alone                                {t['copies']:8.2f} ms")
    print(f"    compute alone                               {t['compute']:8.2f} ms")
    print(f"    one batch at a time (copy, then compute)    {t['serial']:8.2f} ms")
    print(f"    pipelined (copy i+1 while computing i)      {t['pipelined']:8.2f} ms"
          f"  (speed-up {t['serial'] / t['pipelined']:.2f}x)")
    print("  One at a time waits for each copy before computing; pipelined, the copy of batch i+1\n"
          "  runs on the copy stream while batch i computes, so it can save up to the copies' time.\n"
          "  The streams of this emulated device are host threads: the copies share the CPU with\n"
          f"  the matmul ({torch.get_num_threads()} threads) and each batch hands work between "
          "threads, so on a busy\n"
          "  machine the gain shrinks or turns into a loss. A GPU copies with its own engine.")

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
