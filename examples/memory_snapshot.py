"""Memory snapshots: see what filled device memory when it ran out.

Trains a small model with the allocator's history recorded, then runs out of
memory on purpose (under a memory fraction set just above what training
needs), dumps the snapshot in the exception handler -- the picture of the
moment it failed -- and renders it with torch's own viewer,
torch.cuda._memory_viz, as an HTML page (docs/memory.md).

    python examples/memory_snapshot.py [OUTPUT_DIR]

writes OUTPUT_DIR/snapshot.pickle and OUTPUT_DIR/snapshot.html (a temporary
folder if none is given). Open the HTML page in a browser (it loads torch's
viewer script from the web), or drop the pickle on https://pytorch.org/memory_viz.
"""

import os
import pickle
import sys
import tempfile

import torch
import torch_mps_ext  # noqa: F401  (registers torch.mps_ext)
from torch.cuda import _memory_viz

MiB = 1 << 20
DEV = "mps_ext"


def train(model, opt, steps):
    x = torch.randn(256, 256, device=DEV)
    y = torch.randint(0, 10, (256,), device=DEV)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return loss.item()


def predict(model, batch):
    return model(torch.randn(batch, 256, device=DEV))


def main(out_dir):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 10)).to(DEV)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    memory = torch.mps_ext.memory
    memory._record_memory_history(max_entries=100_000)
    loss = train(model, opt, steps=3)
    print(f"trained 3 steps, loss {loss:.3f}; "
          f"{torch.mps_ext.memory_allocated() / MiB:.1f} MiB allocated, "
          f"{torch.mps_ext.memory_reserved() / MiB:.1f} MiB reserved")

    # Leave 24 MiB of headroom, then ask for an inference batch that needs more.
    fraction = torch.mps_ext.get_per_process_memory_fraction()
    limit = torch.mps_ext.memory_reserved() + 24 * MiB
    torch.mps_ext.set_per_process_memory_fraction(limit / torch.mps_ext.recommended_max_memory())
    path = os.path.join(out_dir, "snapshot.pickle")
    try:
        with torch.no_grad():
            predict(model, batch=8192)  # 8192 x 1024 floats = 32 MiB per activation
    except torch.OutOfMemoryError as e:
        print("out of memory, as intended:", str(e).split(". ")[0])
        memory._dump_snapshot(path)  # the state at the moment it failed
    else:
        raise SystemExit("expected an out-of-memory error")
    finally:
        torch.mps_ext.set_per_process_memory_fraction(fraction)
        memory._record_memory_history(enabled=None)

    with open(path, "rb") as f:
        snapshot = pickle.load(f)
    events = snapshot["device_traces"][0]
    oom = events[-1]
    assert oom["action"] == "oom", oom
    where = next(f for f in oom["frames"] if f["filename"] == os.path.abspath(__file__))
    print(f"snapshot: {len(snapshot['segments'])} segments, {len(events)} events; "
          f"the last: oom of {oom['size'] / MiB:.0f} MiB at line {where['line']} "
          f"({where['name']}), {oom['device_free'] / MiB:.1f} MiB were free")
    html = os.path.join(out_dir, "snapshot.html")
    with open(html, "w") as f:
        f.write(_memory_viz.trace_plot(snapshot))
    summary = _memory_viz.segsum(snapshot).split("\nLegend")[0].strip().splitlines()[-4:]
    print("_memory_viz stats:", "; ".join(summary))
    print(f"wrote {path}\nwrote {html}  (torch's Active Memory Timeline)")
    return path


if __name__ == "__main__":
    if len(sys.argv) > 1:
        os.makedirs(sys.argv[1], exist_ok=True)
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory(prefix="memory_snapshot-") as d:
            main(d)
