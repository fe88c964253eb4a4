"""What verbose shows (issue 16 part 2): a bar in terminals and notebooks, lines elsewhere, compilation apart."""
from __future__ import annotations

import importlib
import io

import numpy as np
import pytest

import fastdl as fd
from fastdl.training import callbacks as cbmod
from fastdl.training import runners

fitmod = importlib.import_module("fastdl.training.fit")  # the module (the package exports the function)


def _data(m: int = 64):
    rng = np.random.default_rng(0)
    return rng.standard_normal((m, 8)).astype(np.float32), rng.integers(0, 3, m)


def _model(backend="cython"):
    return fd.Sequential([fd.Dense(8, 6), fd.ReLU(), fd.Dense(6, 3)], backend=backend, seed=1)


@pytest.mark.parametrize("verbose", [1, 2])
def test_without_terminal_or_notebook_verbose_prints_one_line_per_epoch(capsys, monkeypatch, verbose) -> None:
    monkeypatch.setattr(cbmod, "_in_notebook", lambda: False)
    X, y = _data()
    _model().fit(X, y, epochs=3, batch_size=16, validation_data=(X, y), verbose=verbose)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3
    assert out[0].startswith("epoch 1/3 loss=") and "val_loss=" in out[0] and "val_error=" in out[0]
    assert out[2].startswith("epoch 3/3 ")


@pytest.mark.parametrize("fused", [True, False])
def test_notebook_gets_a_bar_that_stays_with_epoch_cost_and_val_metrics(capsys, monkeypatch, fused) -> None:
    monkeypatch.setattr(cbmod, "_in_notebook", lambda: True)  # stderr is no terminal here; a notebook kernel
    made = []
    real = cbmod.ProgressBar.on_train_begin

    def spy(self, model, logs):
        real(self, model, logs)
        made.append(self.bar)

    monkeypatch.setattr(cbmod.ProgressBar, "on_train_begin", spy)
    X, y = _data()
    _model().fit(X, y, epochs=3, batch_size=16, validation_data=(X, y), verbose=1, fused=fused)
    bar = made[0]
    assert bar is not None and bar.leave is True
    assert bar.total == 3 * 64 and bar.n == 3 * 64 and bar.unit == "ex"  # examples: a sane ETA from the start
    err = capsys.readouterr().err
    assert "epoch 3/3" in err and "cost " in err and "val_loss " in err and "val_error " in err
    assert capsys.readouterr().out == ""  # no duplicate lines next to the bar


def test_compilation_is_announced_and_kept_out_of_the_training_time(capsys, monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(runners.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(fitmod.time, "perf_counter", lambda: clock[0])

    class FakeNumbaExecutor:  # wraps the Cython executor; compiling "takes" 30 s on the fake clock
        def __init__(self, inner):
            self.inner = inner

        def compile(self):
            clock[0] += 30.0

        def run_epoch(self, *args):
            clock[0] += 0.5
            return self.inner.run_epoch(*args)

    FakeNumbaExecutor.__module__ = "fastdl.backends.numba.fake"
    model = _model()
    real = model.kernels.epoch_executor
    monkeypatch.setattr(model.kernels, "epoch_executor", lambda *a: FakeNumbaExecutor(real(*a)))
    X, y = _data()
    h = model.fit(X, y, epochs=4, batch_size=16, verbose=2)
    err = capsys.readouterr().err
    assert "compiling the Numba kernels for this model (once; cached on disk)" in err
    assert h.compile_time == 30.0 and h.time == 2.0
    silent = _model()
    monkeypatch.setattr(silent.kernels, "epoch_executor", lambda *a: FakeNumbaExecutor(real(*a)))
    silent.fit(X, y, epochs=1, batch_size=16)
    assert capsys.readouterr().err == ""


def test_bar_is_closed_when_training_fails(monkeypatch) -> None:
    monkeypatch.setattr(cbmod, "_in_notebook", lambda: True)
    bars = []
    real = cbmod.ProgressBar.on_train_begin

    def spy(self, model, logs):
        real(self, model, logs)
        bars.append(self)

    monkeypatch.setattr(cbmod.ProgressBar, "on_train_begin", spy)

    class Boom(fd.Callback):
        def on_epoch_end(self, model, epoch, logs):
            raise RuntimeError("boom")

    X, y = _data()
    with pytest.raises(RuntimeError, match="boom"):
        _model().fit(X, y, epochs=3, verbose=1, callbacks=[Boom()])
    assert bars[0].bar is None


def test_bar_file_argument_and_smoothed_cost() -> None:
    buf = io.StringIO()
    pb = cbmod.ProgressBar(2, 10, verbose=2, file=buf)
    pb.on_train_begin(None, {})
    pb.on_batch_end(None, 0, {"costs": np.array([2.0]), "size": 5})
    pb.on_batch_end(None, 1, {"costs": np.array([2.0]), "size": 5})
    assert pb._ewa / (1 - pb.beta ** pb._n) == pytest.approx(2.0)  # bias-corrected: the mean of equal costs
    pb.on_epoch_end(None, 0, {"loss": 1.5})
    assert buf.getvalue().startswith("epoch 1/2 loss=1.5")
