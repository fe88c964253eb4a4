"""The ``fastdl train`` command."""
from __future__ import annotations

import os
import re
import subprocess
import time
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


# ------------------------------------------------------- help, flags, ONNX, precision (issue 16)
def _subparsers():
    from fastdl.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", ["train", "search", "export-onnx"])
def test_every_option_has_help_and_shows_its_default(command):
    parser = _subparsers()[command]
    formatter = parser.formatter_class(prog="fastdl")
    for action in parser._actions:
        if action.option_strings == ["-h", "--help"] or not action.option_strings:
            continue  # positional arguments have no default
        assert action.help and len(action.help) >= 8, f"{action.option_strings} has no help"
        text = formatter._get_help_string(action)
        assert "default:" in text, f"{action.option_strings}: {text!r}"
    help_text = parser.format_help()
    assert "default: None" not in help_text and "default: [" not in help_text
    for action in parser._actions:
        if not action.option_strings:  # a required positional shows no default
            assert "default:" not in formatter._get_help_string(action)
    # options are never broken at their hyphen across lines ("--no-\nbatchnorm")
    assert not re.search(r"--[a-z]+-\n", help_text)


def test_help_of_the_batchnorm_flag_is_unambiguous(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--batchnorm, --no-batchnorm" in out
    block = out[out.index("--batchnorm, --no-batchnorm"):out.index("--keep-prob KEEP_PROB\n")]
    assert "(default: on)" in " ".join(block.split())
    assert "--export-onnx PATH" in out and "--precision {fp32,bf16}" in out
    for option in ("--lr LR", "--epochs EPOCHS", "--batch-size BATCH_SIZE", "--optimizer", "--schedule",
                   "--backend", "--dtype", "--seed SEED", "--activation"):
        start = out.index("\n  " + option) + 1
        chunk = out[start:out.index("\n  --", start + 1)]
        assert "default:" in chunk, chunk


@pytest.mark.parametrize("argv, expected", [([], True), (["--batchnorm"], True), (["--no-batchnorm"], False)])
def test_batchnorm_flag_reads_correctly(argv, expected):
    args = _subparsers()["train"].parse_args(argv)
    assert args.batchnorm is expected
    assert args.hidden == [128, 64] and args.precision == "fp32" and args.export_onnx is None


def test_precision_bf16_with_float64_is_an_error(capsys):
    rc = main(["train", "--epochs", "1", "--verbose", "0", "--precision", "bf16", "--dtype", "float64"])
    assert rc == 2
    assert "--precision bf16 needs --dtype float32" in capsys.readouterr().err


def test_precision_bf16_trains_or_says_why(capsys):
    rc = main(["train", "--epochs", "1", "--verbose", "0", "--hidden", "16", "--precision", "bf16"])
    out, err = capsys.readouterr()
    if rc != 0:  # Sequential(precision=) or a bf16 backend not there: a clean one-line error, no traceback
        assert rc == 2 and err.startswith("fastdl train: error:") and ("precision" in err or "bf16" in err), err
        pytest.skip(f"bf16 not available: {err.strip()}")
    assert set(results(out)) == {"train", "dev", "test"}


def test_export_onnx(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason='needs pip install "fastdl[onnx]"')
    onnx_path, model_path = tmp_path / "m.onnx", tmp_path / "m.fdl"
    rc = main(["train", "--epochs", "2", "--verbose", "0", "--hidden", "32", "--save", str(model_path),
               "--export-onnx", str(onnx_path)])
    out = capsys.readouterr().out
    assert rc == 0 and f"exported the inference graph to {onnx_path}" in out
    model = fd.load(model_path, backend="reference")
    std = fd.data.Standardizer.from_dict(load_metadata(model_path)["standardizer"])
    raw = fd.datasets.load_digits()[0][:50].astype(np.float32)
    # the exported graph standardises itself: it takes the raw pixels
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits, proba = sess.run(None, {"input": raw})
    assert np.abs(proba - model.predict_proba(std.transform(raw))).max() <= 1e-5


def test_export_onnx_without_the_extra_fails_before_training(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)
    rc = main(["train", "--epochs", "1", "--verbose", "0", "--export-onnx", str(tmp_path / "m.onnx")])
    captured = capsys.readouterr()
    assert rc == 2 and 'pip install "fastdl[onnx]"' in captured.err
    assert "trained" not in captured.out


def test_compilation_time_is_not_training_time(monkeypatch, capsys):
    """The reported training time and throughput exclude History.compile_time (the one-time Numba JIT)."""
    import types

    import fastdl.cli as cli

    clock = [100.0]
    monkeypatch.setattr(cli, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real_fit = fd.Sequential.fit

    def fit_taking_10s_of_which_4_compiling(self, *args, **kwargs):
        history = real_fit(self, *args, **kwargs)
        clock[0] += 10.0
        history.compile_time = 4.0
        return history

    monkeypatch.setattr(fd.Sequential, "fit", fit_taking_10s_of_which_4_compiling)
    assert cli.main(["train", "--epochs", "1", "--hidden", "8", "--verbose", "0", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    n_train = int(re.search(r"split train/dev/test = (\d+)/", out).group(1))
    assert f"trained 1 epochs in 6.00 s ({n_train / 6.0:,.0f} examples/s" in out, out
    assert "+ 4.00 s one-time compilation" in out


def test_export_onnx_command(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason='needs pip install "fastdl[onnx]"')
    model_path, raw_onnx, std_onnx = tmp_path / "m.fdl", tmp_path / "raw.onnx", tmp_path / "std.onnx"
    assert main(["train", "--epochs", "2", "--verbose", "0", "--hidden", "16", "--save", str(model_path)]) == 0
    capsys.readouterr()
    assert main(["export-onnx", str(model_path), str(raw_onnx)]) == 0
    assert "input: raw features" in capsys.readouterr().out
    assert main(["export-onnx", str(model_path), str(std_onnx), "--no-standardizer", "--opset", "13"]) == 0
    model = fd.load(model_path, backend="reference")
    std = fd.data.Standardizer.from_dict(load_metadata(model_path)["standardizer"])
    raw = fd.datasets.load_digits()[0][:40].astype(np.float32)
    expected = model.predict_proba(std.transform(raw))
    for path, x in ((raw_onnx, raw), (std_onnx, std.transform(raw).astype(np.float32))):
        proba = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probabilities"],
                                                                                         {"input": x})[0]
        assert np.abs(proba - expected).max() <= 1e-5
    assert main(["export-onnx", str(tmp_path / "missing.fdl"), str(raw_onnx)]) == 2
    assert "missing.fdl" in capsys.readouterr().err
