"""All benchmarks in one run: `python -m bench` (or `make bench`).

Times every workload on CPU and on mps_ext in one process and prints a table,
`RATIO <name> <mps_ext/cpu>` lines, and the allocator's reserved/allocated
overhead on the training workloads. `python -m bench NAME...` runs a subset.
The `cpu_only` and `import_torch` rows compare a CPU-only program with the
package's autoload on and off (bench/cpu_only.py); `all_reduce_64MB` compares
the "mps_ext" c10d backend with gloo on CPU tensors, in 2 processes
(bench/collectives.py).
"""

import sys

from bench import collectives, cpu_only, workloads
from bench.common import compare, report


def main(argv):
    names = set(argv)
    rows = [compare(n, make, **kw) for n, make, kw in workloads.WORKLOADS
            if not names or n in names]
    if not names or names & {"cpu_only", "import_torch"}:
        # autoload on ("mps_ext") vs off ("cpu"), in fresh interpreters
        rows += [r for r in cpu_only.rows() if not names or r["name"] in names]
    if not names or "all_reduce_64MB" in names:
        # 2 processes under torchrun: mps_ext backend vs gloo on CPU tensors
        rows += collectives.rows()
    report(rows, {**workloads.TARGETS, **collectives.TARGETS})
    for name, overhead in workloads.memory_overheads(names):
        print(f"MEMORY {name} reserved/allocated(peak) {overhead:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
