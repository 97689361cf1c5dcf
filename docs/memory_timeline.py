"""Draws the "Active Memory Timeline" of a memory snapshot as a PNG.

    python docs/memory_timeline.py SNAPSHOT.pickle OUT.png [--device N]

A documentation tool, not part of the package (it needs matplotlib, which
torch_mps_ext does not depend on; the snapshot is a plain pickle, so torch
is not needed either). It draws what torch's viewer (torch.cuda._memory_viz
trace_plot, an HTML page whose script loads from the web) shows: each
allocation as a band stacked on the ones still alive, from the event that
allocated it to the one that freed it (bands above a freed one slide down),
allocations alive before recording began at the bottom, and an "oom" event
as a red line. docs/memory_snapshot.png was made with it from
examples/memory_snapshot.py's snapshot.
"""

import argparse
import pickle

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Polygon  # noqa: E402

# torch's viewer colours (Tableau 10)
COLORS = ["#4e79a7", "#f28e2c", "#e15759", "#76b7b2", "#59a14f",
          "#edc949", "#af7aa1", "#ff9da7", "#9c755f", "#bab0ab"]
MiB = 1 << 20


def bands(snapshot, device):
    """[(size, [(step, offset), ...], frames)] and the oom events' steps."""
    events = snapshot["device_traces"][device]
    alive = []                     # [addr, size, points, frames], bottom first
    done = []
    by_addr = {}
    allocated_in_trace = {e["addr"] for e in events if e["action"] == "alloc"}
    # Blocks alive before the history begins: freed in it without an alloc,
    # or still allocated at the end.
    early = [(e["addr"], e["size"], e.get("frames", [])) for e in events
             if e["action"] == "free_completed" and e["addr"] not in allocated_in_trace]
    for seg in snapshot["segments"]:
        if seg["device"] != device:
            continue
        for b in seg["blocks"]:
            if b["state"] == "active_allocated" and b["address"] not in allocated_in_trace:
                early.append((b["address"], b["requested_size"], b.get("frames", [])))
    seen = set()
    for addr, size, frames in early:
        if addr in seen:
            continue
        seen.add(addr)
        band = [addr, size, [(0, sum(a[1] for a in alive))], frames]
        alive.append(band)
        by_addr[addr] = band
    step = 0
    ooms = []
    for e in events:
        action = e["action"]
        if action == "alloc":
            step += 1
            for b in alive:
                b[2].append((step, b[2][-1][1]))
            band = [e["addr"], e["size"], [(step, sum(a[1] for a in alive))], e.get("frames", [])]
            alive.append(band)
            by_addr[e["addr"]] = band
        elif action == "free_completed" and e["addr"] in by_addr:
            step += 1
            band = by_addr.pop(e["addr"])
            i = alive.index(band)
            band[2].append((step, band[2][-1][1]))
            done.append(alive.pop(i))
            offset = 0
            for j, b in enumerate(alive):
                if j >= i:
                    b[2].append((step, b[2][-1][1]))
                    b[2].append((step + 1, offset))
                offset += b[1]
            if i < len(alive):
                step += 1
        elif action == "oom":
            step += 1
            for b in alive:
                b[2].append((step, b[2][-1][1]))
            ooms.append((step, e))
    for b in alive:
        b[2].append((step + 1, b[2][-1][1]))
        done.append(b)
    return [(b[1], b[2], b[3]) for b in done], ooms, step + 1


def draw(snapshot, out, device=0):
    allocs, ooms, steps = bands(snapshot, device)
    fig, ax = plt.subplots(figsize=(12, 6), dpi=100)
    top = 1
    for n, (size, points, _frames) in enumerate(allocs):
        lower = [(t, o / MiB) for t, o in points]
        upper = [(t, (o + size) / MiB) for t, o in reversed(points)]
        ax.add_patch(Polygon(lower + upper, closed=True, facecolor=COLORS[n % len(COLORS)],
                             edgecolor="none"))
        top = max(top, max(o + size for _, o in points) / MiB)
    for step, e in ooms:
        ax.axvline(step, color="red", linewidth=2)
        ax.annotate(f"oom: {e['size'] / MiB:.0f} MiB requested,\n"
                    f"{e['device_free'] / MiB:.1f} MiB free", (step, top * 0.95),
                    xytext=(-8, 0), textcoords="offset points", ha="right", va="top",
                    color="red")
    ax.set_xlim(0, steps)
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("allocator events (alloc / free)")
    ax.set_ylabel("allocated (MiB)")
    ax.set_title(f"Active Memory Timeline, mps_ext:{device} "
                 f"({len(allocs)} allocations; drawn from the snapshot, as "
                 f"torch.cuda._memory_viz trace_plot)")
    fig.tight_layout()
    fig.savefig(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot")
    parser.add_argument("output")
    parser.add_argument("--device", type=int, default=0)
    args = parser.parse_args()
    with open(args.snapshot, "rb") as f:
        draw(pickle.load(f), args.output, args.device)


if __name__ == "__main__":
    main()
