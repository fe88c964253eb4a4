"""The fused whole-epoch trainer equals the per-layer numba path, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

import fastdl as fd

pytest.importorskip("numba")


def _model(dtype: str = "float32", seed: int = 3, l2: float = 1e-3) -> fd.Sequential:
    return fd.Sequential([
        fd.Dense(10, 17, use_bias=False), fd.BatchNorm(17), fd.ReLU(), fd.Dropout(keep_prob=0.7),
        fd.Dense(17, 9), fd.Tanh(), fd.Dense(9, 8), fd.Sigmoid(), fd.Dropout(keep_prob=1.0), fd.Dense(8, 4),
    ], l2=l2, dtype=dtype, backend="numba", seed=seed)


def _data(m: int = 53):
    rng = np.random.default_rng(1)
    return rng.standard_normal((m, 10)), rng.integers(0, 4, m)


OPTIMIZERS = {
    "adam": lambda: fd.Adam(3e-3),
    "momentum": lambda: fd.Momentum(0.05, bias_correction=True),
    "rmsprop": lambda: fd.RMSprop(1e-3),
    "sgd": lambda: fd.SGD(0.05),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("batch_size", [1, 8, 53])
def test_fused_equals_per_layer(dtype: str, opt: str, batch_size: int) -> None:
    X, y = _data()
    runs = []
    for fused in (False, True):
        model = _model(dtype)
        h = model.fit(X, y, optimizer=OPTIMIZERS[opt](), epochs=2, batch_size=batch_size, fused=fused,
                      lr_schedule=fd.schedules.InverseSqrtDecay(per_step=True))
        runs.append((model, h))
    (a, ha), (b, hb) = runs
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.state, b.state)
    assert ha.batch_cost == hb.batch_cost
    assert ha.history == hb.history
    assert a.step_count == b.step_count


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_equals_per_layer_with_batchnorm_first(dtype: str) -> None:
    # BatchNorm on the raw inputs: its dZ is not needed (the fused epoch writes it to a scratch area)
    X, y = _data()
    runs = []
    for fused in (False, True):
        model = fd.Sequential([fd.BatchNorm(10), fd.Dense(10, 12), fd.ReLU(), fd.Dense(12, 4)],
                              dtype=dtype, backend="numba", seed=5)
        h = model.fit(X, y, optimizer=fd.Adam(3e-3), epochs=2, batch_size=16, fused=fused)
        runs.append((model, h))
    (a, ha), (b, hb) = runs
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.state, b.state)
    assert ha.batch_cost == hb.batch_cost


def test_fused_true_refuses_what_it_cannot_do() -> None:
    # every plan runs on the epoch executors (losses, optimisers, augment per step); only backends
    # without an executor (reference) and distributed training cannot
    X, y = _data()
    ref = fd.Sequential([fd.Dense(10, 4)], backend="reference")
    with pytest.raises(ValueError, match="fused=True.*backend 'reference'"):
        ref.fit(X, y, epochs=1, fused=True)
    with pytest.raises(ValueError, match="fused must be"):
        _model().fit(X, y, epochs=1, fused="yes")


def test_fused_divergence_keeps_finite_parameters() -> None:
    X, y = _data()
    model = fd.Sequential([fd.Dense(10, 6), fd.ReLU(), fd.Dense(6, 4)], backend="numba")
    with pytest.raises(fd.TrainingDiverged, match=r"epoch \d+, step \d+"):
        with np.errstate(all="ignore"):
            model.fit(X * 1e6, y, optimizer=fd.SGD(1e12), epochs=5, batch_size=8, fused=True)
    assert np.isfinite(model.params).all()


def test_fused_resume_is_bit_identical(tmp_path) -> None:
    X, y = _data()
    full = _model()
    full.fit(X, y, optimizer=fd.Adam(), epochs=4, batch_size=8, fused=True)
    ckpt = tmp_path / "c.ckpt"

    class Crash(fd.Callback):  # an interruption after epoch 2 (a finished run would not resume)
        def on_epoch_end(self, model, epoch, logs):
            if epoch == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _model().fit(X, y, optimizer=fd.Adam(), epochs=4, batch_size=8, fused=True, checkpoint=ckpt,
                     callbacks=[Crash()])
    resumed = _model()
    resumed.fit(X, y, optimizer=fd.Adam(), epochs=4, batch_size=8, fused=True, checkpoint=ckpt, resume=True)
    np.testing.assert_array_equal(full.params, resumed.params)
