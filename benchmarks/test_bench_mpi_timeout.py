"""pytest-benchmark entry for benchmarks/mpi_timeout_cost.py (collective timeout cost, issue 14 item 8).

    pytest benchmarks/test_bench_mpi_timeout.py --benchmark-only

Launches ``mpiexec -n 2`` once; the benchmark's own timing is the whole
launch, the figures that matter are the per-call medians in ``extra_info``
(blocking all-reduce vs the polled one with the timeout), measured in the
same run and interleaved.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _mpiexec() -> str | None:
    for c in (shutil.which("mpiexec"), str(Path(sys.executable).parent / "mpiexec")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def test_allreduce_with_and_without_timeout(benchmark):
    mpiexec = _mpiexec()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        mpiexec = None
    if mpiexec is None:
        pytest.skip("needs mpi4py and mpiexec (pip install 'fastdl[mpi]')")
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    result = {}

    def run():
        proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(HERE / "mpi_timeout_cost.py")],
                              capture_output=True, text=True, env=env, timeout=600, check=True)
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    for label in ("2.14MB", "4KB"):
        r = result[label]
        print(f"\n{label}: blocking {r['median_s_blocking'] * 1e3:.3f} ms, with timeout "
              f"{r['median_s_timeout'] * 1e3:.3f} ms per all-reduce (ratio {r['ratio_timeout_over_blocking']:.2f})")
