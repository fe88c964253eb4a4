"""Resume with stateful callbacks (issue 14 item 1): bit-identical to the uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import fastdl as fd
from fastdl.checkpoint import checkpoint_info


def _quickstart_data():
    X, y = fd.datasets.load_digits()
    Xtr, Xdv, _, ytr, ydv, _ = fd.data.train_dev_test_split(X, y, seed=0, stratify=True)
    scaler = fd.data.Standardizer().fit(Xtr)
    return scaler.transform(Xtr), ytr, scaler.transform(Xdv), ydv


def _quickstart_model(backend: str = "auto") -> fd.Sequential:
    # the README quick-start model
    return fd.Sequential([
        fd.Dense(64, 128, init="he", use_bias=False), fd.BatchNorm(128, momentum=0.9, eps=1e-5),
        fd.ReLU(), fd.Dropout(keep_prob=0.9), fd.Dense(128, 10),
    ], loss="softmax_cross_entropy", l2=1e-3, dtype="float32", backend=backend, seed=0)


class Crash(Exception):
    pass


class CrashAt(fd.Callback):
    """Stands in for a crash at the end of epoch ``epoch`` (after the checkpoint of the epoch before)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, model, epoch, logs):
        if epoch == self.epoch:
            raise Crash


def _fit(model, data, ckpt=None, callbacks=(), resume=False, epochs=60, optimizer=None):
    Xtr, ytr, Xdv, ydv = data
    opt = optimizer if optimizer is not None else fd.Adam(lr=3e-3)
    h = model.fit(Xtr, ytr, optimizer=opt, epochs=epochs, batch_size=32, validation_data=(Xdv, ydv),
                  lr_schedule=fd.schedules.InverseTimeDecay(decay_rate=0.1), callbacks=list(callbacks),
                  checkpoint=ckpt, resume=resume)
    return h, opt


def _assert_same(a, ha, oa, b, hb, ob):
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.state, b.state)
    assert a.step_count == b.step_count
    assert oa.t == ob.t and sorted(oa.state) == sorted(ob.state)
    for k in oa.state:
        np.testing.assert_array_equal(oa.state[k], ob.state[k])
    assert ha.history == hb.history
    assert ha.batch_cost == hb.batch_cost
    assert ha.epoch == hb.epoch
    assert ha.norms == hb.norms


