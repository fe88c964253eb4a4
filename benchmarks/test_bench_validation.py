"""What the validated kernel entry points cost, and why the executors call the raw ones.

Run (not part of the normal test run)::

    pytest benchmarks/test_bench_validation.py --benchmark-only \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name

Groups:

* ``dense_forward 32x64->128``: one call, ``backend.dense_forward`` (validated:
  dtypes, shapes, layout, alignment, byte order, aliasing) vs
  ``backend.unchecked.dense_forward`` (the raw kernel).
* ``S step``: the per-layer training step of the S model (64-128-64-10,
  batch 32, Adam, float32, backend auto): forward, loss, backward through the
  model's executor plus the optimiser step. ``unchecked`` is what ships (the
  executor calls ``backend.unchecked``); ``validated`` swaps the executor's
  kernels for the validated entry points, i.e. what the step would cost if the
  executors validated every call.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import fastdl as fd
from fastdl.backends import get_backend
from fastdl.backends.contract import KERNELS, RELU


@pytest.mark.parametrize("entry", ["unchecked", "validated"])
def test_dense_forward_call(benchmark, entry: str) -> None:
    K = get_backend("auto")
    fn = K.unchecked.dense_forward if entry == "unchecked" else K.dense_forward
    rng = np.random.default_rng(0)
    A = rng.standard_normal((32, 64)).astype(np.float32)
    W = rng.standard_normal((64, 128)).astype(np.float32)
    b = np.zeros(128, np.float32)
    out = np.empty((32, 128), np.float32)
    benchmark.group = "dense_forward 32x64->128"
    fn(A, W, b, RELU, out)
    benchmark(fn, A, W, b, RELU, out)


@pytest.mark.parametrize("entry", ["unchecked", "validated"])
def test_s_step(benchmark, entry: str) -> None:
    model = fd.Sequential([fd.Dense(64, 128), fd.ReLU(), fd.Dense(128, 64), fd.ReLU(), fd.Dense(64, 10)],
                          backend="auto", seed=0)
    opt = fd.Adam(lr=1e-3)
    if entry == "validated":
        from fastdl.executors import PerLayerExecutor

        K = model.kernels
        checked = SimpleNamespace(unchecked=SimpleNamespace(**{k: getattr(K, k) for k in KERNELS}))
        model.executor = PerLayerExecutor(model.plan, checked, model.params, model.grads, model.state)
        opt._kernels = lambda: checked                             # the optimiser step validated too
    else:
        assert model.executor.K is model.kernels.unchecked      # what ships
    rng = np.random.default_rng(0)
    X = rng.standard_normal((32, 64)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    step = [0]

    def one_step() -> None:
        step[0] += 1
        model._loss_and_grads(X, y, dropout=True, n_total=None, step=step[0])
        opt.step(model.params, model.grads)

    for _ in range(200):
        one_step()
    benchmark.group = "S step (64-128-64-10, b32, Adam, float32, auto)"
    benchmark(one_step)
