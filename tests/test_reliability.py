"""Reliability: kill-and-resume, atomic checkpoints, divergence guard, fuzzed model files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastdl as fd
from fastdl.io import ModelFileError

TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, fastdl as fd
    ckpt, out, epochs, backend = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    X, y = fd.datasets.load_digits()
    X = X / 16.0
    model = fd.Sequential([fd.Dense(64, 48, use_bias=False), fd.BatchNorm(48), fd.ReLU(), fd.Dropout(keep_prob=0.8),
                           fd.Dense(48, 10)], l2=1e-3, backend=backend, seed=7)
    model.fit(X, y, optimizer=fd.Adam(3e-3), epochs=epochs, batch_size=32,
              lr_schedule=fd.schedules.InverseTimeDecay(0.2),
              checkpoint=None if ckpt == "-" else ckpt, resume=True)
    np.save(out, np.concatenate([model.params, model.state]))
    """
)


def _env() -> dict[str, str]:
    # Same thread count for every run: float reductions in BLAS may depend on it.
    env = dict(os.environ)
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    epochs = 40
    ref_out = tmp_path / "ref.npy"
    subprocess.run([sys.executable, str(script), "-", str(ref_out), str(epochs), "reference"],
                   check=True, env=_env(), timeout=300)

    ckpt = tmp_path / "run.ckpt"
    out = tmp_path / "resumed.npy"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(out), str(epochs), "reference"],
                            env=_env())
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # let it get a few epochs further, into the middle of a run
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert ckpt.exists()
    if killed:
        assert not out.exists(), "the killed run must not have finished"
    # no temporary files left behind beside a valid checkpoint
    from fastdl.checkpoint import checkpoint_info

    assert checkpoint_info(ckpt)["next_epoch"] >= 1
    subprocess.run([sys.executable, str(script), str(ckpt), str(out), str(epochs), "reference"],
                   check=True, env=_env(), timeout=300)
    np.testing.assert_array_equal(np.load(out), np.load(ref_out))


def _small_model(seed: int = 1, backend: str = "reference") -> fd.Sequential:
    return fd.Sequential([fd.Dense(8, 6), fd.ReLU(), fd.Dense(6, 3)], backend=backend, seed=seed)


def _data(m: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((m, 8)).astype(np.float32), rng.integers(0, 3, m)


def test_resume_in_process_is_bit_identical(tmp_path: Path) -> None:
    X, y = _data()
    full = _small_model()
    h_full = full.fit(X, y, optimizer=fd.Momentum(0.05), epochs=6, batch_size=8)
    ckpt = tmp_path / "c.ckpt"

    class Interrupt(fd.Callback):  # stands in for a crash after epoch 4 (a finished run would not resume)
        def on_epoch_end(self, model, epoch, logs):
            if epoch == 3:
                raise KeyboardInterrupt

    part = _small_model()
    with pytest.raises(KeyboardInterrupt):
        part.fit(X, y, optimizer=fd.Momentum(0.05), epochs=6, batch_size=8, checkpoint=ckpt, callbacks=[Interrupt()])
    resumed = _small_model()
    h_res = resumed.fit(X, y, optimizer=fd.Momentum(0.05), epochs=6, batch_size=8, checkpoint=ckpt, resume=True)
    np.testing.assert_array_equal(full.params, resumed.params)
    assert h_full.history == h_res.history
    assert h_full.batch_cost == h_res.batch_cost


def test_resume_refuses_a_different_run(tmp_path: Path) -> None:
    X, y = _data()
    ckpt = tmp_path / "c.ckpt"
    _small_model().fit(X, y, epochs=2, batch_size=8, checkpoint=ckpt)
    with pytest.raises(ModelFileError, match="batch_size"):
        _small_model().fit(X, y, epochs=4, batch_size=4, checkpoint=ckpt, resume=True)
    other = fd.Sequential([fd.Dense(8, 5), fd.ReLU(), fd.Dense(5, 3)], backend="reference")
    with pytest.raises(ModelFileError, match="different model"):
        other.fit(X, y, epochs=4, batch_size=8, checkpoint=ckpt, resume=True)


def test_interrupted_checkpoint_save_keeps_previous(tmp_path: Path, monkeypatch) -> None:
    X, y = _data()
    ckpt = tmp_path / "c.ckpt"
    model = _small_model()
    model.fit(X, y, epochs=2, batch_size=8, checkpoint=ckpt)
    before = ckpt.read_bytes()

    def boom(f, **arrays):
        f.write(b"partial garbage")
        raise KeyboardInterrupt  # a kill arriving mid-write

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, y, epochs=3, batch_size=8, checkpoint=ckpt, initial_epoch=2)
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]