@pytest.mark.parametrize("fused", [True, False])
def test_quickstart_early_stopping_interrupted_and_resumed_is_bit_identical(tmp_path: Path, fused) -> None:
    data = _quickstart_data()
    backend = "auto" if fused else "reference"
    ref = _quickstart_model(backend)
    es_ref = fd.EarlyStopping(patience=4, restore_best=True)
    h_ref, o_ref = _fit(ref, data, callbacks=[es_ref])
    assert es_ref.stopped_epoch is not None and es_ref.stopped_epoch > 16  # it really stops early, later

    ckpt = tmp_path / "run.ckpt"
    part = _quickstart_model(backend)
    with pytest.raises(Crash):
        _fit(part, data, ckpt, callbacks=[fd.EarlyStopping(patience=4, restore_best=True), CrashAt(16)])
    assert checkpoint_info(ckpt)["next_epoch"] == 16
    resumed = _quickstart_model(backend)
    es = fd.EarlyStopping(patience=4, restore_best=True)   # a fresh callback: its state comes from the file
    h_res, o_res = _fit(resumed, data, ckpt, callbacks=[es], resume=True)
    _assert_same(ref, h_ref, o_ref, resumed, h_res, o_res)
    assert (es.best, es.best_epoch, es.wait, es.stopped_epoch) == \
        (es_ref.best, es_ref.best_epoch, es_ref.wait, es_ref.stopped_epoch)

    # the final checkpoint was written AFTER restore_best and says the run finished:
    info = checkpoint_info(ckpt)
    assert info["finished"] == "early_stop"
    again = _quickstart_model(backend)
    es2 = fd.EarlyStopping(patience=4, restore_best=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the same epochs: no warning, no training
        h2, o2 = _fit(again, data, ckpt, callbacks=[es2], resume=True)
    _assert_same(ref, h_ref, o_ref, again, h2, o2)
    assert es2.stopped_epoch == es_ref.stopped_epoch


def test_a_completed_run_continues_with_more_epochs_an_early_stopped_one_does_not(tmp_path: Path) -> None:
    data = _quickstart_data()
    ckpt = tmp_path / "run.ckpt"
    a = _quickstart_model()
    _fit(a, data, ckpt, epochs=3)
    assert checkpoint_info(ckpt)["finished"] == "completed"
    same = _quickstart_model()
    h_same, _ = _fit(same, data, ckpt, epochs=3, resume=True)   # nothing left to do
    np.testing.assert_array_equal(same.params, a.params)
    assert len(h_same.epoch) == 3
    b = _quickstart_model()
    hb, ob = _fit(b, data, ckpt, epochs=5, resume=True)          # more epochs: continues (Keras-like)
    ref = _quickstart_model()
    href, oref = _fit(ref, data, epochs=5)
    _assert_same(ref, href, oref, b, hb, ob)

    ckpt2 = tmp_path / "es.ckpt"
    es_model = _quickstart_model()
    stop = fd.EarlyStopping(monitor="loss", patience=0, min_delta=1e9)   # stops after the second epoch
    h_es, _ = _fit(es_model, data, ckpt2, callbacks=[stop], epochs=10)
    assert h_es.epoch == [0, 1]
    assert checkpoint_info(ckpt2)["finished"] == "early_stop"
    c = _quickstart_model()
    hc, _ = _fit(c, data, ckpt2, callbacks=[fd.EarlyStopping(monitor="loss", patience=0, min_delta=1e9)],
                 epochs=20, resume=True)
    np.testing.assert_array_equal(c.params, es_model.params)
    assert hc.epoch == [0, 1]


def test_resume_refuses_mismatched_stateful_callbacks(tmp_path: Path) -> None:
    data = _quickstart_data()
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        _fit(_quickstart_model(), data, ckpt, callbacks=[fd.EarlyStopping(patience=4), CrashAt(2)], epochs=5)

    class Stateful(fd.Callback):
        def state_dict(self):
            return {"values": {"n": 1}, "arrays": {}}

    with pytest.raises(ValueError, match=r"\[0\] EarlyStopping.*this fit got \[0\] Stateful"):
        _fit(_quickstart_model(), data, ckpt, callbacks=[Stateful()], resume=True, epochs=5)
    with pytest.raises(ValueError, match=r"\[0\] EarlyStopping.*this fit got none"):
        _fit(_quickstart_model(), data, ckpt, callbacks=[], resume=True, epochs=5)
    with pytest.raises(ValueError, match=r"\[1\] Stateful"):
        _fit(_quickstart_model(), data, ckpt, callbacks=[fd.EarlyStopping(patience=4), Stateful()],
             resume=True, epochs=5)
    # stateless callbacks are not matched: adding one is fine
    h, _ = _fit(_quickstart_model(), data, ckpt, callbacks=[fd.Callback(), fd.EarlyStopping(patience=4)],
                resume=True, epochs=5)
    assert h.epoch[-1] >= 2
    # a different configuration resumes, with a warning that it will not reproduce the run
    with pytest.raises(Crash):
        _fit(_quickstart_model(), data, ckpt, callbacks=[fd.EarlyStopping(patience=4), CrashAt(2)], epochs=5)
    with pytest.warns(RuntimeWarning, match="will not reproduce"):
        _fit(_quickstart_model(), data, ckpt, callbacks=[fd.EarlyStopping(patience=9)], resume=True, epochs=5)


def test_user_stateful_callback_round_trips_through_the_checkpoint(tmp_path: Path) -> None:
    class Counter(fd.Callback):
        def __init__(self):
            self.n, self.trace = 0, np.zeros(0)

        def on_epoch_end(self, model, epoch, logs):
            self.n += 1
            self.trace = np.append(self.trace, logs["loss"])

        def state_dict(self):
            return {"values": {"n": self.n}, "arrays": {"trace": self.trace}}

        def load_state_dict(self, state):
            self.n, self.trace = state["values"]["n"], state["arrays"]["trace"]

    data = _quickstart_data()
    ckpt = tmp_path / "run.ckpt"
    ref = Counter()
    _fit(_quickstart_model(), data, callbacks=[ref], epochs=6)
    with pytest.raises(Crash):
        _fit(_quickstart_model(), data, ckpt, callbacks=[Counter(), CrashAt(3)], epochs=6)
    c = Counter()
    _fit(_quickstart_model(), data, ckpt, callbacks=[c], resume=True, epochs=6)
    assert c.n == ref.n == 6
    np.testing.assert_array_equal(c.trace, ref.trace)


SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, fastdl as fd
    ckpt, out, backend = sys.argv[1], sys.argv[2], sys.argv[3]
    X, y = fd.datasets.load_digits()
    Xtr, Xdv, _, ytr, ydv, _ = fd.data.train_dev_test_split(X, y, seed=0, stratify=True)
    sc = fd.data.Standardizer().fit(Xtr)
    model = fd.Sequential([fd.Dense(64, 128, init="he", use_bias=False), fd.BatchNorm(128, momentum=0.9, eps=1e-5),
                           fd.ReLU(), fd.Dropout(keep_prob=0.9), fd.Dense(128, 10)], l2=1e-3, backend=backend, seed=0)
    es = fd.EarlyStopping(patience=4, restore_best=True)
    model.fit(sc.transform(Xtr), ytr, optimizer=fd.Adam(lr=3e-3), epochs=60, batch_size=32,
              validation_data=(sc.transform(Xdv), ydv), lr_schedule=fd.schedules.InverseTimeDecay(decay_rate=0.1),
              callbacks=[es], checkpoint=None if ckpt == "-" else ckpt, resume=True)
    np.save(out, np.concatenate([model.params, model.state, [es.stopped_epoch, model.step_count]]))
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ)  # the same thread count for every run
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


