"""Streams, events, pinned memory and non_blocking copies on mps_ext (SPEC §4).

Execution model under test (docs/streams.md): operators run inline after
draining the current stream; non_blocking pinned copies, cross-stream waits
and torch.mps_ext._sleep are queued on a stream's worker. _sleep gives the
tests work that is observably still pending.
"""

import threading
import time

import pytest
import torch

import torch_mps_ext  # noqa: F401  (registers mps_ext)
from conftest import run_python

DEV = "mps_ext"
MS = 1_000_000  # nanoseconds per millisecond, for _sleep


@pytest.fixture(autouse=True)
def _clean_streams():
    yield
    torch.mps_ext.synchronize()
    torch.mps_ext.set_stream(torch.mps_ext.default_stream())


# ---------------------------------------------------------------- streams


def test_stream_objects_and_pool():
    s = torch.mps_ext.Stream()
    assert isinstance(s, torch.Stream)
    assert s.device == torch.device(DEV, 0)
    assert s.device_type == torch_mps_ext._C._device_type_int()
    assert s.stream_id != 0  # not the default stream
    assert s.priority == 0
    assert torch.mps_ext.Stream.priority_range() == (0, -1)
    hi = torch.mps_ext.Stream(priority=-1)
    assert hi.priority == -1
    assert torch.mps_ext.Stream(priority=-7).priority == -1  # clamped, as CUDA
    assert hi.stream_id != s.stream_id
    # A pool of 32 per priority, handed out round robin.
    ids = {torch.mps_ext.Stream().stream_id for _ in range(32)}
    assert len(ids) == 32 and 0 not in ids
    d = torch.mps_ext.default_stream()
    assert d.stream_id == 0 and d == torch.mps_ext.default_stream(0)
    assert torch.mps_ext.current_stream() == d
    g = torch.Stream(DEV)
    assert g.device.type == DEV and g.stream_id != 0
    wrapped = torch.mps_ext.Stream(stream_id=g.stream_id, device_index=0,
                                   device_type=g.device_type)
    assert wrapped == g and hash(wrapped) == hash(g)
    assert "stream_id" in repr(s)


def test_external_stream_round_trip():
    s = torch.mps_ext.Stream()
    ext = torch.mps_ext.ExternalStream(s.native_handle)
    assert ext == s and ext.stream_id == s.stream_id
    with pytest.raises(ValueError, match="not an mps_ext stream handle"):
        torch.mps_ext.ExternalStream(12345)


def test_set_stream_and_context_managers():
    s1, s2 = torch.mps_ext.Stream(), torch.mps_ext.Stream()
    d = torch.mps_ext.default_stream()
    with torch.mps_ext.stream(s1):
        assert torch.mps_ext.current_stream() == s1
        assert torch.accelerator.current_stream() == s1
        with torch.mps_ext.StreamContext(s2):
            assert torch.mps_ext.current_stream() == s2
        assert torch.mps_ext.current_stream() == s1
        with torch.mps_ext.stream(None):  # no-op
            assert torch.mps_ext.current_stream() == s1
    assert torch.mps_ext.current_stream() == d
    torch.mps_ext.set_stream(s2)
    assert torch.mps_ext.current_stream() == s2
    torch.mps_ext.set_stream(None)
    assert torch.mps_ext.current_stream() == s2
    torch.mps_ext.set_stream(d)
    # torch.Stream is itself a context manager; torch.accelerator.set_stream too.
    g = torch.Stream(DEV)
    with g:
        assert torch.mps_ext.current_stream() == g
    assert torch.mps_ext.current_stream() == d
    torch.accelerator.set_stream(s1)
    assert torch.mps_ext.current_stream() == s1
    with pytest.raises(ValueError, match="Expected a mps_ext stream"):
        torch.mps_ext.set_stream(torch.Stream("cpu"))


def test_current_stream_is_per_thread():
    s = torch.mps_ext.Stream()
    seen = {}

    def worker():
        seen["start"] = torch.mps_ext.current_stream()
        torch.mps_ext.set_stream(s)
        seen["after"] = torch.mps_ext.current_stream()

    torch.mps_ext.set_stream(torch.mps_ext.default_stream())
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["start"].stream_id == 0
    assert seen["after"] == s
    assert torch.mps_ext.current_stream().stream_id == 0  # main thread unchanged


