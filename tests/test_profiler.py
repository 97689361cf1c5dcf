"""torch.mps_ext.profiler: traces, modes, metal_capture, torch.profiler
integration and PYTORCH_MPS_EXT_LOG_PROFILE_INFO."""

import json
import os
import tempfile

import pytest
import torch
from torch.profiler import ProfilerActivity

import torch_mps_ext  # noqa: F401
from conftest import run_python

profiler = torch.mps_ext.profiler


@pytest.fixture
def trace_file(tmp_path, monkeypatch):
    path = tmp_path / "trace.json"
    monkeypatch.setenv("PYTORCH_MPS_EXT_TRACE_FILE", str(path))
    yield path
    if profiler._trace["mode"] is not None:  # a failed test must not leak a running profiler
        profiler.stop()


def device_work():
    x = torch.randn(16, 16, device="mps_ext")
    y = torch.mm(x, x)
    z = (y + 1).relu()
    return z.cpu()


def load(path):
    with open(path) as f:
        return json.load(f)


def slices(trace):
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def test_trace_is_chrome_json_with_ops_durations_and_streams(trace_file):
    cpu = torch.ones(5)
    profiler.start()
    device_work()
    torch.cumsum(cpu, 0)  # a CPU op: not a device operation
    path = profiler.stop()
    assert path == str(trace_file)
    trace = load(path)
    events = slices(trace)
    names = {e["name"] for e in events}
    assert {"aten::randn", "aten::mm", "aten::add", "aten::relu", "aten::_copy_from"} <= names
    assert "aten::cumsum" not in names
    for e in events:
        assert e["dur"] >= 0 and e["ts"] >= 0
        assert e["pid"] == 0 and e["args"]["device"] == "mps_ext:0"
        assert isinstance(e["args"]["stream"], int) and e["tid"] == e["args"]["stream"]
    assert max(e["dur"] for e in events if e["name"] == "aten::mm") > 0
    copy = next(e for e in events if e["name"] == "aten::_copy_from")
    assert copy["cat"] == "copy" and copy["args"]["direction"] == "mps_ext -> cpu"
    mm = [e for e in events if e["name"] == "aten::mm"]
    assert any(e["args"]["leaf"] for e in mm)
    assert any(e["args"].get("overload") == "Tensor" for e in events if e["name"] == "aten::add")
    empties = [e for e in events if e["name"] == "aten::empty"]
    assert empties and all(e["args"]["metadata_only"] for e in empties)
    assert all("metadata_only" not in e["args"] for e in mm)
    # Perfetto names the rows from the metadata events.
    meta = {(e["name"], e["args"]["name"]) for e in trace["traceEvents"] if e["ph"] == "M"
            and "name" in e["args"]}
    assert ("process_name", "mps_ext:0") in meta and ("thread_name", "stream 0") in meta
    assert trace["otherData"]["mode"] == "interval"


def test_only_ops_while_started_are_recorded(trace_file):
    torch.full((3,), 2.0, device="mps_ext")
    profiler.start()
    torch.zeros(3, device="mps_ext")
    profiler.stop()
    torch.full((3,), 2.0, device="mps_ext")
    names = {e["name"] for e in slices(load(trace_file))}
    assert "aten::zeros" in names and "aten::full" not in names
    assert torch.mps_ext._C._profiler_consumers() == 0  # callback removed


@pytest.mark.parametrize("mode,phases", [
    ("interval", {"X"}),
    ("event", {"i"}),
    ("Interval, EVENT", {"X", "i"}),
    ("event,interval", {"X", "i"}),
])
def test_modes(trace_file, mode, phases):
    with profiler.profile(mode):
        torch.ones(4, device="mps_ext").sum()
    trace = load(trace_file)
    ops = [e for e in trace["traceEvents"] if e["ph"] not in ("M", "C")]  # C: memory counters
    assert {e["ph"] for e in ops} == phases
    sums = [e for e in ops if e["name"] == "aten::sum"]
    assert sums and all(isinstance(e["tid"], int) for e in sums)
    if phases == {"X", "i"}:  # the completion marker sits at the slice's end
        x = next(e for e in sums if e["ph"] == "X")
        i = next(e for e in sums if e["ph"] == "i" and e["args"] == x["args"])
        assert i["ts"] == pytest.approx(x["ts"] + x["dur"], abs=1e-3)


