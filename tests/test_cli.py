"""The ``fastdl train`` command."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import fastdl as fd
from fastdl.cli import build_mlp, main
from fastdl.io import load_metadata, load_optimizer

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^\s*(train|dev|test): error (\d\.\d+)\s+accuracy (\d\.\d+)\s+loss (\d+\.\d+)", re.M)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Tiny matrices: a multi-threaded BLAS only adds synchronisation cost (seconds on a
    loaded 2-core machine). Results do not depend on the thread count."""
    with threadpool_limits(1):
        yield


def results(text: str) -> dict[str, tuple[float, float]]:
    return {m.group(1): (float(m.group(2)), float(m.group(3))) for m in LINE.finditer(text)}


def test_train_saves_a_model_that_loads_and_predicts(tmp_path, capsys):
    path = tmp_path / "m.fdl"
    rc = main(["train", "--epochs", "3", "--backend", "reference", "--verbose", "0", "--save", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    res = results(out)
    assert set(res) == {"train", "dev", "test"}, out
    for err, acc in res.values():
        assert 0 <= err <= 1 and err + acc == pytest.approx(1, abs=1e-4)
    assert res["train"][1] > 0.8  # three epochs are enough to learn most of the digits
    assert "trained 3 epochs" in out
    assert f"saved model to {path}" in out
    assert path.is_file()

    model = fd.load(path, backend="reference")
    assert model.n_features == 64 and model.n_outputs == 10
    meta = load_metadata(path)
    assert "standardizer" in meta
    assert isinstance(load_optimizer(path), fd.Adam)
    # predict the digits with the saved standardizer
    std = fd.data.Standardizer.from_dict(meta["standardizer"])
    X, y = fd.datasets.load_digits()
    pred = model.predict(std.transform(X))
    assert pred.shape == (1797,) and set(np.unique(pred)) <= set(range(10))
    assert np.mean(pred == y) > 0.8


def test_train_options(tmp_path, capsys):
    rc = main(["train", "--epochs", "2", "--backend", "reference", "--verbose", "0", "--hidden", "16",
               "--activation", "tanh", "--no-batchnorm", "--keep-prob", "1", "--optimizer", "momentum",
               "--lr", "0.1", "--schedule", "inverse_time", "--dtype", "float64", "--batch-size", "64",
               "--patience", "1", "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert set(results(out)) == {"train", "dev", "test"}
    assert "BatchNorm" not in out and "Dropout" not in out and "Tanh" in out
    assert "float64" in out


def test_train_on_a_data_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 4))
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    rc = main(["train", "--data", str(tmp_path / "d.npz"), "--epochs", "30", "--backend", "reference",
               "--verbose", "0", "--hidden", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "300 examples, 4 features, 2 classes" in out
    assert results(out)["test"][1] > 0.8


def test_verbose_2_prints_epochs(capsys):
    assert main(["train", "--epochs", "2", "--backend", "reference", "--verbose", "2", "--hidden", "8"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "abc"], "invalid int value: 'abc'"),
    (["--hidden", "64,x"], "comma-separated integers"),
    (["--hidden", "64,0"], "layer sizes must be >= 1"),
    (["--optimizer", "adamw"], "invalid choice: 'adamw'"),
    (["--backend", "gpu"], "invalid choice: 'gpu'"),
    (["--activation", "gelu"], "invalid choice"),
    (["--schedule", "cosine"], "invalid choice"),
    (["--lr", "fast"], "invalid float value"),
])
def test_bad_option_values_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--verbose", "0", "--backend", "reference", *argv] if "--backend" not in argv
             else ["train", "--verbose", "0", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "lr must be > 0"),
    (["--lr", "0"], "lr must be > 0"),
    (["--keep-prob", "0"], "keep_prob must be in (0, 1]"),
    (["--keep-prob", "1.5"], "keep_prob must be in (0, 1]"),
    (["--batch-size", "0"], "batch_size must be > 0"),
    (["--epochs", "-2"], "epochs must be >= 0"),
    (["--l2", "-0.1"], "l2 must be >= 0"),
    (["--beta2", "1.0"], "beta2 must be in"),
    (["--data", "/nonexistent/file.npz"], "file.npz"),
])
def test_bad_values_checked_by_the_library_exit_2(capsys, argv, message):
    rc = main(["train", "--epochs", "1", "--backend", "reference", "--verbose", "0", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("fastdl train: error:")
    assert message in err


def test_missing_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_build_mlp():
    layers = build_mlp(10, [8, 6], 3, activation="tanh", batchnorm=True, keep_prob=0.8)
    assert [type(x).__name__ for x in layers] == ["Dense", "BatchNorm", "Tanh", "Dropout",
                                                  "Dense", "BatchNorm", "Tanh", "Dropout", "Dense"]
    assert layers[0].use_bias is False and layers[0].init == "xavier"
    model = fd.Sequential(layers, backend="reference")
    assert model.n_features == 10 and model.n_outputs == 3


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = "1"  # see _one_blas_thread
    return env


def test_python_dash_m_fastdl(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastdl", "train", "--epochs", "2", "--backend", "reference",
                           "--verbose", "0"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=_env())
    assert proc.returncode == 0, proc.stderr
    assert set(results(proc.stdout)) == {"train", "dev", "test"}


def test_python_dash_m_fastdl_bad_option(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastdl", "train", "--lr", "-1", "--backend", "reference",
                           "--verbose", "0"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=_env())
    assert proc.returncode == 2
    assert "lr must be > 0" in proc.stderr


def test_default_training_reaches_95_percent_test_accuracy(capsys):
    rc = main(["train", "--backend", "reference", "--verbose", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    res = results(out)
    assert res["test"][1] >= 0.95, out
    assert "trained 40 epochs" in out


def test_train_says_which_blas_runs_the_gemms(capsys):
    pytest.importorskip("fastdl.backends.cython_backend", reason="Cython extensions not built")
    from fastdl.backends import blas

    rc = main(["train", "--backend", "cython", "--epochs", "2", "--verbose", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"backend=cython, GEMMs on {blas.info()['provider']})" in out, out


def test_unavailable_backend_is_a_clean_error(monkeypatch, capsys):
    """A backend that cannot load here (e.g. no compiled extension) must not end in a traceback."""
    import fastdl.backends as fb
    import fastdl.model as fm

    real = fm.get_backend

    def get_backend(name="auto"):
        if name == "cython":
            raise fb.BackendUnavailable("backend 'cython' is not available here (ImportError: simulated); "
                                        "use backend='auto' or one of ['reference']")
        return real(name)

    monkeypatch.setattr(fm, "get_backend", get_backend)
    rc = main(["train", "--epochs", "1", "--backend", "cython", "--verbose", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "fastdl train: error: backend 'cython' is not available here" in err
