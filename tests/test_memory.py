"""Memory: a steady-state training step allocates no arrays, and nothing leaks.

tracemalloc sees every NumPy buffer, every Numba NRT array and every Python
object. A training step on the compiled backends must not allocate anything
proportional to the data (one activation buffer here is 128 x 256 x 4 =
128 KiB): what remains is a few hundred bytes of short-lived Python objects
(the step's scalars) and the Numba kernels' tiny per-call loop buffers.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

import fastdl as fd
from fastdl.backends import available_backends

COMPILED = [b for b in ("numba", "cython") if b in available_backends()]


def _model(backend: str) -> fd.Sequential:
    return fd.Sequential([fd.Dense(64, 256, use_bias=False), fd.BatchNorm(256), fd.ReLU(), fd.Dropout(keep_prob=0.8),
                          fd.Dense(256, 10)], l2=1e-4, backend=backend, seed=0)


@pytest.mark.parametrize("backend", COMPILED)
def test_training_step_allocates_no_arrays(backend: str) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((128, 64)).astype(np.float32)
    y = rng.integers(0, 10, 128)
    model = _model(backend)
    opt = fd.Adam(backend=model.kernels)

    def step() -> float:
        loss, l2, logits = model._loss_and_grads(X, y, dropout=True, n_total=None, step=model.step_count)
        model.count_errors(logits, y)  # the runners' per-step error count
        opt.step(model.params, model.grads)
        model.step_count += 1
        return loss + l2

    for _ in range(5):  # workspaces and optimiser state are allocated here, once
        step()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(50):
            step()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before < 4 * 1024, f"a step allocated {peak - before} bytes at its peak"
    assert after - before < 4 * 1024, f"{after - before} bytes still held after 50 steps"


LONG_RUN = textwrap.dedent("""
    import resource, sys, numpy as np, fastdl as fd
    backend = sys.argv[1]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4096, 64)).astype(np.float32); y = rng.integers(0, 10, 4096)
    model = fd.Sequential([fd.Dense(64, 256, use_bias=False), fd.BatchNorm(256), fd.ReLU(), fd.Dropout(keep_prob=0.8),
                           fd.Dense(256, 10)], l2=1e-4, backend=backend, seed=0)
    opt = fd.Adam()
    def rss_kib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() // 1024
    model.fit(X, y, optimizer=opt, epochs=3, batch_size=128)
    start = rss_kib()
    model.fit(X, y, optimizer=opt, epochs=60, batch_size=128, initial_epoch=3)
    print("RSS_KIB", start, rss_kib())
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("backend", COMPILED)
def test_resident_memory_stays_flat_over_a_long_run(backend: str) -> None:
    out = subprocess.run([sys.executable, "-c", LONG_RUN, backend], capture_output=True, text=True, timeout=600,
                         check=True).stdout
    start, end = (int(v) for v in out.split("RSS_KIB")[1].split())
    # 60 epochs x 32 steps: a leak of even 1 KiB per step would show as ~2 MiB.
    assert end - start < 1024, f"resident memory grew from {start} KiB to {end} KiB"
