"""Memory history and snapshots in torch.cuda's formats, through the public
API (torch.mps_ext.memory._record_memory_history, _snapshot, _dump_snapshot,
torch.mps_ext.memory_snapshot), read by torch's own torch.cuda._memory_viz."""

import base64
import gc
import json
import os
import pickle
import re
import sys

import pytest
import torch
from torch.cuda import _memory_viz

from conftest import run_python

MiB = 1 << 20
memory = torch.mps_ext.memory
DEV = "mps_ext"


@pytest.fixture
def history(fresh_memory):
    """Recording off and the history empty before and after the test."""
    memory._record_memory_history(enabled=None)
    yield
    memory._record_memory_history(enabled=None)
    gc.collect()


def _here():
    """The caller's line number."""
    return sys._getframe(1).f_lineno


def _trace():
    return memory._snapshot()["device_traces"][0]


def _events_at(trace, addr):
    return [e for e in trace if e.get("addr") == addr]


def _my_frames(frames):
    return [(f["line"], f["name"]) for f in frames if f["filename"] == __file__]


def _no_flamegraph(lines):
    return lines  # _memory_viz's default downloads flamegraph.pl: keep the text


# --- structure ---------------------------------------------------------------

def test_segments_and_blocks_add_up_to_the_allocator_counters(history):
    keep = [torch.empty(n, device=DEV) for n in (10, 1000, 300_000, 2 * MiB, 700_000)]
    dropped = torch.empty(50_000, device=DEV)
    del dropped
    snap = memory._snapshot()
    segments = [s for s in snap["segments"] if s["device"] == 0]
    assert segments, snap
    assert sum(s["total_size"] for s in segments) == torch.mps_ext.memory_reserved()
    allocated = sum(b["size"] for s in segments for b in s["blocks"]
                    if b["state"] == "active_allocated")
    assert allocated == torch.mps_ext.memory_allocated()
    for s in segments:
        assert sum(b["size"] for b in s["blocks"]) == s["total_size"]
        address = s["address"]
        for b in s["blocks"]:  # contiguous, in address order
            assert b["address"] == address
            address += b["size"]
        assert s["allocated_size"] == sum(b["size"] for b in s["blocks"]
                                          if b["state"] == "active_allocated")
        if s["segment_type"] == "small":
            assert s["total_size"] == MiB and not s["is_expandable"]
        assert s["stream"] == 0
    blocks = {b["address"]: b for s in segments for b in s["blocks"]}
    for t in keep:
        b = blocks[t.data_ptr()]
        assert b["state"] == "active_allocated"
        assert b["requested_size"] == t.numel() * 4
        assert b["size"] >= b["requested_size"]
    # memory_snapshot() is the same segment list
    assert [s["address"] for s in torch.mps_ext.memory_snapshot()] == \
        [s["address"] for s in snap["segments"]]