def test_divergence_names_epoch_and_step_and_keeps_finite_params() -> None:
    X, y = _data()
    model = _small_model()
    with pytest.raises(fd.TrainingDiverged, match=r"epoch 1, step \d+.*learning rate") as info:
        with np.errstate(all="ignore"):
            model.fit(X * 1e4, y, optimizer=fd.SGD(1e8), epochs=5, batch_size=8)
    assert "diverged" in str(info.value)
    assert np.isfinite(model.params).all()
    assert np.isfinite(model.state).all()


# ----------------------------------------------------------------------------- fuzzed files


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("m") / "m.fdl"
    model = fd.Sequential([fd.Dense(4, 3, use_bias=False), fd.BatchNorm(3), fd.ReLU(), fd.Dense(3, 2)],
                          backend="reference")
    model.save(path, optimizer=fd.Adam())
    return path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_model_files_always_give_a_clear_error(tmp_path_factory, model_bytes, data) -> None:
    raw = bytearray(model_bytes)
    kind = data.draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
    else:
        raw = bytearray(data.draw(st.binary(max_size=512)))
    path = tmp_path_factory.mktemp("fz") / "bad.fdl"
    path.write_bytes(bytes(raw))
    try:
        model = fd.load(path, backend="reference")
    except ModelFileError:
        return
    # A flip that lands in padding or in parameter values can leave a loadable file; it must then be
    # a complete, consistent model.
    assert model.params.size == 4 * 3 + 3 * 2 + 3 * 2 + 2
    assert np.isfinite(model.params).all()


def test_absurd_declared_sizes_are_refused_without_huge_allocation(tmp_path: Path) -> None:
    import json

    arrays = {
        "format": np.array("fastdl-model"), "version": np.array(1),
        "config": np.array(json.dumps({"layers": [{"type": "Dense", "config": {"n_in": 10**9, "n_out": 10**9}}],
                                       "loss": "mse", "l2": 0.0, "l2_scale": "batch", "dtype": "float32",
                                       "seed": 0})),
        "params": np.zeros(3, np.float32), "state": np.zeros(0, np.float32),
    }
    path = tmp_path / "absurd.fdl"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ModelFileError, match="architecture needs"):
        fd.load(path, backend="reference")


def test_wrong_version_and_foreign_npz(tmp_path: Path) -> None:
    path = tmp_path / "foreign.npz"
    with open(path, "wb") as f:
        np.savez(f, a=np.arange(3))
    with pytest.raises(ModelFileError, match="not a fastdl model"):
        fd.load(path)


# ----------------------------------------------------------------------------- inputs users get wrong


def test_input_conversions_are_documented_and_correct() -> None:
    X, y = _data(12)
    model = _small_model()
    ref = model.predict_proba(X)
    np.testing.assert_array_equal(model.predict_proba(np.asfortranarray(X)), ref)
    np.testing.assert_array_equal(model.predict_proba(X[:, ::1].astype(np.float64)), ref)
    wide = np.zeros((12, 16), np.float32)
    wide[:, ::2] = X
    np.testing.assert_array_equal(model.predict_proba(wide[:, ::2]), ref)  # non-contiguous view

    class FrameLike:
        def __init__(self, a):
            self.a = a

        def to_numpy(self):
            return self.a

    np.testing.assert_array_equal(model.predict_proba(FrameLike(X)), ref)
    assert model.evaluate(X, y.astype(np.float64))["loss"] == model.evaluate(X, y)["loss"]
    with pytest.raises(ValueError, match="one-hot"):
        model.evaluate(X, np.eye(3)[y])
    with pytest.raises(ValueError, match="whole-number"):
        model.evaluate(X, y + 0.5)
