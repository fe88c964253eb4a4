"""Model files: round trips, atomic writes, and clear errors for bad files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import fastdl as fd
from fastdl.io import MAGIC, VERSION, load_metadata, load_model, load_optimizer, save_model

B = "reference"


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Tiny matrices: a multi-threaded BLAS only adds synchronisation cost (seconds on a
    loaded 2-core machine). Results do not depend on the thread count."""
    with threadpool_limits(1):
        yield


def make_data(m=40, n=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, n)).astype(np.float32), rng.integers(0, k, m)


def trained_model(dtype="float32", seed=0):
    X, y = make_data(seed=seed)
    model = fd.Sequential([fd.Dense(5, 8, use_bias=False), fd.BatchNorm(8), fd.ReLU(), fd.Dropout(keep_prob=0.8),
                           fd.Dense(8, 6), fd.Tanh(), fd.Dense(6, 3)],
                          l2=0.01, l2_scale="dataset", dtype=dtype, backend=B, seed=seed)
    opt = fd.Adam(0.01)
    model.fit(X, y, optimizer=opt, epochs=3, batch_size=16)
    return model, opt, X, y


def raw_arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip(tmp_path, dtype):
    model, _, X, _ = trained_model(dtype)
    assert not np.allclose(model.layers[1].running_mean, 0)  # BN statistics were trained
    path = tmp_path / "model.fdl"
    model.save(path)
    loaded = fd.load(path, backend=B)
    assert isinstance(loaded, fd.Sequential)
    assert loaded.dtype == model.dtype
    np.testing.assert_array_equal(loaded.params, model.params)
    np.testing.assert_array_equal(loaded.state, model.state)
    np.testing.assert_array_equal(loaded.layers[1].running_var, model.layers[1].running_var)
    assert loaded.get_config() == model.get_config()
    assert loaded.step_count == model.step_count
    assert loaded.l2 == 0.01 and loaded.l2_scale == "dataset"
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    # activation fusion is rebuilt the same way
    assert [(op.kind, op.act) for op in loaded.plan.ops] == [(op.kind, op.act) for op in model.plan.ops]
    # str paths work too, and the file is a plain npz without pickles
    save_model(model, str(tmp_path / "again.fdl"))
    arrays = raw_arrays(tmp_path / "again.fdl")
    assert str(arrays["format"]) == MAGIC and int(arrays["version"]) == VERSION
    assert json.loads(str(arrays["config"])) == model.get_config()


def test_round_trip_every_loss(tmp_path):
    X, _ = make_data()
    for loss, k in (("binary_cross_entropy", 1), ("mse", 2), ("sigmoid_bce", 1)):
        model = fd.Sequential([fd.Dense(5, 4), fd.Sigmoid(), fd.Dense(4, k)], loss=loss, backend=B, seed=1)
        model.save(tmp_path / "m.fdl")
        loaded = load_model(tmp_path / "m.fdl", backend=B)
        assert loaded.loss.name == model.loss.name
        np.testing.assert_array_equal(loaded.decision_function(X), model.decision_function(X))


def test_save_into_a_missing_directory_raises_naming_it(tmp_path):
    """Like np.save: a typo in the directory must not silently create a directory tree."""
    model, *_ = trained_model()
    path = tmp_path / "typo" / "b" / "m.fdl"
    with pytest.raises(FileNotFoundError, match="no such directory") as info:
        model.save(path)
    assert info.value.filename == str(path.parent)
    assert str(path.parent) in str(info.value)
    assert not (tmp_path / "typo").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        model.save(tmp_path / "file" / "m.fdl")


def test_save_onto_a_directory_names_the_target(tmp_path):
    model, *_ = trained_model()
    target = tmp_path / "out.fdl"
    target.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        model.save(target)
    assert info.value.filename == str(target)
    assert ".tmp" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["out.fdl"]  # no temporary file left behind


WRITER = """
import os, signal, sys, time
from fastdl._atomic import atomic_write

def write(f):
    f.write(b"PK partial model")
    f.flush()
    print("writing", flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)

atomic_write(sys.argv[2], write)
"""


