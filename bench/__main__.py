"""All benchmarks in one run: `python -m bench` (or `make bench`).

Times every workload on CPU and on mps_ext in one process and prints a table,
`RATIO <name> <mps_ext/cpu>` lines, and the allocator's reserved/allocated
overhead on the training workloads. `python -m bench NAME...` runs a subset.
"""

import sys

from bench import workloads
from bench.common import compare, report


def main(argv):
    names = set(argv)
    rows = [compare(n, make, **kw) for n, make, kw in workloads.WORKLOADS
            if not names or n in names]
    report(rows, workloads.TARGETS)
    for name, overhead in workloads.memory_overheads(names):
        print(f"MEMORY {name} reserved/allocated(peak) {overhead:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
