"""The callback API, EarlyStopping's state and the NormRecorder warnings (issues 12 and 14)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import fastdl as fd
from fastdl.callbacks import Callback, EarlyStopping, NormRecorder, is_stateful


def _data(m: int = 64):
    rng = np.random.default_rng(0)
    return rng.standard_normal((m, 8)).astype(np.float32), rng.integers(0, 3, m)


def _model(backend="cython"):
    return fd.Sequential([fd.Dense(8, 6), fd.ReLU(), fd.Dense(6, 3)], backend=backend, seed=1)


def test_old_import_paths_and_statefulness() -> None:
    from fastdl.training import History, TrainingDiverged, fit  # noqa: F401

    assert fd.Callback is Callback and fd.EarlyStopping is EarlyStopping
    assert is_stateful(EarlyStopping()) and not is_stateful(Callback()) and not is_stateful(NormRecorder())
    assert Callback().state_dict() is None


def test_early_stopping_state_dict_round_trip() -> None:
    X, y = _data()
    es = EarlyStopping(monitor="loss", patience=2)
    _model().fit(X, y, epochs=4, callbacks=[es])
    st = es.state_dict()
    assert set(st["values"]) == {"best", "best_epoch", "wait", "stopped_epoch"}
    assert set(st["arrays"]) == {"best_params", "best_state"}
    fresh = EarlyStopping(monitor="loss", patience=2)
    fresh.load_state_dict(st)
    assert (fresh.best, fresh.best_epoch, fresh.wait, fresh.stopped_epoch) == \
        (es.best, es.best_epoch, es.wait, es.stopped_epoch)
    np.testing.assert_array_equal(fresh._best_params, es._best_params)
    # before any epoch, best is +inf: stored as a JSON-safe string and read back
    empty = EarlyStopping().state_dict()
    assert empty["values"]["best"] == "inf" and empty["arrays"] == {}
    again = EarlyStopping()
    again.load_state_dict(empty)
    assert again.best == float("inf")


def test_exploding_gradient_warning_says_exploding_once_and_points_at_the_callers_line() -> None:
    X, y = _data()
    model = _model("reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X * 1e5, y, optimizer=fd.SGD(1e-16), epochs=4, batch_size=16)
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "gradient" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "exploding gradient" in str(ours[0].message) and "vanishing" not in str(ours[0].message)
    assert ours[0].filename == __file__
    assert len(model.history.norms["layers[0].W"]["grad"]) == 4  # recorded every epoch all the same


def test_vanishing_gradient_warning_points_at_the_callers_line() -> None:
    X, y = _data()
    model = fd.Sequential([fd.Dense(8, 6), fd.Sigmoid(), fd.Dense(6, 6), fd.Sigmoid(), fd.Dense(6, 3)],
                          backend="reference", seed=1)
    model.layers[2].W[...] = 1e-9  # nothing flows back to layer 0
    model.layers[4].W[...] = 1e-9
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X, y, optimizer=fd.SGD(1e-9), epochs=2, batch_size=16)
    ours = [w for w in caught if "gradient" in str(w.message)]
    assert len(ours) == 1 and "vanishing gradient in layers[0].W" in str(ours[0].message)
    assert ours[0].filename == __file__


def test_user_callback_hooks_order_and_stop_training() -> None:
    X, y = _data()
    events = []

    class Log(Callback):
        def on_train_begin(self, model, logs):
            events.append(("begin", logs["has_validation"]))

        def on_epoch_end(self, model, epoch, logs):
            events.append(("epoch", epoch, sorted(logs)))
            if epoch == 1:
                model.stop_training = True

        def on_train_end(self, model, logs):
            events.append(("end",))

    h = _model().fit(X, y, epochs=5, callbacks=[Log()])
    assert events[0] == ("begin", False) and events[-1] == ("end",)
    assert [e[1] for e in events if e[0] == "epoch"] == [0, 1]
    assert events[1][2] == ["cost", "error", "loss", "lr"]
    assert h.epoch == [0, 1]


def test_fit_warnings_point_at_the_callers_line() -> None:
    X, y = _data(20)
    from fastdl.training import fit

    for call in (lambda: _model().fit(X, y, epochs=1, batch_size=64), lambda: fit(_model(), X, y, epochs=1,
                                                                                  batch_size=64)):
        with pytest.warns(UserWarning, match="larger than the 20 examples") as rec:
            call()
        assert rec[0].filename == __file__