def test_temp_files_of_killed_savers_are_removed_but_not_a_live_savers(tmp_path):
    import subprocess
    import sys

    model, *_ = trained_model()
    target = tmp_path / "m.fdl"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    killed = subprocess.run([sys.executable, str(script), "kill", str(target)], capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -9 and "writing" in killed.stdout
    stale = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].startswith(".m.fdl.")
    live = subprocess.Popen([sys.executable, str(script), "sleep", str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "writing"
        temps = {p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")}
        (live_tmp,) = temps - set(stale)
        assert f"-{live.pid}-" in live_tmp
        # unrelated files that merely look similar are never touched
        (tmp_path / ".m.fdl.not-ours.tmp").write_bytes(b"x")
        (tmp_path / ".other.fdl.00000000-999999999-00000000.tmp").write_bytes(b"x")
        model.save(target)
        left = {p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")}
        assert left == {live_tmp, ".m.fdl.not-ours.tmp", ".other.fdl.00000000-999999999-00000000.tmp"}
        np.testing.assert_array_equal(fd.load(target, backend=B).params, model.params)
    finally:
        live.kill()
        live.wait(timeout=60)
        live.stdout.close()
    model.save(target)  # the saver is gone now: its leftover goes too
    assert {p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")} == {
        ".m.fdl.not-ours.tmp", ".other.fdl.00000000-999999999-00000000.tmp"}


def test_loading_a_text_file_says_it_is_not_a_model_file(tmp_path):
    path = tmp_path / "notes.fdl"
    path.write_text("epochs: 10\nlr: 0.1\n")
    with pytest.raises(fd.ModelFileError, match="not a fastdl model file.*text file starting 'epochs: 10'"):
        fd.load(path)
    path.write_text("")
    with pytest.raises(fd.ModelFileError, match="empty"):
        fd.load(path)
    path.write_bytes(b"\x80\x04\x95 pickle bytes \x00\x01")
    with pytest.raises(fd.ModelFileError, match="not a fastdl model file") as info:
        fd.load(path)
    assert "pickle" not in str(info.value)


def test_optimizer_state_round_trip_and_resume(tmp_path):
    model, opt, X, y = trained_model(seed=2)
    path = tmp_path / "ckpt.fdl"
    model.save(path, optimizer=opt)
    opt2 = load_optimizer(path)
    assert type(opt2) is fd.Adam
    assert opt2.get_config() == opt.get_config()
    assert opt2.t == opt.t == 9
    assert set(opt2.state) == {"v", "s"}
    for k in ("v", "s"):
        np.testing.assert_array_equal(opt2.state[k], opt.state[k])
    # continuing from the file is bit-identical to continuing in memory
    model2 = fd.load(path, backend=B)
    model.fit(X, y, optimizer=opt, epochs=2, batch_size=16)
    model2.fit(X, y, optimizer=opt2, epochs=2, batch_size=16)
    np.testing.assert_array_equal(model2.params, model.params)
    np.testing.assert_array_equal(model2.state, model.state)
    assert opt2.t == opt.t


@pytest.mark.parametrize("opt", [fd.SGD(0.1), fd.Momentum(0.05, beta=0.8, bias_correction=True),
                                 fd.RMSprop(0.01, beta2=0.99, eps=1e-7)])
def test_other_optimizers_round_trip(tmp_path, opt):
    X, y = make_data()
    model = fd.Sequential([fd.Dense(5, 4), fd.ReLU(), fd.Dense(4, 3)], backend=B)
    model.fit(X, y, optimizer=opt, epochs=1, batch_size=20)
    model.save(tmp_path / "m.fdl", optimizer=opt)
    opt2 = load_optimizer(tmp_path / "m.fdl")
    assert type(opt2) is type(opt) and opt2.get_config() == opt.get_config() and opt2.t == opt.t == 2
    assert opt2.state.keys() == opt.state.keys()
    for k in opt.state:
        np.testing.assert_array_equal(opt2.state[k], opt.state[k])


def test_no_optimizer_and_no_metadata(tmp_path):
    model, *_ = trained_model()
    model.save(tmp_path / "m.fdl")
    assert load_optimizer(tmp_path / "m.fdl") is None
    assert load_metadata(tmp_path / "m.fdl") == {}


def test_metadata_round_trip(tmp_path):
    model, *_ = trained_model()
    meta = {"standardizer": {"mean": [0.5, 1.0], "var": [2.0, 3.0]}, "note": "digits", "n": 3, "ok": True}
    save_model(model, tmp_path / "m.fdl", metadata=meta)
    assert load_metadata(tmp_path / "m.fdl") == meta
    np.testing.assert_array_equal(fd.load(tmp_path / "m.fdl", backend=B).params, model.params)


# ----------------------------------------------------------------------------- atomic write


class Boom(RuntimeError):
    pass


def failing_savez(file, *args, **kwargs):
    file.write(b"PK\x03\x04 half a zip file")  # something reached the disk ...
    raise Boom("disk full")                   # ... then the write failed


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    model, opt, X, _ = trained_model()
    path = tmp_path / "m.fdl"
    model.save(path)
    before = path.read_bytes()
    model.params *= 2  # a newer model we fail to save
    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(Boom):
        model.save(path, optimizer=opt)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.fdl"]  # no temporary file left behind
    old = fd.load(path, backend=B)
    np.testing.assert_array_equal(old.params * 2, model.params)


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    model, *_ = trained_model()
    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(Boom):
        model.save(tmp_path / "m.fdl")
    assert os.listdir(tmp_path) == []


def test_interrupt_mid_write_is_cleaned_up(tmp_path, monkeypatch):
    model, *_ = trained_model()
    model.save(tmp_path / "m.fdl")
    before = (tmp_path / "m.fdl").read_bytes()

    def interrupted(file, *a, **k):
        file.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save(tmp_path / "m.fdl")
    assert (tmp_path / "m.fdl").read_bytes() == before
    assert os.listdir(tmp_path) == ["m.fdl"]


# ----------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model file"):
        fd.load(tmp_path / "nope.fdl")
    with pytest.raises(FileNotFoundError):
        load_optimizer(tmp_path / "nope.fdl")
    with pytest.raises(FileNotFoundError):
        fd.load(tmp_path)  # a directory is not a model file


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.fdl"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(fd.ModelFileError, match="not a (readable )?fastdl model file"):
        fd.load(path)
    path.write_bytes(b"")
    with pytest.raises(fd.ModelFileError, match="not a fastdl model file.*empty"):
        fd.load(path)
    assert issubclass(fd.ModelFileError, ValueError)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.9, 0.99])
def test_truncated_file(tmp_path, keep):
    model, opt, *_ = trained_model()
    model.save(tmp_path / "m.fdl", optimizer=opt)
    data = (tmp_path / "m.fdl").read_bytes()
    (tmp_path / "t.fdl").write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(fd.ModelFileError, match="t.fdl"):
        fd.load(tmp_path / "t.fdl")


def test_flipped_bytes_are_detected(tmp_path):
    model, *_ = trained_model()
    model.save(tmp_path / "m.fdl")
    data = bytearray((tmp_path / "m.fdl").read_bytes())
    # corrupt the stored params (zip checks each member's CRC)
    start = data.find(b"params.npy")
    pos = start + 200
    data[pos] ^= 0xFF
    (tmp_path / "c.fdl").write_bytes(bytes(data))
    with pytest.raises(fd.ModelFileError):
        fd.load(tmp_path / "c.fdl")


def test_plain_npz_without_marker(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, X=np.zeros((3, 2)), y=np.arange(3))
    with pytest.raises(fd.ModelFileError, match="not a fastdl model file.*format"):
        fd.load(path)
    np.savez(path, format=np.array("something-else"), version=np.array(1))
    with pytest.raises(fd.ModelFileError, match="format"):
        fd.load(path)


def test_bare_npy_file(tmp_path):
    path = tmp_path / "arr.npy"
    np.save(path, np.arange(5.0))
    with pytest.raises(fd.ModelFileError, match="bare .npy"):
        fd.load(path)


def rewrite(src, dst, **changes):
    arrays = raw_arrays(src)
    for k, v in changes.items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v
    np.savez(dst, **arrays)


def test_wrong_version(tmp_path):
    model, *_ = trained_model()
    model.save(tmp_path / "m.fdl")
    rewrite(tmp_path / "m.fdl", tmp_path / "v.npz", version=np.array(VERSION + 98))
    with pytest.raises(fd.ModelFileError, match=f"version {VERSION + 98}.*reads version {VERSION}"):
        fd.load(tmp_path / "v.npz")
    rewrite(tmp_path / "m.fdl", tmp_path / "nv.npz", version=None)
    with pytest.raises(fd.ModelFileError, match="version"):
        fd.load(tmp_path / "nv.npz")


def test_params_of_another_architecture(tmp_path):
    model, *_ = trained_model()
    other = fd.Sequential([fd.Dense(5, 3, use_bias=False), fd.BatchNorm(3), fd.ReLU(), fd.Dense(3, 3)],
                          backend=B)
    model.save(tmp_path / "m.fdl")
    other.save(tmp_path / "o.fdl")
    # other's architecture with model's weights
    rewrite(tmp_path / "o.fdl", tmp_path / "mix.npz", params=model.params)
    with pytest.raises(fd.ModelFileError, match=r"'params' has shape \(\d+,\) but the architecture needs"):
        fd.load(tmp_path / "mix.npz")
    rewrite(tmp_path / "o.fdl", tmp_path / "mix2.npz", state=model.state)
    with pytest.raises(fd.ModelFileError, match="'state' has shape"):
        fd.load(tmp_path / "mix2.npz")


def test_other_inconsistent_contents(tmp_path):
    model, *_ = trained_model()
    src = tmp_path / "m.fdl"
    model.save(src)
    rewrite(src, tmp_path / "dt.npz", params=model.params.astype(np.float64))
    with pytest.raises(fd.ModelFileError, match="float64 but the architecture says float32"):
        fd.load(tmp_path / "dt.npz")
    bad = model.params.copy()
    bad[3] = np.nan
    rewrite(src, tmp_path / "nan.npz", params=bad)
    with pytest.raises(fd.ModelFileError, match="NaN or infinite"):
        fd.load(tmp_path / "nan.npz")
    rewrite(src, tmp_path / "cfg.npz", config=np.array("{not json"))
    with pytest.raises(fd.ModelFileError, match="invalid architecture"):
        fd.load(tmp_path / "cfg.npz")
    cfg = model.get_config()
    cfg["layers"][0]["type"] = "Conv2D"
    rewrite(src, tmp_path / "layer.npz", config=np.array(json.dumps(cfg)))
    with pytest.raises(fd.ModelFileError, match="unknown layer type 'Conv2D'"):
        fd.load(tmp_path / "layer.npz")
    rewrite(src, tmp_path / "noparams.npz", params=None)
    with pytest.raises(fd.ModelFileError, match="missing 'params'"):
        fd.load(tmp_path / "noparams.npz")


def test_bad_optimizer_state(tmp_path):
    model, opt, *_ = trained_model()
    src = tmp_path / "m.fdl"
    model.save(src, optimizer=opt)
    rewrite(src, tmp_path / "o.npz", **{"opt.v": np.zeros(3, np.float32)})
    with pytest.raises(fd.ModelFileError, match="optimizer state 'v' has shape"):
        load_optimizer(tmp_path / "o.npz")
    rewrite(src, tmp_path / "t.npz", optimizer=np.array(json.dumps({"type": "Lion", "config": {}, "t": 1})))
    with pytest.raises(fd.ModelFileError, match="invalid optimizer state"):
        load_optimizer(tmp_path / "t.npz")


def test_files_without_precision_load_as_fp32(tmp_path):
    """Files written before mixed precision existed have no 'precision' in their config."""
    model, opt, X, _ = trained_model()
    model.save(tmp_path / "m.fdl")
    cfg = json.loads(str(raw_arrays(tmp_path / "m.fdl")["config"]))
    assert cfg.get("precision", "fp32") == "fp32"
    cfg.pop("precision", None)
    rewrite(tmp_path / "m.fdl", tmp_path / "old.npz", config=np.array(json.dumps(cfg)))
    old = fd.load(tmp_path / "old.npz", backend=B)
    assert old.get_config()["precision"] == "fp32"
    np.testing.assert_array_equal(old.predict_proba(X), model.predict_proba(X))


def test_check_target_raises_what_a_save_would_before_any_work(tmp_path):
    from fastdl._atomic import check_target

    assert check_target(tmp_path / "m.fdl") == tmp_path / "m.fdl"
    with pytest.raises(FileNotFoundError, match="no such directory"):
        check_target(tmp_path / "missing" / "m.fdl")
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        check_target(tmp_path / "d")
    assert sorted(os.listdir(tmp_path)) == ["d"]  # nothing written
