"""Collectives: the "mps_ext" c10d backend against gloo on CPU tensors.

`all_reduce_64MB`: a 64 MB float32 all_reduce (sum) across 2 processes
started by torchrun (one mps_ext device each), on mps_ext tensors (the
mps_ext backend: gloo on host aliases of the device memory) and on CPU
tensors of the same size (gloo itself), in the same process group. Rounds
alternate the order; the ratio is the median of the rounds' mps_ext/CPU
ratios, as bench/common.py's `compare` does within one process.
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TARGETS = {"all_reduce_64MB": 1.2}

_PROGRAM = r"""
import json, os, statistics, sys, time
import torch, torch.distributed as dist
import torch_mps_ext  # noqa: F401

dist.init_process_group()
rank = dist.get_rank()
torch.mps_ext.set_device(int(os.environ["LOCAL_RANK"]))
numel = 64 * 2**20 // 4
tensors = {"cpu": torch.full((numel,), 1.0), "mps_ext": torch.full((numel,), 1.0, device="mps_ext")}

def timed(device, inner):
    t = tensors[device]
    dist.barrier()
    torch.mps_ext.synchronize()
    t0 = time.perf_counter()
    for _ in range(inner):
        dist.all_reduce(t)
    torch.mps_ext.synchronize()
    return (time.perf_counter() - t0) / inner

for device in tensors:  # warm-up: connections, pages, gloo's buffers
    timed(device, 2)
times, ratios = {"cpu": [], "mps_ext": []}, []
for r in range(int(sys.argv[1])):  # rounds
    for device in (("cpu", "mps_ext") if r % 2 == 0 else ("mps_ext", "cpu")):
        times[device].append(timed(device, 3))
    ratios.append(times["mps_ext"][-1] / times["cpu"][-1])
if rank == 0:
    print("BENCH " + json.dumps({"cpu": statistics.median(times["cpu"]),
                                 "mps_ext": statistics.median(times["mps_ext"]),
                                 "ratio": statistics.median(ratios)}), flush=True)
dist.destroy_process_group()
"""


def rows(rounds: int = 7) -> list[dict]:
    env = dict(os.environ, TORCH_MPS_EXT_DEVICE_COUNT="2",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "all_reduce.py")
        with open(script, "w") as f:
            f.write(_PROGRAM)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc-per-node=2", script, str(rounds)],
                              env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"all_reduce_64MB failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[0][len("BENCH "):])
    return [{"name": "all_reduce_64MB", **result}]


if __name__ == "__main__":
    from bench.common import report

    report(rows(), TARGETS)