@pytest.mark.parametrize("backend", ["auto", pytest.param("numba", marks=pytest.mark.slow)])
def test_sigkilled_fused_run_with_early_stopping_resumes_bit_identically(tmp_path: Path, backend: str) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    ref = tmp_path / "ref.npy"
    subprocess.run([sys.executable, str(script), "-", str(ref), backend], check=True, env=_env(), timeout=900)
    ckpt, out = tmp_path / "run.ckpt", tmp_path / "out.npy"
    kills = 0
    for attempt in range(40):  # kill it repeatedly (every ~3 epochs) until it finishes
        proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(out), backend], env=_env())
        start = checkpoint_info(ckpt)["next_epoch"] if ckpt.exists() else -1
        deadline = time.monotonic() + 600  # numba: a first run may compile for minutes on a loaded machine
        while proc.poll() is None and time.monotonic() < deadline:
            if ckpt.exists() and checkpoint_info_safe(ckpt) > start + 2:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.01)
        proc.wait(timeout=600)
        if out.exists():
            break
    assert out.exists() and kills >= 1
    np.testing.assert_array_equal(np.load(out), np.load(ref))


def checkpoint_info_safe(path: Path) -> int:
    try:
        return int(checkpoint_info(path)["next_epoch"])
    except Exception:  # noqa: BLE001 - a file being replaced at this moment
        return -1


def test_checkpoint_every_and_the_final_save(tmp_path: Path, monkeypatch) -> None:
    import fastdl.checkpoint as C

    saved = []
    real = C.save_checkpoint

    def spy(*a, **k):
        saved.append((k["next_epoch"], k["finished"], [d["type"] for d in k["callback_states"]]))
        real(*a, **k)

    monkeypatch.setattr(C, "save_checkpoint", spy)
    data = _quickstart_data()
    ckpt = tmp_path / "run.ckpt"
    Xtr, ytr, _, _ = data
    _quickstart_model().fit(Xtr, ytr, epochs=7, checkpoint=ckpt, checkpoint_every=3, callbacks=[fd.Callback()])
    assert saved == [(3, False, []), (6, False, []), (7, "completed", [])]
    saved.clear()
    with pytest.raises(Crash):  # a crash: no final save, the last periodic one stays
        _fit(_quickstart_model(), data, tmp_path / "b.ckpt", callbacks=[fd.EarlyStopping(), CrashAt(4)], epochs=9)
    assert saved == [(1, False, ["EarlyStopping"]), (2, False, ["EarlyStopping"]), (3, False, ["EarlyStopping"]),
                     (4, False, ["EarlyStopping"])]


def test_checkpoint_target_checked_before_training_and_malformed_callback_state(tmp_path: Path) -> None:
    data = _quickstart_data()
    with pytest.raises(FileNotFoundError, match="no such directory"):
        _fit(_quickstart_model(), data, tmp_path / "missing" / "run.ckpt", epochs=2)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        _fit(_quickstart_model(), data, ckpt, callbacks=[fd.EarlyStopping(), CrashAt(1)], epochs=4)

    class Picky(fd.EarlyStopping):  # reads a value the file does not have
        def load_state_dict(self, state):
            self.extra = state["values"]["extra"]

    Picky.__name__ = "EarlyStopping"
    with pytest.raises(fd.ModelFileError, match=r"callbacks\[0\] EarlyStopping is malformed.*KeyError"):
        _fit(_quickstart_model(), data, ckpt, callbacks=[Picky()], resume=True, epochs=4)