def test_stream_query_synchronize_with_pending_work():
    s = torch.mps_ext.Stream()
    assert s.query()
    t0 = time.perf_counter()
    torch.mps_ext._sleep(200 * MS, s)
    assert not s.query()
    assert torch.mps_ext.default_stream().query()  # other streams are not affected
    s.synchronize()
    assert time.perf_counter() - t0 >= 0.19  # synchronize blocked until the work ran
    assert s.query()
    # The generic torch.Stream methods go through the device guard.
    g = torch.Stream(DEV)
    torch.mps_ext._sleep(100 * MS, g)
    assert not g.query()
    g.synchronize()
    assert g.query()


def test_synchronize_waits_for_every_stream():
    s1, s2 = torch.mps_ext.Stream(), torch.mps_ext.Stream(priority=-1)
    torch.mps_ext._sleep(150 * MS, s1)
    torch.mps_ext._sleep(150 * MS, s2)
    torch.mps_ext.synchronize()
    assert s1.query() and s2.query()
    torch.mps_ext._sleep(100 * MS, s1)
    torch.accelerator.synchronize()
    assert s1.query()


def test_synchronize_raises_reported_errors():
    torch_mps_ext._C._report_error(0, "kernel reported: index 7 out of bounds")
    with pytest.raises(torch.AcceleratorError, match="index 7 out of bounds"):
        torch.mps_ext.synchronize()
    torch.mps_ext.synchronize()  # taken: the next sync is clean
    torch_mps_ext._C._report_error(0, "second failure")
    with pytest.raises(torch.AcceleratorError, match="second failure"):
        torch.accelerator.synchronize()
    torch.accelerator.synchronize()
    torch_mps_ext._C._report_error(0, "first wins")
    torch_mps_ext._C._report_error(0, "dropped")
    with pytest.raises(torch.AcceleratorError, match="first wins"):
        torch.mps_ext.synchronize(0)


def test_failing_queued_work_surfaces_at_synchronize():
    s = torch.mps_ext.Stream()
    torch.mps_ext._sleep(50 * MS, s)
    torch_mps_ext._C._testing.stream_enqueue_failure(0, s.stream_id, "copy engine fault")
    ev = s.record_event()
    ev.synchronize()  # the stream goes on after a failure
    with pytest.raises(torch.AcceleratorError, match="copy engine fault"):
        torch.mps_ext.synchronize()
    torch.mps_ext.synchronize()


def test_streams_work_in_a_forked_child():
    # Worker threads do not survive fork; the child gets fresh, idle streams.
    out = run_python("""
        import os, torch, torch_mps_ext
        s = torch.mps_ext.Stream()
        torch.mps_ext._sleep(1_000_000, s)  # starts s's worker in the parent
        s.synchronize()
        pid = os.fork()
        if pid == 0:
            try:
                host = torch.full((1024,), 3.0).pin_memory()
                with torch.mps_ext.stream(s):
                    torch.mps_ext._sleep(1_000_000)
                    d = host.to("mps_ext", non_blocking=True)
                s.synchronize()
                ok = s.query() and d.sum().item() == 3072.0
            except BaseException:
                ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """, timeout=60).stdout
    assert out.strip() == "child 0"


# ---------------------------------------------------------------- events


def test_event_record_query_synchronize_wait():
    s = torch.mps_ext.Stream()
    e = torch.mps_ext.Event()
    assert isinstance(e, torch.Event)
    assert e.query()  # never recorded
    e.synchronize()   # no-op
    torch.mps_ext._sleep(200 * MS, s)
    e.record(s)
    assert not e.query()
    e.synchronize()
    assert e.query() and s.query()
    # record() defaults to the current stream; on an idle stream it completes at once.
    e2 = torch.mps_ext.Event()
    with torch.mps_ext.stream(s):
        e2.record()
    assert e2.query()
    # Stream.record_event makes an mps_ext Event.
    assert isinstance(s.record_event(), torch.mps_ext.Event)