@pytest.mark.parametrize("mode,token", [
    ("signpost", "signpost"), ("interval,foo", "foo"), ("interval;event", "interval;event"),
    ("", ""), ("interval,", ""),
])
def test_invalid_mode(mode, token):
    with pytest.raises(RuntimeError) as info:
        profiler.start(mode)
    assert str(info.value) == f"Invalid Signpost trace mode: {token}"
    assert profiler._trace["mode"] is None and torch.mps_ext._C._profiler_consumers() == 0


def test_start_twice_is_an_error(trace_file):
    profiler.start()
    with pytest.raises(RuntimeError, match="already started"):
        profiler.start()
    with pytest.raises(RuntimeError, match="already started"):
        with profiler.profile():
            pass
    assert os.path.exists(profiler.stop())
    with pytest.raises(RuntimeError, match="not started"):
        profiler.stop()


def test_wait_until_completed(trace_file):
    with profiler.profile("interval", wait_until_completed=True):
        device_work()
    trace = load(trace_file)
    assert trace["otherData"]["wait_until_completed"] is True
    assert any(e["name"] == "aten::mm" for e in slices(trace))


def test_default_trace_path(monkeypatch):
    monkeypatch.delenv("PYTORCH_MPS_EXT_TRACE_FILE", raising=False)
    profiler.start()
    torch.ones(2, device="mps_ext")
    path = profiler.stop()
    try:
        assert os.path.dirname(path) == os.path.join(tempfile.gettempdir(),
                                                     f"torch_mps_ext_traces-{os.geteuid()}")
        assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
        assert os.path.basename(path).startswith(f"trace-{os.getpid()}-")
        assert any(e["name"] == "aten::ones" for e in slices(load(path)))
    finally:
        os.remove(path)


def test_device_command_contract(trace_file):
    with profiler._device_command("unrecorded"):  # off: nothing recorded, no error
        pass
    with profiler.profile("interval"):
        with profiler._device_command("my_kernel", grid=[64, 1, 1], group=[32, 1, 1]):
            torch.ones(2, device="mps_ext")
        t = profiler._now_ns()
        profiler._record_device_command("event_record", t, t, stream=3, event=7)
    trace = load(trace_file)
    events = slices(trace)
    names = [e["name"] for e in events]
    assert "unrecorded" not in names
    launch = next(e for e in events if e["name"] == "my_kernel")
    assert launch["cat"] == "command"
    assert launch["args"]["attrs"] == {"grid": [64, 1, 1], "group": [32, 1, 1]}
    ones = next(e for e in events if e["name"] == "aten::ones")
    assert launch["ts"] <= ones["ts"] and ones["ts"] + ones["dur"] <= launch["ts"] + launch["dur"]
    event = next(e for e in events if e["name"] == "event_record")
    assert event["dur"] == 0 and event["args"]["attrs"] == {"event": 7}
    assert event["tid"] == 3 and event["args"]["stream"] == 3  # one row per stream
    rows = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == "thread_name"}
    assert rows == {(0, 0): "stream 0", (0, 3): "stream 3"}


CAPTURE = """
    import json, torch, torch_mps_ext
    p = torch.mps_ext.profiler
    print("enabled", p.is_metal_capture_enabled(), p.is_capturing_metal())
    x = torch.arange(12, dtype=torch.float32, device="mps_ext").reshape(3, 4)
    x1 = torch.ones(2, device="mps_ext:1")
    try:
        with p.metal_capture({fname!r}):
            print("inside", p.is_capturing_metal())
            y = x.t() * 2
            with p._device_command("launch", grid=[4, 1, 1], group=[4, 1, 1]):
                pass
            y.cpu()
            x1.neg()
    except RuntimeError as e:
        print("error", e)
    print("after", p.is_capturing_metal())
"""


def launch_overload(cmds):
    return next(c for c in cmds if c["name"] == "launch")["overload"]


