"""Shared setup for the benchmark suites (run with ``pytest benchmarks/ --benchmark-only``).

The report header records what ran: BLAS libraries and their thread counts
(threadpoolctl), Numba's thread count, and the available backends.
"""
from __future__ import annotations

import os
import sys

import pytest


# --- thread control and machine info for the peer comparison (test_bench_peers.py, peers.py) ---
def pytest_addoption(parser):
    parser.addoption("--threads", type=int, default=None,
                     help="limit numba, OpenMP, BLAS, torch and JAX to N threads (= FASTDL_BENCH_THREADS=N; "
                          "N below the core count also pins the process to N CPUs)")


def pytest_configure(config):
    # Before numpy/numba/torch/jax are imported: XLA and OpenBLAS read their
    # thread environment once, at import (see benchmarks/peers.py).
    n = config.getoption("--threads", default=None)
    if n is not None:
        os.environ["FASTDL_BENCH_THREADS"] = str(n)
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:  # also under --import-mode=importlib
        sys.path.insert(0, here)
    import peers  # noqa: F401  (importing it sets the environment from FASTDL_BENCH_THREADS)


def pytest_benchmark_update_machine_info(config, machine_info):
    import peers

    peers.apply_thread_limits()
    machine_info["fastdl_bench"] = {"threads": peers.thread_report(), "versions": peers.versions()}


def pytest_report_header(config):
    lines = []
    try:
        import numpy as np

        from fastdl.backends import available_backends

        lines.append(f"fastdl backends: {available_backends()}; numpy {np.__version__}; cpus {os.cpu_count()}")
    except Exception as exc:  # pragma: no cover - informational only
        lines.append(f"fastdl backends: unavailable ({exc})")
    try:
        import numba

        nthreads = numba.get_num_threads()          # launches the threading layer
        lines.append(f"numba {numba.__version__}: {nthreads} threads, layer {numba.threading_layer()!r}, "
                     f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    except Exception:
        pass
    try:
        import scipy.linalg  # noqa: F401  (loads SciPy's BLAS, used by Numba's np.dot)
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            lines.append("threadpool: {user_api}/{internal_api} {version} {num_threads} threads "
                         "[{arch}] {path}".format(arch=info.get("architecture", "?"),
                                                  path=os.path.basename(info["filepath"]), **info))
    except Exception:
        pass
    return lines


@pytest.fixture(scope="session", autouse=True)
def _compiled_backends_warm():
    """Compile / load from cache every Numba kernel before anything is timed."""
    try:
        from fastdl.backends import numba as numba_backend
    except ImportError:
        return
    numba_backend.warmup()