def test_event_elapsed_time_around_real_work():
    start = torch.mps_ext.Event(enable_timing=True)
    end = torch.mps_ext.Event(enable_timing=True)
    a = torch.randn(256, 256, device=DEV)
    t0 = time.perf_counter()
    start.record()
    for _ in range(20):
        a = torch.tanh(a @ a)
    end.record()
    end.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1000
    ms = start.elapsed_time(end)
    assert isinstance(ms, float)
    assert 0 < ms <= wall_ms + 5
    assert ms >= 0.3 * wall_ms


def test_event_elapsed_time_of_queued_work():
    s = torch.mps_ext.Stream()
    start = torch.mps_ext.Event(enable_timing=True)
    end = torch.mps_ext.Event(enable_timing=True)
    start.record(s)
    torch.mps_ext._sleep(120 * MS, s)
    end.record(s)
    assert not end.query()
    ms = start.elapsed_time(end)  # waits for both, as torch.mps does
    assert 100 <= ms < 5000


def test_event_error_texts():
    plain, plain2 = torch.mps_ext.Event(), torch.mps_ext.Event()
    plain.record()
    plain2.record()
    with pytest.raises(RuntimeError, match=r"^Events were not created with argument 'enable_timing=True'$"):
        plain.elapsed_time(plain2)
    timed = torch.mps_ext.Event(enable_timing=True)
    with pytest.raises(RuntimeError, match=r"^Events were not created with argument 'enable_timing=True'$"):
        timed.elapsed_time(plain)
    never = torch.mps_ext.Event(enable_timing=True)
    timed.record()
    with pytest.raises(RuntimeError, match="end event was never recorded"):
        timed.elapsed_time(never)
    with pytest.raises(RuntimeError, match="start event was never recorded"):
        never.elapsed_time(timed)
    end = torch.mps_ext.Event(enable_timing=True)
    start = torch.mps_ext.Event(enable_timing=True)
    end.record()
    time.sleep(0.005)
    start.record()
    with pytest.raises(RuntimeError, match="end event was recorded before the start event"):
        start.elapsed_time(end)
    assert end.elapsed_time(start) > 0
    with pytest.raises(TypeError):
        start.elapsed_time(3)
    with pytest.raises(RuntimeError, match="interprocess"):
        torch.mps_ext.Event(interprocess=True)


def test_generic_torch_event():
    s = torch.Stream(DEV)
    a = torch.Event(DEV, enable_timing=True)
    b = torch.Event(DEV, enable_timing=True)
    a.record(s)
    torch.mps_ext._sleep(150 * MS, s)
    b.record(s)
    assert not b.query()
    b.synchronize()
    assert a.query() and b.query()
    ms = a.elapsed_time(b)
    assert 150 <= ms < 5000
    # Mixed with torch.mps_ext.Event
    c = torch.mps_ext.Event(enable_timing=True)
    c.record(s)  # after b on the device
    with pytest.raises(RuntimeError, match="recorded before the start"):
        c.elapsed_time(b)
    n = torch.Event(DEV)
    n.record(s)
    with pytest.raises((ValueError, RuntimeError), match="enable_timing=True"):
        n.elapsed_time(a)
    ev = s.record_event()
    assert ev.query()
    torch.Stream(DEV).wait_event(ev)


# ------------------------------------------------ cross-stream ordering


def _pinned_ones(n, value):
    p = torch.empty(n, pin_memory=True)
    p.fill_(value)
    return p


def test_wait_stream_producer_consumer():
    n = 1 << 20
    src = _pinned_ones(n, 3.0)
    dst = torch.zeros(n, device=DEV)
    producer, consumer = torch.mps_ext.Stream(), torch.mps_ext.Stream()
    with torch.mps_ext.stream(producer):
        torch.mps_ext._sleep(150 * MS)
        dst.copy_(src, non_blocking=True)  # queued behind the sleep
    assert not producer.query()
    consumer.wait_stream(producer)
    assert consumer.query() is False  # the wait itself is pending work
    with torch.mps_ext.stream(consumer):
        out = dst * 2  # inline op: drains `consumer`, hence waits for the producer
    assert torch.equal(out.cpu(), torch.full((n,), 6.0))