def test_metal_capture_enabled_by_environment(tmp_path):
    fname = tmp_path / "capture.json"
    out = run_python(CAPTURE.format(fname=str(fname)), env={"MTL_CAPTURE_ENABLED": "1",
                                                     "TORCH_MPS_EXT_DEVICE_COUNT": "2"}).stdout
    assert out.split("\n")[:3] == ["enabled True False", "inside True", "after False"]
    doc = load(fname)
    assert doc["format"] == "torch_mps_ext.capture" and doc["version"] == 1
    cmds = doc["commands"]
    assert doc["num_commands"] == len(cmds)
    assert [c["index"] for c in cmds] == list(range(len(cmds)))
    names = [c["name"] for c in cmds]
    assert "aten::arange" not in names  # issued before the block
    mul = next(c for c in cmds if c["name"] == "aten::mul")
    assert mul["overload"] == "Tensor" and launch_overload(cmds) == ""
    assert mul["kind"] == "op" and mul["device"] == "mps_ext:0" and mul["stream"] == 0
    assert mul["duration_ns"] == mul["end_ns"] - mul["start_ns"] >= 0
    assert mul["inputs"][0] == {"shape": [4, 3], "strides": [1, 4], "dtype": "float32",
                                "device": "mps_ext:0", "storage_offset": 0}
    assert mul["inputs"][1] == {"shape": [], "strides": [], "dtype": "int64", "device": "cpu",
                                "storage_offset": 0, "value": 2}  # the wrapped scalar
    assert mul["outputs"][0]["shape"] == [4, 3] and mul["outputs"][0]["dtype"] == "float32"
    launch = next(c for c in cmds if c["name"] == "launch")
    assert launch["kind"] == "command" and launch["attrs"] == {"grid": [4, 1, 1],
                                                               "group": [4, 1, 1]}
    copy = next(c for c in cmds if c["name"] == "aten::_copy_from")
    assert copy["kind"] == "copy" and copy["direction"] == "mps_ext -> cpu"
    neg = next(c for c in cmds if c["name"] == "aten::neg")  # on the second device
    assert neg["device"] == "mps_ext:1" and neg["inputs"][0]["device"] == "mps_ext:1"


def test_metal_capture_disabled_by_environment(tmp_path, monkeypatch):
    fname = tmp_path / "capture.json"
    out = run_python(CAPTURE.format(fname=str(fname)), env={"MTL_CAPTURE_ENABLED": "0",
                                                     "TORCH_MPS_EXT_DEVICE_COUNT": "2"}).stdout
    lines = out.split("\n")
    assert lines[0] == "enabled False False"
    assert lines[1] == ("error Metal capture is not enabled: run the process with "
                        "MTL_CAPTURE_ENABLED=1")
    assert not fname.exists()
    # Unset behaves as "0" (this process's environment, read at each call).
    monkeypatch.delenv("MTL_CAPTURE_ENABLED", raising=False)
    assert not profiler.is_metal_capture_enabled()
    with pytest.raises(RuntimeError, match="Metal capture is not enabled"):
        with profiler.metal_capture(str(fname)):
            pass
    assert not profiler.is_capturing_metal() and not fname.exists()


def test_torch_profiler_shows_device_time(tmp_path):
    x = torch.randn(64, 64, device="mps_ext")
    c = torch.randn(64, 64)
    with torch.profiler.profile(
            activities=[ProfilerActivity.CPU, ProfilerActivity.PrivateUse1]) as prof:
        torch.mm(x, x).cpu()
        torch.cumsum(c, 0)
    avg = {e.key: e for e in prof.key_averages()}
    # The CPU ops, with the device time of the work they issued ...
    assert avg["aten::mm"].self_cpu_time_total > 0 and avg["aten::mm"].device_time_total > 0
    assert avg["aten::_copy_from"].device_time_total > 0
    assert avg["aten::cumsum"].device_time_total == 0
    # ... and that work, as device rows named apart from them.
    assert avg["aten::mm (mps_ext)"].self_cpu_time_total == 0
    assert avg["aten::mm (mps_ext)"].self_device_time_total > 0
    assert avg["aten::_copy_from (mps_ext -> cpu)"].self_device_time_total > 0
    assert "Self MPS_EXT" in prof.key_averages().table()
    path = tmp_path / "kineto.json"
    prof.export_chrome_trace(str(path))
    device = [e for e in load(path)["traceEvents"]
              if e.get("cat") in ("kernel", "gpu_memcpy") and e.get("ph") == "X"]
    kernels = {e["name"] for e in device}
    assert "aten::mm (mps_ext)" in kernels and "aten::_copy_from (mps_ext -> cpu)" in kernels
    assert not any(k.startswith(("aten::cumsum", "aten::empty")) for k in kernels)  # CPU op; allocation
    assert all(e["args"]["device"] == "mps_ext:0" and "stream" in e["args"] for e in device)
    assert torch.mps_ext._C._profiler_consumers() == 0


