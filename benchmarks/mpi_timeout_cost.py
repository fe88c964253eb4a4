"""What the collective timeout costs per all-reduce (fastdl.distributed, issue 14 item 8).

    mpiexec -n 2 python benchmarks/mpi_timeout_cost.py [--rounds 20 --calls 25]

Times ``MPICommunicator.allreduce`` back to back (after a barrier) with the
timeout machinery (non-blocking ``Iallreduce`` + polling loop, timeout 1800 s)
and without it (timeout 0: blocking ``Allreduce``), interleaving the two in
rounds so that machine noise hits both alike. Sizes: 2.14 MB (the float32
gradient of the 784-512-256-10 benchmark MLP, 535,818 parameters) and 4 KB
(the per-epoch reduction of losses and batch costs). Rank 0 prints one JSON
line with the median seconds per call of each mode and their ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from fastdl.distributed import MPICommunicator


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--calls", type=int, default=25, help="all-reduces per mode per round")
    a = p.parse_args(argv)
    modes = {"blocking": MPICommunicator(timeout=0), "timeout": MPICommunicator(timeout=1800)}
    out: dict = {"ranks": modes["blocking"].size}
    for label, n in (("2.14MB", 535_818), ("4KB", 1024)):
        buf = np.ones(n, np.float32)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for comm in modes.values():  # warm-up: MPI connections, buffers
            for _ in range(10):
                comm.allreduce(buf)
        for r in range(a.rounds):
            for name in (("blocking", "timeout") if r % 2 == 0 else ("timeout", "blocking")):
                comm = modes[name]
                comm.barrier()
                for _ in range(a.calls):
                    t = time.perf_counter()
                    comm.allreduce(buf)
                    times[name].append(time.perf_counter() - t)
                buf[...] = 1  # keep the values finite
        med = {m: statistics.median(v) for m, v in times.items()}
        out[label] = {"bytes": buf.nbytes, "median_s_blocking": med["blocking"], "median_s_timeout": med["timeout"],
                      "ratio_timeout_over_blocking": med["timeout"] / med["blocking"],
                      "calls_per_mode": len(times["blocking"])}
    if modes["blocking"].rank == 0:
        print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
