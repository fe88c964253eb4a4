"""Data-parallel training: time per epoch and the gradient all-reduce cost per step.

    NUMBA_NUM_THREADS=1 python benchmarks/bench_distributed.py                 # 1 process
    NUMBA_NUM_THREADS=1 mpiexec -n 2 python benchmarks/bench_distributed.py    # 2 ranks, same global batch

Synthetic data, an MLP (default 784-512-256-10, float32, Adam). The first
epoch is a warm-up (JIT, caches) and not counted. "all-reduce inside fit"
is the wall time of the per-step gradient all-reduce as training sees it,
which includes waiting for the slower rank; "all-reduce alone" repeats the
same all-reduce back to back after a barrier (pure communication cost).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import fastdl as fd
from fastdl.distributed import Communicator, threads_per_rank, world


class TimedCommunicator(Communicator):
    """Wraps a communicator and adds up the wall time of its all-reduces."""

    def __init__(self, inner: Communicator):
        self.inner, self.rank, self.size = inner, inner.rank, inner.size
        self.seconds, self.calls = 0.0, 0

    def allreduce(self, buf):
        t = time.perf_counter()
        self.inner.allreduce(buf)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return buf

    def bcast(self, buf, root=0):
        return self.inner.bcast(buf, root)

    def bcast_object(self, obj, root=0):
        return self.inner.bcast_object(obj, root)

    def barrier(self):
        self.inner.barrier()

    def abort(self, message, code=1):
        self.inner.abort(message, code)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="784,512,256,10", help="layer widths")
    p.add_argument("--examples", type=int, default=8192)
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="the first is a warm-up and not counted")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", default="auto")
    a = p.parse_args(argv)
    comm = world()
    timed = TimedCommunicator(comm)
    sizes = [int(s) for s in a.sizes.split(",")]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((a.examples, sizes[0])).astype(a.dtype)
    y = rng.integers(0, sizes[-1], a.examples)
    layers: list = []
    for i in range(len(sizes) - 1):
        layers.append(fd.Dense(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(fd.ReLU())
    model = fd.Sequential(layers, dtype=a.dtype, backend=a.backend, seed=0)
    batch = a.global_batch // comm.size
    opt = fd.Adam(lr=1e-3)
    model.fit(X, y, optimizer=opt, epochs=1, batch_size=batch, distributed=timed)  # warm-up
    timed.seconds, timed.calls = 0.0, 0
    timed_epochs = max(a.epochs - 1, 1)
    comm.barrier()
    t = time.perf_counter()
    h = model.fit(X, y, optimizer=opt, epochs=timed_epochs, batch_size=batch, distributed=timed)
    epoch_s = (time.perf_counter() - t) / timed_epochs
    steps_per_epoch = -(-a.examples // (batch * comm.size))
    grad_calls = timed.calls - 2 * timed_epochs  # minus the once-per-epoch log/statistics reductions
    buf = model.grads.copy()
    comm.barrier()
    reps = 50
    t = time.perf_counter()
    for _ in range(reps):
        comm.allreduce(buf)
    alone_ms = (time.perf_counter() - t) / reps * 1e3
    if comm.rank == 0:
        step_ms = epoch_s / steps_per_epoch * 1e3
        in_fit_ms = timed.seconds / max(grad_calls, 1) * 1e3
        threads = threads_per_rank(comm) or os.environ.get("NUMBA_NUM_THREADS") or f"{os.cpu_count()} (default)"
        print(f"ranks={comm.size} threads/rank={threads} "
              f"model={a.sizes} params={model.params.size} ({model.params.nbytes / 1e6:.2f} MB {a.dtype}) "
              f"examples={a.examples} global_batch={batch * comm.size} (per rank {batch})")
        print(f"  time per epoch {epoch_s:.3f} s, {a.examples / epoch_s:,.0f} examples/s, step {step_ms:.2f} ms")
        print(f"  gradient all-reduce inside fit {in_fit_ms:.3f} ms/step ({in_fit_ms / step_ms:.1%} of the step, "
              f"includes waiting for the slower rank); all-reduce alone {alone_ms:.3f} ms "
              f"({alone_ms / step_ms:.1%}); final loss {h['loss'][-1]:.4f}")


if __name__ == "__main__":
    main()