def test_small_and_large_segments(history):
    small = torch.empty(100, device=DEV)
    large = torch.empty(3 * MiB // 4, device=DEV)  # 3 MiB
    segs = {s["address"]: s for s in torch.mps_ext.memory_snapshot()}

    def owner(t):
        return next(s for s in segs.values()
                    if s["address"] <= t.data_ptr() < s["address"] + s["total_size"])

    assert owner(small)["segment_type"] == "small"
    assert owner(small)["total_size"] == MiB
    assert owner(large)["segment_type"] == "large"
    assert owner(large)["is_expandable"] is True


# --- events ------------------------------------------------------------------

def test_events_in_order_with_sizes(history):
    torch.mps_ext.empty_cache()
    memory._record_memory_history(stacks="python")
    x = torch.empty(1000, device=DEV)              # 4000 bytes, a new small segment
    x_addr = x.data_ptr()
    del x
    y = torch.empty(5 * MiB // 4, device=DEV)      # 5 MiB: a new large segment
    y_addr = y.data_ptr()
    del y
    torch.mps_ext.empty_cache()
    trace = _trace()
    assert [e["action"] for e in _events_at(trace, x_addr)] == [
        "segment_alloc", "alloc", "free_requested", "free_completed", "segment_free"]
    seg_alloc, alloc, free_req, free_done, seg_free = _events_at(trace, x_addr)
    assert (alloc["size"], free_req["size"], free_done["size"]) == (4000, 4000, 4000)
    assert seg_alloc["size"] == seg_free["size"] == MiB
    assert [e["action"] for e in _events_at(trace, y_addr)] == [
        "segment_alloc", "alloc", "free_requested", "free_completed", "segment_free"]
    assert _events_at(trace, y_addr)[1]["size"] == 5 * MiB
    assert _events_at(trace, y_addr)[0]["size"] == 5 * MiB
    times = [e["time_us"] for e in trace]
    assert times == sorted(times)
    assert all(e["stream"] == 0 for e in trace)
    # x's events come before y's
    assert trace.index(_events_at(trace, x_addr)[1]) < trace.index(_events_at(trace, y_addr)[1])


def test_growing_a_segment_in_place_is_a_segment_map(history):
    torch.mps_ext.empty_cache()
    memory._record_memory_history(stacks="python")
    a = torch.empty(3 * MiB // 4, device=DEV)    # a 3 MiB large segment
    seg = a.data_ptr()
    del a                                          # free: the segment's tail block
    b = torch.empty(5 * MiB // 4, device=DEV)    # grows it by 2 MiB instead of a new one
    assert b.data_ptr() == seg
    trace = _trace()
    maps = [e for e in trace if e["action"] == "segment_map"]
    assert maps and maps[-1]["addr"] == seg + 3 * MiB and maps[-1]["size"] == 2 * MiB
    (s,) = [s for s in torch.mps_ext.memory_snapshot() if s["address"] == seg]
    assert s["total_size"] == 5 * MiB
    assert sum(x["total_size"] for x in memory._snapshot()["segments"]) == \
        torch.mps_ext.memory_reserved()


def test_growing_in_place_stays_under_the_memory_fraction(history):
    torch.mps_ext.empty_cache()
    memory._record_memory_history(stacks="python")
    limit = torch.mps_ext.memory_reserved() + 4 * MiB
    torch.mps_ext.set_per_process_memory_fraction(limit / torch.mps_ext.recommended_max_memory())
    a = torch.empty(3 * MiB // 4, device=DEV)  # a 3 MiB segment fits
    del a
    with pytest.raises(torch.OutOfMemoryError) as info:
        torch.empty(6 * MiB // 4, device=DEV)  # growing it to 6 MiB would not
    assert "Tried to allocate 6.00 MiB" in str(info.value)
    assert torch.mps_ext.memory_reserved() <= limit
    assert not [e for e in _trace() if e["action"] == "segment_map"]
    assert _trace()[-1]["action"] == "oom"


def test_block_used_by_another_stream_is_pending_free_until_it_passes(history):
    memory._record_memory_history(stacks="python")
    side = torch.mps_ext.Stream()
    work = torch.mps_ext.Stream()
    with torch.mps_ext.stream(work):
        x = torch.empty(1000, device=DEV)
        addr = x.data_ptr()
        torch.mps_ext._sleep(300_000_000, side)  # 300 ms: side stays busy
        x.record_stream(side)
        del x
        (block,) = [b for s in memory._snapshot()["segments"] for b in s["blocks"]
                    if b["address"] == addr]
        assert block["state"] == "active_pending_free"
        assert block["requested_size"] == 4000
        assert [e["action"] for e in _events_at(_trace(), addr)
                if not e["action"].startswith("segment")] == ["alloc", "free_requested"]
        (seg,) = [s for s in memory._snapshot()["segments"]
                  if s["address"] <= addr < s["address"] + s["total_size"]]
        assert seg["stream"] == work.stream_id and seg["active_size"] >= 4096
        side.synchronize()
        torch.empty(1000, device=DEV)  # the allocator looks at waiting blocks again
    done = [e for e in _events_at(_trace(), addr) if e["action"] == "free_completed"]
    assert done and done[0]["stream"] == work.stream_id


# --- stacks ------------------------------------------------------------------

def test_stacks_name_the_line_that_allocated(history):
    memory._record_memory_history(context="all", stacks="python")
    line = _here() + 1
    t = torch.empty(1234, device=DEV)
    addr = t.data_ptr()
    free_line = _here() + 1
    del t
    keep = torch.ones(77, device=DEV)
    keep_line = _here() - 1
    trace = _trace()
    alloc = next(e for e in _events_at(trace, addr) if e["action"] == "alloc")
    assert (line, "test_stacks_name_the_line_that_allocated") in _my_frames(alloc["frames"])
    # innermost Python frame first, as in torch.cuda's snapshots
    assert alloc["frames"][0]["filename"] == __file__ and alloc["frames"][0]["line"] == line
    freed = next(e for e in _events_at(trace, addr) if e["action"] == "free_requested")
    assert _my_frames(freed["frames"])[0][0] == free_line
    (block,) = [b for s in memory._snapshot()["segments"] for b in s["blocks"]
                if b["address"] == keep.data_ptr()]
    assert _my_frames(block["frames"])[0] == (keep_line, "test_stacks_name_the_line_that_allocated")


def test_augment_with_fx_traces_keeps_the_eager_frames(history, tmp_path):
    memory._record_memory_history(stacks="python")
    line = _here() + 1
    t = torch.empty(5, device=DEV)
    snap = memory._snapshot(augment_with_fx_traces=True)
    (block,) = [b for s in snap["segments"] for b in s["blocks"] if b["address"] == t.data_ptr()]
    assert _my_frames(block["frames"])[0] == (
        line, "test_augment_with_fx_traces_keeps_the_eager_frames")
    memory._dump_snapshot(str(tmp_path / "s.pickle"), augment_with_fx_traces=True)
    with open(tmp_path / "s.pickle", "rb") as f:
        assert pickle.load(f)["device_traces"][0]


def test_context_levels(history):
    def run():
        t = torch.empty(999, device=DEV)
        addr = t.data_ptr()
        del t
        keep = torch.empty(333, device=DEV)
        trace = _trace()
        by = {e["action"]: e for e in _events_at(trace, addr)}
        (block,) = [b for s in memory._snapshot()["segments"] for b in s["blocks"]
                    if b["address"] == keep.data_ptr()]
        return (bool(block["frames"]), bool(by["alloc"]["frames"]),
                bool(by["free_requested"]["frames"]))

    expected = {None: (False, False, False), "state": (True, False, False),
                "alloc": (True, True, False), "all": (True, True, True)}
    for context, want in expected.items():
        memory._record_memory_history(context=context, stacks="python", clear_history=True)
        assert run() == want, context


def test_cpp_stacks(history):
    memory._record_memory_history(stacks="all")
    t = torch.empty(10, device=DEV)
    (block,) = [b for s in memory._snapshot()["segments"] for b in s["blocks"]
                if b["address"] == t.data_ptr()]
    names = [f["name"] for f in block["frames"]]
    assert "test_cpp_stacks" in names
    assert len(block["frames"]) > len(_my_frames(block["frames"])) + 5  # C++ frames too
    assert any(not f["filename"].endswith(".py") for f in block["frames"])


# --- the ring ------------------------------------------------------------------

def test_max_entries_keeps_the_newest(history):
    memory._record_memory_history(max_entries=6, stacks="python")
    tensors = [torch.empty(100 + i, device=DEV) for i in range(10)]
    trace = _trace()
    assert len(trace) == 6
    assert [e["action"] for e in trace] == ["alloc"] * 6
    assert [e["addr"] for e in trace] == [t.data_ptr() for t in tensors[-6:]]
    assert [e["size"] for e in trace] == [(100 + i) * 4 for i in range(4, 10)]
    # A smaller max_entries keeps the newest of what was recorded.
    memory._record_memory_history(max_entries=2, stacks="python")
    assert [e["addr"] for e in _trace()] == [t.data_ptr() for t in tensors[-2:]]


def test_state_only_and_stopping(history):
    memory._record_memory_history(enabled="state", stacks="python")
    ts = [torch.empty(10, device=DEV) for _ in range(5)]
    # "state": no history, but for its last entry (as on CUDA)
    assert [(e["action"], e["addr"]) for e in _trace()] == [("alloc", ts[-1].data_ptr())]
    (block,) = [b for s in memory._snapshot()["segments"] for b in s["blocks"]
                if b["address"] == ts[0].data_ptr()]
    assert block["frames"]
    memory._record_memory_history(stacks="python")
    torch.empty(10, device=DEV)
    assert _trace()
    memory._record_memory_history(enabled=None)
    assert _trace() == []
    u = torch.empty(10, device=DEV)
    assert _trace() == []  # off: nothing recorded
    (block,) = [b for s in memory._snapshot()["segments"] for b in s["blocks"]
                if b["address"] == u.data_ptr()]
    assert block["frames"] == []


def test_skip_actions(history):
    memory._record_memory_history(stacks="python", skip_actions=["free_requested", "snapshot"])
    t = torch.empty(10, device=DEV)
    addr = t.data_ptr()
    del t
    actions = [e["action"] for e in _events_at(_trace(), addr)]
    assert [a for a in actions if not a.startswith("segment")] == ["alloc", "free_completed"]


def test_bad_arguments(history):
    cases = [
        (dict(enabled="yes"), RuntimeError, "expected state to be 'state', 'all', or None"),
        (dict(context="some"), RuntimeError,
         "expected context to be 'state', 'alloc', 'all', or None"),
        (dict(stacks="cpp"), RuntimeError, "expected stacks to be 'python', or 'all'"),
        (dict(max_entries=0), ValueError, "max_entries must be a positive integer, got 0"),
        (dict(max_entries=2.5), ValueError, "max_entries must be a positive integer, got 2.5"),
        (dict(skip_actions=["allocate"]), RuntimeError, "Unknown TraceEntry action: allocate"),
        (dict(enabled=True), TypeError,
         "enabled must be 'all', 'state' or None (the legacy boolean form of "
         "torch.cuda.memory._record_memory_history is not supported)"),
    ]
    for kwargs, exc, text in cases:
        with pytest.raises(exc) as info:
            memory._record_memory_history(**kwargs)
        assert str(info.value) == text, kwargs
    assert _trace() == []  # nothing was turned on
    with pytest.raises(ValueError) as info:
        torch.mps_ext.memory_snapshot(mempool_id=(1, 2))
    assert str(info.value) == ("mps_ext has no private memory pools: mempool_id must be None "
                               "or (0, 0), got (1, 2)")
    with pytest.raises(ValueError) as info:
        memory._snapshot(device=f"{DEV}:99")
    assert str(info.value).startswith("Invalid mps_ext device index 99: valid indices are 0..")


def test_each_device_has_its_trace_and_segments():
    out = run_python("""
        import torch, torch_mps_ext
        m = torch.mps_ext.memory
        m._record_memory_history(stacks="python")
        a = torch.empty(100, device="mps_ext:0")
        b = torch.empty(300, device="mps_ext:1")
        s = m._snapshot()
        assert len(s["device_traces"]) == 2
        def allocs(d):
            return [e["addr"] for e in s["device_traces"][d] if e["action"] == "alloc"]
        assert allocs(0) == [a.data_ptr()] and allocs(1) == [b.data_ptr()], s
        devices = {blk["address"]: seg["device"] for seg in s["segments"] for blk in seg["blocks"]}
        assert devices[a.data_ptr()] == 0 and devices[b.data_ptr()] == 1
        for d in (0, 1):
            assert sum(seg["total_size"] for seg in s["segments"] if seg["device"] == d) == \
                torch.mps_ext.memory_reserved(d)
        print("ok")
    """, env={"TORCH_MPS_EXT_DEVICE_COUNT": "2"}).stdout
    assert out.strip() == "ok"


# --- out of memory -------------------------------------------------------------

def test_oom_leaves_an_event_and_the_picture_of_the_failure(history, tmp_path):
    memory._record_memory_history(stacks="python")
    keep = torch.empty(MiB, device=DEV)  # 4 MiB
    reserved = torch.mps_ext.memory_reserved()
    limit = reserved + 8 * MiB
    torch.mps_ext.set_per_process_memory_fraction(limit / torch.mps_ext.recommended_max_memory())
    path = tmp_path / "oom.pickle"
    with pytest.raises(torch.OutOfMemoryError) as info:
        try:
            line = _here() + 1
            torch.empty(16 * MiB, device=DEV)  # 64 MiB
        except torch.OutOfMemoryError:
            memory._dump_snapshot(str(path))
            raise
    assert "mps_ext out of memory" in str(info.value)
    with open(path, "rb") as f:
        snap = pickle.load(f)
    oom = snap["device_traces"][0][-1]
    assert oom["action"] == "oom"
    assert oom["size"] == 64 * MiB
    cap = int(torch.mps_ext.get_per_process_memory_fraction()
              * torch.mps_ext.recommended_max_memory())
    # what was left under the limit when it failed
    assert oom["device_free"] == cap - sum(s["total_size"] for s in snap["segments"])
    assert (line, "test_oom_leaves_an_event_and_the_picture_of_the_failure") in \
        _my_frames(oom["frames"])
    assert any(b["address"] == keep.data_ptr() and b["state"] == "active_allocated"
               for s in snap["segments"] for b in s["blocks"])
    text = _memory_viz.trace(snap)
    assert "raise OutOfMemoryError # 64.0MiB requested" in text


# --- torch.cuda._memory_viz on a dumped file -----------------------------------

def _dump_after_a_training_step(path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 4)).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 64, device=DEV)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    memory._dump_snapshot(str(path))
    with open(path, "rb") as f:
        return pickle.load(f)


def _html_snapshot(html):
    """The snapshot a _memory_viz HTML page embeds."""
    m = re.search(r"const local_files = (\[.*?\])\n", html)
    (entry,) = json.loads(m.group(1))
    return pickle.loads(base64.b64decode(entry["base64"]))


def test_memory_viz_reads_a_dumped_snapshot(history, tmp_path):
    memory._record_memory_history(stacks="python")
    before = memory._snapshot()
    snap = _dump_after_a_training_step(tmp_path / "snap.pickle")
    assert os.stat(tmp_path / "snap.pickle").st_mode & 0o777 == 0o600

    segs = _memory_viz.segments(snap, format_flamegraph=_no_flamegraph)
    assert "stream_0;seg_" in segs and "active_allocated" in segs
    assert "test_memory_snapshot.py" in segs  # stacks reach the flame graph's lines
    mem = _memory_viz.memory(snap, format_flamegraph=_no_flamegraph)
    total = sum(int(line.rsplit(" ", 1)[1]) for line in mem.splitlines())
    assert total == sum(s["total_size"] for s in snap["segments"])
    _memory_viz.compare(before["segments"], snap["segments"], format_flamegraph=_no_flamegraph)
    summary = _memory_viz.segsum(snap)
    assert f"segments: {len(snap['segments'])}" in summary
    text = _memory_viz.trace(snap)
    assert f"{len(snap['device_traces'][0])} entries" in text
    for html in (_memory_viz.trace_plot(snap), _memory_viz.trace_plot(snap, plot_segments=True),
                 _memory_viz.segment_plot(snap)):
        assert _html_snapshot(html) == snap


def test_memory_viz_command_line(history, tmp_path):
    memory._record_memory_history(stacks="python")
    _dump_after_a_training_step(tmp_path / "snap.pickle")
    out = run_python(f"""
        import runpy, sys
        sys.argv = ["_memory_viz", "trace_plot", {str(tmp_path / 'snap.pickle')!r},
                    "-o", {str(tmp_path / 'out.html')!r}]
        runpy.run_module("torch.cuda._memory_viz", run_name="__main__")
        sys.argv = ["_memory_viz", "stats", {str(tmp_path / 'snap.pickle')!r}]
        runpy.run_module("torch.cuda._memory_viz", run_name="__main__")
    """).stdout
    assert "total_reserved:" in out
    html = (tmp_path / "out.html").read_text()
    assert "Active Memory Timeline" in html
    assert _html_snapshot(html)["device_traces"][0]


def test_profile_plot_and_profile_memory(history):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        t = torch.empty(250_000, device=DEV)  # 1,000,000 bytes -> a 1000448-byte block
        u = t + 1
        del t, u
    rows = {e.key: e for e in prof.key_averages()}
    assert rows["aten::empty"].device_memory_usage == 1_000_448
    assert rows["aten::empty"].cpu_memory_usage == 0
    html = _memory_viz.profile_plot(prof)
    snap = _html_snapshot(html)
    sizes = [e["size"] for trace in snap["device_traces"] for e in trace if e["action"] == "alloc"]
    assert 1_000_448 in sizes


# --- the device trace's memory counter track -----------------------------------

def test_trace_has_an_allocated_reserved_counter_track(history, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTORCH_MPS_EXT_TRACE_FILE", str(tmp_path / "trace.json"))
    before = torch.mps_ext.memory_allocated()
    torch.mps_ext.profiler.start()
    t = torch.empty(MiB, device=DEV)  # 4 MiB
    during = torch.mps_ext.memory_allocated()
    reserved = torch.mps_ext.memory_reserved()
    del t
    path = torch.mps_ext.profiler.stop()
    with open(path) as f:
        doc = json.load(f)
    counters = [e for e in doc["traceEvents"] if e["ph"] == "C"]
    assert counters[0]["args"]["allocated"] == before and counters[0]["ts"] == 0
    values = [e["args"]["allocated"] for e in counters]
    assert during in values and values[-1] == before
    assert any(e["args"]["reserved"] == reserved for e in counters)
    assert all(e["name"] == "memory" and e["pid"] == 0 for e in counters)
    ts = [e["ts"] for e in counters]
    assert ts == sorted(ts)