def test_event_wait_producer_consumer_pipeline():
    # Three batches: copy in on `copy_stream`, compute on the default stream.
    copy_stream = torch.mps_ext.Stream()
    compute = torch.mps_ext.current_stream()
    results = []
    for i in range(3):
        host = _pinned_ones(1 << 16, float(i + 1))
        dev = torch.empty(1 << 16, device=DEV)
        ready = torch.mps_ext.Event()
        with torch.mps_ext.stream(copy_stream):
            torch.mps_ext._sleep(30 * MS)
            dev.copy_(host, non_blocking=True)
            ready.record()
        ready.wait(compute)
        dev.record_stream(compute)
        results.append((dev * 10).sum().item())
    assert results == [10.0 * (1 << 16) * k for k in (1, 2, 3)]


def test_stream_wait_event_generic_api():
    s1, s2 = torch.Stream(DEV), torch.Stream(DEV)
    host = _pinned_ones(4096, 5.0)
    dev = torch.zeros(4096, device=DEV)
    with s1:
        torch.mps_ext._sleep(100 * MS)
        dev.copy_(host, non_blocking=True)
    ev = s1.record_event()
    s2.wait_event(ev)
    with s2:
        total = dev.sum()
    assert total.item() == 5.0 * 4096


def test_ops_are_ordered_after_queued_work_on_their_stream():
    s = torch.mps_ext.Stream()
    host = _pinned_ones(1 << 18, 7.0)
    dev = torch.zeros(1 << 18, device=DEV)
    with torch.mps_ext.stream(s):
        torch.mps_ext._sleep(100 * MS)
        dev.copy_(host, non_blocking=True)
        assert not s.query()
        y = dev + 1  # no explicit synchronize: stream order
    assert torch.equal(y.cpu(), torch.full((1 << 18,), 8.0))


# ------------------------------------------------ pinned memory and copies


def test_pin_memory_and_is_pinned():
    t = torch.arange(10.0)
    assert not t.is_pinned()
    p = t.pin_memory()
    assert p.is_pinned() and torch.equal(p, t)
    assert p[3:].is_pinned()  # a view into pinned memory
    e = torch.empty(5, 5, pin_memory=True)
    assert e.is_pinned() and e.device.type == "cpu"
    assert torch.empty_like(e, pin_memory=True).is_pinned()
    assert not torch.empty(5).is_pinned()


def test_host_cache_and_empty_host_cache():
    torch.accelerator.empty_host_cache()
    base = torch.mps_ext.host_memory_stats()
    p = torch.empty(1000, pin_memory=True)  # 4000 bytes -> a 4 KiB block
    st = torch.mps_ext.host_memory_stats()
    assert st["active_bytes.current"] == base["active_bytes.current"] + 4096
    assert st["num_host_alloc"] == base["num_host_alloc"] + 1
    ptr = p.data_ptr()
    del p
    q = torch.empty(1024, pin_memory=True)  # same size class: from the cache
    assert q.data_ptr() == ptr
    assert torch.mps_ext.host_memory_stats()["num_host_alloc"] == st["num_host_alloc"]
    del q
    cached = torch.mps_ext.host_memory_stats()["allocated_bytes.current"]
    torch.accelerator.empty_host_cache()
    after = torch.mps_ext.host_memory_stats()
    assert after["allocated_bytes.current"] == cached - 4096
    assert after["num_host_free"] == base["num_host_free"] + 1
    live = torch.ones(3).pin_memory()
    torch.accelerator.empty_host_cache()
    assert live.is_pinned()  # live blocks stay


def test_non_blocking_copies_are_queued_on_the_current_stream():
    n = 1 << 20
    s = torch.mps_ext.Stream()
    host = _pinned_ones(n, 2.0)
    with torch.mps_ext.stream(s):
        torch.mps_ext._sleep(150 * MS)
        dev = host.to(DEV, non_blocking=True)
        assert not s.query()
        assert torch.mps_ext.default_stream().query()
        back = dev.to("cpu", non_blocking=True)
        assert back.is_pinned()  # torch pins the destination of a non_blocking D2H
        done = torch.mps_ext.Event()
        done.record()
    done.synchronize()
    assert torch.equal(back, torch.full((n,), 2.0))
    # Pageable memory copies synchronously, even with non_blocking=True.
    pageable = torch.full((n,), 4.0)
    with torch.mps_ext.stream(s):
        torch.mps_ext._sleep(50 * MS)
        d2 = pageable.to(DEV, non_blocking=True)
    assert torch.equal(d2.cpu(), pageable)
    # Non-contiguous / dtype-changing non_blocking copies fall back to synchronous.
    nc = _pinned_ones(64, 1.5).view(8, 8).t()
    d3 = nc.to(DEV, dtype=torch.float64, non_blocking=True)
    assert torch.equal(d3.cpu(), nc.double())


