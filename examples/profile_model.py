"""Profile a training step on the mps_ext device and look at it in Perfetto.

    python examples/profile_model.py [trace.json]

Records one training step (forward, backward, optimizer) with
torch.mps_ext.profiler and writes a Chrome/Perfetto trace: open it at
https://ui.perfetto.dev or chrome://tracing. The trace path is the first
argument, else $PYTORCH_MPS_EXT_TRACE_FILE, else the default under the
temporary directory (docs/profiler.md). Then the same step under
torch.profiler, whose table has the device-time columns ("Self MPS_EXT").
"""

import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity

if not hasattr(torch, "mps_ext"):  # running from a source tree without installing
    import torch_mps_ext  # noqa: F401

if len(sys.argv) > 1:
    os.environ["PYTORCH_MPS_EXT_TRACE_FILE"] = sys.argv[1]

device = torch.device("mps_ext")
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(256, 256), torch.nn.ReLU(),
    torch.nn.Linear(256, 256), torch.nn.ReLU(),
    torch.nn.Linear(256, 10)).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
x = torch.randn(128, 256, device=device)
y = torch.randint(0, 10, (128,), device=device)
loss_fn = torch.nn.CrossEntropyLoss()


def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss


step()  # warm-up: first-call costs are not what we want to look at

# 1. torch.mps_ext.profiler: a device timeline.
with torch.mps_ext.profiler.profile(mode="interval,event") as session:
    loss = step()
    print(f"loss after the profiled step: {loss.item():.4f}")
path = session.path  # stop() returns it too, when start()/stop() are used

with open(path) as f:
    events = [e for e in json.load(f)["traceEvents"] if e["ph"] == "X"]
top = {}
for e in events:
    # leaves: the device work itself, no double counting
    if e["args"]["leaf"] and not e["args"].get("metadata_only"):
        top[e["name"]] = top.get(e["name"], 0.0) + e["dur"]
print(f"trace: {path} ({len(events)} device slices); open it in https://ui.perfetto.dev")
print("busiest device operations in the step (device time, summed over calls):")
for name, us in sorted(top.items(), key=lambda kv: -kv[1])[:6]:
    print(f"  {name:<34} {us / 1e3:8.3f} ms")

# 2. torch.profiler: CPU and device time side by side.
with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.PrivateUse1]) as prof:
    step()
print("""
torch.profiler, the same step. Each device op has two rows, as a CUDA op and its kernel do:
  aten::addmm            the op as the CPU ran it: CPU time, plus the device time of what it issued
  aten::addmm (mps_ext)  that work on the device (copies: "aten::_copy_from (cpu -> mps_ext)"):
                         device time only
"Self MPS_EXT time total" sums the device rows only; Self MPS_EXT % is a share of it. Ops run
inline on the emulated device, so an op's device time is about its CPU time (docs/profiler.md).""")
print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8))
assert any(e.device_time_total > 0 for e in prof.key_averages())
