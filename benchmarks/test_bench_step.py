"""The per-layer training step: ``model._loss_and_grads`` + ``optimizer.step``, float32.

What ``fit`` runs per mini-batch when no whole-epoch executor applies (the
per-layer executor of the plan: one Python call per op and kernel). Run::

    pytest benchmarks/test_bench_step.py --benchmark-only --benchmark-min-rounds=2000 \
        --benchmark-columns=median,iqr,min,rounds --benchmark-sort=name

Shapes: S = 64-128-64-10 (ReLU), batch 32, Adam; M = 784-512-256-10 with
BatchNorm, ReLU, Dropout(keep_prob=0.9) and L2, batch 128, Adam. Inputs and
labels are seeded; one step per round (the step count advances, so dropout
masks and Adam's bias corrections change as in training).
"""
from __future__ import annotations

import numpy as np
import pytest

import fastdl as fd
from fastdl.backends import available_backends

BACKENDS = ["auto"] + [b for b in ("cython", "numba") if b in available_backends()]


def _s():
    return [fd.Dense(64, 128), fd.ReLU(), fd.Dense(128, 64), fd.ReLU(), fd.Dense(64, 10)], 64, 32, 0.0


def _m():
    return ([fd.Dense(784, 512, use_bias=False), fd.BatchNorm(512), fd.ReLU(), fd.Dropout(keep_prob=0.9),
             fd.Dense(512, 256, use_bias=False), fd.BatchNorm(256), fd.ReLU(), fd.Dropout(keep_prob=0.9),
             fd.Dense(256, 10)], 784, 128, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["S", "M"])
def test_per_layer_step(benchmark, backend, config):
    layers, n_in, batch, l2 = {"S": _s, "M": _m}[config]()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, n_in)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    model = fd.Sequential(layers, l2=l2, backend=backend, seed=0)
    opt = fd.Adam(backend=model.kernels)

    def step():
        model._loss_and_grads(X, y, dropout=True, n_total=None, step=model.step_count)
        opt.step(model.params, model.grads)
        model.step_count += 1

    for _ in range(20):  # untimed: JIT / caches, workspaces and optimiser state allocated
        step()
    benchmark.group = f"per-layer step {config}"
    benchmark.extra_info.update(batch=batch, backend=backend)
    benchmark(step)
    assert np.isfinite(model.params).all()