def test_reused_device_block_waits_for_queued_copy_reading_it():
    # A queued D2H copy still reads `src`; `src` is freed and its block goes
    # back to the same stream, where the next op reuses it: that op must run
    # after the copy (stream order), not overwrite the block under it.
    n = (1 << 20) // 4
    with torch.mps_ext.stream(torch.mps_ext.Stream(priority=-1)):
        src = torch.full((n,), 5.0, device=DEV)
        ptr = src.data_ptr()
        dst = torch.empty(n, pin_memory=True)
        torch.mps_ext._sleep(150 * MS)
        dst.copy_(src, non_blocking=True)
        del src
        junk = torch.full((n,), -1.0, device=DEV)
        assert junk.data_ptr() == ptr  # the block was indeed reused
        done = torch.mps_ext.current_stream().record_event()
    done.synchronize()
    assert torch.equal(dst, torch.full((n,), 5.0))


def test_empty_cache_waits_for_queued_copies():
    # The copy's destination is freed (back to the cache) while the copy is
    # still queued; empty_cache must not unmap it under the copy.
    n = (12 << 20) // 4  # its own segment
    host = _pinned_ones(n, 1.0)
    s = torch.mps_ext.Stream()
    with torch.mps_ext.stream(s):
        torch.mps_ext._sleep(150 * MS)
        dev = host.to(DEV, non_blocking=True)
        del dev
    assert not s.query()
    torch.mps_ext.empty_cache()
    assert s.query()


def test_pinned_block_not_reused_while_a_copy_uses_it():
    n = 1 << 18
    s = torch.mps_ext.Stream()
    host = _pinned_ones(n, 1.0)
    ptr = host.data_ptr()
    dev = torch.empty(n, device=DEV)
    with torch.mps_ext.stream(s):
        torch.mps_ext._sleep(150 * MS)
        dev.copy_(host, non_blocking=True)
    del host
    other = torch.empty(n, pin_memory=True)  # same size class
    assert other.data_ptr() != ptr  # the queued copy still reads the old block
    s.synchronize()
    again = torch.empty(n, pin_memory=True)
    assert again.data_ptr() == ptr  # free once the stream has passed the copy
    assert torch.equal(dev.cpu(), torch.ones(n))


# ------------------------------------------------ record_stream


# Blocks serve only the stream they were allocated on, so allocating on a
# high-priority stream (no other test allocates there) makes the pool's
# contents, and so the addresses, predictable.


def test_record_stream_keeps_block_from_reuse():
    n = (1 << 20) // 4  # 1 MiB: small pool, 2 MiB segments
    side = torch.mps_ext.Stream()
    with torch.mps_ext.stream(torch.mps_ext.Stream(priority=-1)):
        x = torch.empty(n, device=DEV)
        ptr = x.data_ptr()
        torch.mps_ext._sleep(200 * MS, side)  # side stream still busy
        x.record_stream(side)
        del x
        y = torch.empty(n, device=DEV)
        assert y.data_ptr() != ptr  # side may still use the block
        side.synchronize()
        z = torch.empty(n, device=DEV)
        assert z.data_ptr() == ptr  # released once side passed the point of free
        del y, z


def test_without_record_stream_block_is_reused_at_once():
    # Control for the test above: the allocator does reuse the block.
    n = (1 << 20) // 4  # 1 MiB: small pool, 2 MiB segments
    side = torch.mps_ext.Stream()
    with torch.mps_ext.stream(torch.mps_ext.Stream(priority=-1)):
        x = torch.empty(n, device=DEV)
        ptr = x.data_ptr()
        torch.mps_ext._sleep(100 * MS, side)
        del x
        y = torch.empty(n, device=DEV)
        assert y.data_ptr() == ptr


