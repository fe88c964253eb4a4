"""fit over its runners: which runner runs, and every runner gives the same training as the per-layer path."""
from __future__ import annotations

import ast
import inspect
import textwrap

import numpy as np
import pytest

import fastdl as fd
from fastdl.schedules import get_schedule
from fastdl.training.runners import Setup, make_runner


def _data(m: int = 53, n: int = 10, k: int = 4, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, n)), rng.integers(0, k, m)


def _model(backend="cython", loss="softmax_cross_entropy", dtype="float32", k=4, l2_scale="batch"):
    out = 1 if loss == "binary_cross_entropy" else k
    return fd.Sequential([
        fd.Dense(10, 17, use_bias=False), fd.BatchNorm(17), fd.ReLU(), fd.Dropout(keep_prob=0.7),
        fd.Dense(17, 9), fd.Tanh(), fd.Dense(9, out),
    ], loss=loss, l2=1e-3, l2_scale=l2_scale, dtype=dtype, backend=backend, seed=3)


def _runner(model, augment=None, fused="auto"):
    X, y = _data()
    opt = fd.Adam()
    opt.backend = model.kernels
    X = model.check_X(X)
    s = Setup(model, opt, get_schedule(None), X, model.check_y(y, len(X)), None, 8, 2, augment, None)
    return make_runner(s, fused)


def test_runner_choice() -> None:
    aug = lambda xb, rng: xb  # noqa: E731
    assert _runner(_model("reference")).mode == "per-layer"
    assert _runner(_model("cython")).mode == "fused"
    assert _runner(_model("auto")).mode == "fused"           # the default backend gets the fused epoch
    assert _runner(_model("cython"), augment=aug).mode == "augment"
    assert _runner(_model("cython"), fused=False).mode == "per-layer"
    with pytest.raises(ValueError, match="fused=True but .*backend 'reference'"):
        _runner(_model("reference"), fused=True)
    with pytest.raises(ValueError, match="fused must be"):
        _runner(_model("cython"), fused="yes")


def _targets(loss, y):
    if loss == "binary_cross_entropy":
        return (y % 2).astype(float)
    if loss == "mse":
        return np.eye(4)[y] * 2.0 - 0.5
    return y


OPTIMIZERS = {
    "adam": lambda: fd.Adam(3e-3),
    "momentum": lambda: fd.Momentum(0.05, bias_correction=True),
    "rmsprop": lambda: fd.RMSprop(1e-3),
    "sgd": lambda: fd.SGD(0.05),
}


def _train(model, X, y, **kw):
    opt = kw.pop("optimizer", None) or fd.Adam(3e-3)
    h = model.fit(X, y, optimizer=opt, epochs=3, batch_size=kw.pop("batch_size", 8),
                  lr_schedule=fd.schedules.InverseSqrtDecay(per_step=True), validation_data=(X[:20], y[:20]), **kw)
    return h, opt


def _assert_same_training(a, ha, oa, b, hb, ob):
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.state, b.state)
    assert a.step_count == b.step_count and oa.t == ob.t
    for k in oa.state:
        np.testing.assert_array_equal(oa.state[k], ob.state[k])
    assert ha.batch_cost == hb.batch_cost
    assert ha.history == hb.history
    assert ha.norms == hb.norms


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "binary_cross_entropy", "mse"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_fused_fit_equals_per_layer_fit(dtype, loss, opt) -> None:
    X, y = _data()
    y = _targets(loss, y)
    runs = []
    for fused in (False, True):
        model = _model(loss=loss, dtype=dtype)
        h, o = _train(model, X, y, optimizer=OPTIMIZERS[opt](), fused=fused, batch_size=1 if opt == "sgd" else 8)
        runs.append((model, h, o))
    _assert_same_training(*runs[0], *runs[1])


