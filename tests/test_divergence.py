"""No fit returns non-finite parameters or statistics (issue 14 item 4), on every runner."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastdl as fd

# (backend, fused): the per-layer path on the reference and Cython backends, the Cython epoch executor
RUNNERS = [("reference", False), ("cython", False), ("cython", True)]


def _data(m: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, 8)).astype(np.float32), rng.integers(0, 3, m)


def _state_of(model, opt):
    return (model.params.copy(), model.state.copy(), model.step_count, opt.t,
            {k: v.copy() for k, v in opt.state.items()})


def _assert_state(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2:4] == b[2:4]
    assert sorted(a[4]) == sorted(b[4])
    for k in a[4]:
        np.testing.assert_array_equal(a[4][k], b[4][k])


@pytest.mark.parametrize("backend,fused", RUNNERS)
def test_sgd_1e39_float32_raises_instead_of_returning_nan_params(backend, fused) -> None:
    # the LAST update of the fit makes every parameter inf: it used to escape
    X, y = _data()
    model = fd.Sequential([fd.Dense(8, 6), fd.ReLU(), fd.Dense(6, 3)], backend=backend, seed=0)
    before = model.params.copy()
    opt = fd.SGD(lr=1e39)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no misleading "vanishing gradient" warning on the way
        with np.errstate(all="ignore"), pytest.raises(fd.TrainingDiverged, match=r"epoch 1, step \d+ of 1") as info:
            model.fit(X, y, optimizer=opt, epochs=1, batch_size=64, fused=fused)
    assert info.value.epoch == 1 and info.value.step == 1
    np.testing.assert_array_equal(model.params, before)
    assert model.step_count == 0 and opt.t == 0


@pytest.mark.parametrize("backend,fused", RUNNERS)
def test_batchnorm_on_huge_inputs_keeps_finite_statistics(backend, fused) -> None:
    X, y = _data()
    model = fd.Sequential([fd.Dense(8, 6), fd.BatchNorm(6), fd.ReLU(), fd.Dense(6, 3)], backend=backend)
    with np.errstate(all="ignore"), pytest.raises(fd.TrainingDiverged, match="epoch 1, step"):
        model.fit(X * 1e30, y, optimizer=fd.Adam(), epochs=2, batch_size=16, fused=fused)
    assert np.isfinite(model.params).all() and np.isfinite(model.state).all()
    np.testing.assert_array_equal(model.state[6:], 1.0)  # the initial running_var: epoch 1's start


@pytest.mark.parametrize("backend,fused", RUNNERS)
def test_divergence_restores_the_epoch_start_snapshot_together(backend, fused) -> None:
    # epoch 1 trains normally, epoch 2 diverges: params, state, Adam's v/s/t and step_count are those after epoch 1
    X, y = _data()

    def make():
        return fd.Sequential([fd.Dense(8, 6), fd.BatchNorm(6), fd.ReLU(), fd.Dense(6, 3)], backend=backend, seed=2)

    ref, ref_opt = make(), fd.Adam(1e-2)
    ref.fit(X, y, optimizer=ref_opt, epochs=1, batch_size=16, fused=fused)
    expected = _state_of(ref, ref_opt)

    model, opt = make(), fd.Adam(1e-2)
    huge = fd.schedules.LambdaSchedule(lambda a0, epoch, step: a0 if epoch == 0 else 1e38)
    with np.errstate(all="ignore"), pytest.raises(fd.TrainingDiverged, match=r"epoch 2, step \d+ of 4") as info:
        model.fit(X, y, optimizer=opt, epochs=3, batch_size=16, fused=fused, lr_schedule=huge)
    assert info.value.epoch == 2
    _assert_state(_state_of(model, opt), expected)
    assert len(model.history.epoch) == 1 and len(model.history.batch_cost) == 4  # epoch 2 not recorded


@pytest.mark.parametrize("backend,fused", RUNNERS)
def test_nan_cost_names_the_step_in_the_epoch(backend, fused) -> None:
    X, y = _data()
    X[37] = 3e38  # overflows in the first layer: batch 3 of 4 (no shuffle) has a non-finite cost
    model = fd.Sequential([fd.Dense(8, 3)], backend=backend)
    with np.errstate(all="ignore"), pytest.raises(fd.TrainingDiverged) as info:
        model.fit(X, y, epochs=2, batch_size=16, shuffle=False, fused=fused)
    assert (info.value.epoch, info.value.step) == (1, 3)
    assert "epoch 1, step 3 of 4" in str(info.value)
    assert model.step_count == 0


def test_data_parallel_runner_divergence_restores_too() -> None:
    from fastdl.distributed import Communicator

    X, y = _data()
    model = fd.Sequential([fd.Dense(8, 6), fd.ReLU(), fd.Dense(6, 3)], backend="cython")
    before = model.params.copy()
    opt = fd.SGD(lr=1e39)
    with np.errstate(all="ignore"), pytest.raises(fd.TrainingDiverged, match=r"epoch 1, step 1 of 1"):
        model.fit(X, y, optimizer=opt, epochs=1, batch_size=64, distributed=Communicator())
    np.testing.assert_array_equal(model.params, before)
    assert model.step_count == 0 and opt.t == 0