def test_record_stream_through_generic_stream_and_errors():
    x = torch.ones(16, device=DEV)
    x.record_stream(torch.Stream(DEV))
    x.record_stream(torch.mps_ext.current_stream())  # own stream: no-op
    with pytest.raises(RuntimeError, match="expected an mps_ext stream"):
        x.record_stream(torch.Stream("cpu"))


# ------------------------------------------------ DataLoader


_DATALOADER = """
    import torch, torch_mps_ext
    from torch.utils.data import DataLoader, TensorDataset
    assert torch.accelerator.current_accelerator().type == "mps_ext"
    ds = TensorDataset(torch.randn(8, 3), torch.arange(8))
    batches = list(DataLoader(ds, batch_size=4, pin_memory=True, num_workers=WORKERS))
    assert len(batches) == 2
    for xb, yb in batches:
        assert xb.is_pinned() and yb.is_pinned()
        d = xb.to("mps_ext", non_blocking=True)
        assert torch.equal(d.cpu(), xb)
    print("ok")
"""


@pytest.mark.parametrize("workers", [0, 1])
def test_dataloader_pins_for_mps_ext(workers):
    # In a fresh interpreter: worker processes and the pin-memory thread
    # change process state (RNG, thread counts) other suites depend on.
    out = run_python(_DATALOADER.replace("WORKERS", str(workers))).stdout
    assert out.strip().endswith("ok")


# ------------------------------------------------ two devices


def _run_two_devices(code):
    return run_python(code, env={"TORCH_MPS_EXT_DEVICE_COUNT": "2"}).stdout


def test_two_device_streams():
    out = _run_two_devices("""
        import torch, torch_mps_ext
        MS = 1_000_000
        assert torch.mps_ext.device_count() == 2
        s1 = torch.mps_ext.Stream(device=1)
        assert s1.device == torch.device("mps_ext", 1)
        assert torch.mps_ext.current_stream(1).stream_id == 0
        # Current streams are per device; set_stream also selects the device.
        with torch.mps_ext.stream(s1):
            assert torch.mps_ext.current_device() == 1
            assert torch.mps_ext.current_stream() == s1
            assert torch.mps_ext.current_stream(0).stream_id == 0
        assert torch.mps_ext.current_device() == 0
        assert torch.mps_ext.current_stream(1).stream_id == 0
        # Work on device 1, waited for from device 0.
        host = torch.full((4096,), 9.0).pin_memory()
        d1 = torch.zeros(4096, device="mps_ext:1")
        with torch.mps_ext.stream(s1):
            torch.mps_ext._sleep(100 * MS)
            d1.copy_(host, non_blocking=True)
            ev = torch.mps_ext.Event()
            ev.record()
        assert not ev.query() and not s1.query()
        assert torch.mps_ext.default_stream(0).query()
        s0 = torch.mps_ext.Stream(device=0)
        s0.wait_event(ev)  # cross-device wait
        assert not s0.query()
        s0.synchronize()
        assert ev.query()
        assert torch.equal(d1.cpu(), host)
        # synchronize(device) covers that device's streams only.
        torch.mps_ext._sleep(100 * MS, s1)
        torch.mps_ext.synchronize(0)
        assert not s1.query()
        torch.mps_ext.synchronize(1)
        assert s1.query()
        # An event stays on the device it was first recorded on.
        try:
            ev.record(torch.mps_ext.default_stream(0))
        except RuntimeError as e:
            assert "does not match" in str(e), e
        else:
            raise AssertionError("recording on another device must fail")
        # Errors are per device.
        torch_mps_ext._C._report_error(1, "dev1 failed")
        torch.mps_ext.synchronize(0)
        try:
            torch.mps_ext.synchronize("mps_ext:1")
        except torch.AcceleratorError as e:
            assert "dev1 failed" in str(e)
        else:
            raise AssertionError("device 1's error must surface")
        torch.accelerator.set_stream(s1)
        assert torch.accelerator.current_device_index() == 1
        print("ok")
    """)
    assert out.strip().endswith("ok")