def test_augment_runner_equals_per_layer_with_augment() -> None:
    X, y = _data()

    def aug(xb, rng):
        return xb + rng.standard_normal(xb.shape).astype(xb.dtype) * 0.1

    runs = []
    for fused in (False, "auto"):
        model = _model(l2_scale="dataset")
        h, o = _train(model, X, y, augment=aug, fused=fused)
        runs.append((model, h, o))
    _assert_same_training(*runs[0], *runs[1])


def test_sample_weight_fused_equals_per_layer_and_weights_the_epoch_means() -> None:
    X, y = _data()
    w = np.random.default_rng(5).uniform(0.0, 3.0, len(X))
    runs = []
    for fused in (False, True):
        model = _model()
        h, o = _train(model, X, y, fused=fused, sample_weight=w)
        runs.append((model, h, o))
    _assert_same_training(*runs[0], *runs[1])
    # zero weights on half the data train on the other half: the epoch loss is the weighted mean
    w01 = (np.arange(len(X)) % 2).astype(float)
    model = fd.Sequential([fd.Dense(10, 4)], backend="reference", seed=0)
    h = model.fit(X, y, optimizer=fd.SGD(0.0 + 1e-12), epochs=1, batch_size=len(X), sample_weight=w01)
    ref = fd.Sequential([fd.Dense(10, 4)], backend="reference", seed=0)
    expected = ref.evaluate(X[1::2], y[1::2])["loss"]
    assert h.history["loss"][0] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="sample_weight"):
        model.fit(X, y, epochs=1, sample_weight=np.ones(3))


class Recorder(fd.Callback):
    def __init__(self):
        self.calls = []

    def on_batch_end(self, model, batch, logs):
        self.calls.append((batch, len(logs["costs"]), logs["size"]))


@pytest.mark.parametrize("backend,fused,per_step", [("reference", False, True), ("cython", True, False)])
def test_on_batch_end_granularity(backend, fused, per_step) -> None:
    X, y = _data()
    rec = Recorder()
    h = _model(backend).fit(X, y, epochs=2, batch_size=8, fused=fused, callbacks=[rec])
    n = 7  # batches per epoch (53 rows, batch 8)
    if per_step:
        assert rec.calls == [(i, 1, 8 if i < 6 else 5) for i in range(n)] * 2
    else:  # the fused runner: once per epoch, every batch's cost
        assert rec.calls == [(n - 1, n, 53)] * 2
    assert len(h.batch_cost) == 2 * n


def test_fit_is_short() -> None:
    """issue 12: fit itself readable on one screen (code lines, docstring excluded)."""
    from fastdl.training.fit import fit

    src = textwrap.dedent(inspect.getsource(fit))
    node = ast.parse(src).body[0]
    body = node.body[1:]  # without the docstring
    lines = {n.lineno for stmt in body for n in ast.walk(stmt) if hasattr(n, "lineno")}
    assert len(lines) <= 80, len(lines)
    # and nothing of the old monolith: runners and callbacks do the work
    assert "_loss_and_grads" not in src and "tqdm" not in src and "save_checkpoint" not in src


def test_data_parallel_runner_on_one_process_equals_per_layer() -> None:
    # a one-process group runs the data-parallel runner (shard, all-reduce, update) in-process
    from fastdl.distributed import Communicator

    X, y = _data()
    runs = []
    for distributed in (False, Communicator()):
        model = fd.Sequential([fd.Dense(10, 12), fd.BatchNorm(12), fd.ReLU(), fd.Dense(12, 4)], l2=1e-2,
                              backend="cython", seed=3)
        rec = Recorder()
        h, o = _train(model, X, y, fused=False, distributed=distributed, callbacks=[rec])
        runs.append((model, h, o))
        assert len(rec.calls) == 3 * 7  # per step
    _assert_same_training(*runs[0], *runs[1])
    with pytest.raises(ValueError, match="fused=True.*distributed"):
        _model().fit(X, y, epochs=1, batch_size=8, fused=True, distributed=Communicator())
    with pytest.raises(ValueError, match="sample_weight is not supported with distributed"):
        _model().fit(X, y, epochs=1, batch_size=8, distributed=Communicator(), sample_weight=np.ones(len(X)))