def test_torch_profiler_cpu_only_does_not_record_the_device():
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        assert torch.mps_ext._C._profiler_consumers() == 0
        torch.ones(4, device="mps_ext") + 1
    assert all(e.device_time_total == 0 for e in prof.key_averages())


def test_autograd_profiler_use_device():
    x = torch.randn(64, 64, device="mps_ext")
    with torch.autograd.profiler.profile(use_device="mps_ext") as prof:
        torch.mm(x, x)
    avg = {e.key: e for e in prof.key_averages()}
    assert avg["aten::mm"].device_time_total > 0


def test_log_profile_info_prints_ops_and_stats():
    proc = run_python("""
        import torch, torch_mps_ext
        x = torch.ones(8, device="mps_ext")
        (x + 1).cpu()
    """, env={"PYTORCH_MPS_EXT_LOG_PROFILE_INFO": str(1 | 2 | 8 | 16)})
    err = proc.stderr
    assert "[mps_ext profiler] op aten::add (device 0, stream 0):" in err
    assert "[mps_ext profiler] copy aten::_copy_from (device 0, stream 0):" in err
    assert "[mps_ext profiler] operations (times include nested device ops):" in err
    assert "[mps_ext profiler] copies (times include nested device ops):" in err
    stats = err.split("[mps_ext profiler] operations")[1]
    # aten::add counts the fallback's nested add.out on the device too.
    assert any(line.split()[0] == "aten::add" and int(line.split()[1]) >= 1
               for line in stats.splitlines() if line.strip())


def test_log_profile_info_bad_value():
    proc = run_python("import torch_mps_ext", check=False,
                      env={"PYTORCH_MPS_EXT_LOG_PROFILE_INFO": "lots"})
    assert proc.returncode != 0
    assert ("ValueError: PYTORCH_MPS_EXT_LOG_PROFILE_INFO must be a bit mask between 0 and "
            "127, got 'lots'") in proc.stderr


def test_stop_writes_the_trace_even_when_the_device_reports_an_error(trace_file):
    profiler.start()
    torch.ones(3, device="mps_ext")
    torch_mps_ext._C._report_error(0, "kernel 'k' reported: boom")
    with pytest.raises(torch.AcceleratorError, match="boom"):
        profiler.stop()
    assert profiler._trace["mode"] is None and torch.mps_ext._C._profiler_consumers() == 0
    assert any(e["name"] == "aten::ones" for e in slices(load(trace_file)))


def test_ops_are_recorded_on_their_current_stream(trace_file):
    x = torch.ones(4, device="mps_ext")
    s = torch.mps_ext.Stream()
    assert s.stream_id != 0
    with profiler.profile():
        with torch.mps_ext.stream(s):
            x.neg()
        x.exp()
    trace = load(trace_file)
    events = slices(trace)
    neg = next(e for e in events if e["name"] == "aten::neg")
    exp = next(e for e in events if e["name"] == "aten::exp")
    assert neg["tid"] == neg["args"]["stream"] == s.stream_id
    assert exp["tid"] == exp["args"]["stream"] == 0
    rows = {e["tid"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {0, s.stream_id} <= rows


def test_shader_launches_are_recorded_with_their_grid(trace_file):
    lib = torch.mps_ext.compile_shader(
        "kernel void fill7(device float* out, uint i [[thread_position_in_grid]]) { out[i] = 7; }")
    x = torch.zeros(100, device="mps_ext")
    profiler.start()
    lib.fill7(x, threads=100, group_size=32)
    path = profiler.stop()
    launch = next(e for e in slices(load(path)) if e["name"] == "fill7")
    assert launch["args"]["attrs"]["grid"] == [100, 1, 1]
    assert launch["args"]["attrs"]["group"] == [32, 1, 1]
    assert launch["args"]["attrs"]["groups"] == 4
    assert x.cpu().eq(7).all()
