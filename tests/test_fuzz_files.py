"""Hostile and malformed model files and checkpoints (issue 14 items 2 and 5).

Every file here is built member by member with a small zip writer, so a test
can set what ``np.savez`` never writes: lying sizes, other compression
methods, the encryption flag, duplicate members, decompression bombs. Whatever
the file, loading must either succeed with a complete, consistent model or
raise ``ModelFileError`` naming the problem -- never another exception, and
never use memory the file does not justify.
"""
from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastdl as fd
from fastdl.checkpoint import ResumeInfo, checkpoint_info, load_checkpoint, save_checkpoint
from fastdl.io import ModelFileError, load_metadata, load_optimizer

B = "reference"

# ----------------------------------------------------------------------------- a zip writer


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_header(shape, dtype: str, fortran: bool = False, version=(1, 0)) -> bytes:
    """A .npy header alone, declaring whatever the test wants."""
    d = {"descr": dtype, "fortran_order": fortran, "shape": tuple(shape)}
    buf = io.BytesIO()
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(buf, d)
    else:
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def member(name: str, data: bytes, *, method: int = 0, flags: int = 0, usize: int | None = None,
           raw: bytes | None = None, crc: int | None = None) -> dict:
    """One zip member. ``raw`` (already compressed bytes) and ``usize``/``crc`` override what ``data`` implies."""
    if raw is None:
        if method == zipfile.ZIP_DEFLATED:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            raw = c.compress(data) + c.flush()
        else:
            raw = data
    return {"name": name, "raw": raw, "method": method, "flags": flags,
            "usize": len(data) if usize is None else usize,
            "crc": zlib.crc32(data) if crc is None else crc}


def make_zip(members: list[dict]) -> bytes:
    out = bytearray()
    central = bytearray()
    for m in members:
        name = m["name"].encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, m["flags"], m["method"], 0, 0x21, m["crc"],
                           len(m["raw"]), m["usize"], len(name), 0) + name + m["raw"]
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, m["flags"], m["method"], 0, 0x21, m["crc"],
                               len(m["raw"]), m["usize"], len(name), 0, 0, 0, 0, 0, offset) + name
    cd_offset = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), cd_offset, 0)
    return bytes(out)


def members_of(blob: bytes) -> list[tuple[str, bytes]]:
    """(name, uncompressed bytes) of every member of a valid zip, in order."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def rebuild(parts: list[tuple[str, bytes]], **override) -> bytes:
    return make_zip([member(n, d, **override.get(n, {})) for n, d in parts])


# ----------------------------------------------------------------------------- valid files


def small_model(seed=0) -> fd.Sequential:
    return fd.Sequential([fd.Dense(4, 3, use_bias=False), fd.BatchNorm(3), fd.ReLU(), fd.Dense(3, 2)],
                         backend=B, seed=seed)


def trained(seed=0):
    rng = np.random.default_rng(seed)
    X, y = rng.standard_normal((24, 4)).astype(np.float32), rng.integers(0, 2, 24)
    model, opt = small_model(seed), fd.Adam(0.01)
    for step in range(3):  # a few optimiser steps without fit: these tests are about files only
        model.compute_gradients(X, y)
        opt.step(model.params, model.grads)
        model.step_count += 1
    return model, opt


def history_like(steps: int, epochs: int):
    return SimpleNamespace(history={"loss": [1.0 / (e + 1) for e in range(epochs)], "lr": [0.01] * epochs},
                           epoch=list(range(epochs)), batch_cost=[0.5 + i for i in range(steps)],
                           norms={"layers[0].W": {"weight": [1.0] * epochs, "grad": [0.1] * epochs}})


def callback_states(model) -> list[dict]:
    return [{"type": "EarlyStopping", "position": 0, "config": {"patience": 4},
             "values": {"best": 0.25, "wait": 2, "best_epoch": 1},
             "arrays": {"best_params": model.params * 2, "best_state": model.state + 1}},
            {"type": "Plateau", "position": 1, "config": {}, "values": {"bad": [1, 2]},
             "arrays": {"counts": np.arange(5, dtype=np.int64)}}]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("valid")
    model, opt = trained()
    model.save(d / "m.fdl", optimizer=opt)
    fd.io.save_model(model, d / "meta.fdl", metadata={"standardizer": {"mean": [0.5, 1.0]}})
    save_checkpoint(d / "c.ckpt", model, opt, history_like(model.step_count, 2), next_epoch=2,
                    run_info={"n_examples": 24, "batch_size": 8}, callback_states=callback_states(model),
                    finished=False, schedule_state={"k": 1})
    return {"model": (d / "m.fdl").read_bytes(), "meta": (d / "meta.fdl").read_bytes(),
            "ckpt": (d / "c.ckpt").read_bytes()}


def fresh():
    model, opt = small_model(), fd.Adam(0.01)
    return model, opt, history_like(0, 0)


def resume(path):
    model, opt, hist = fresh()
    info = load_checkpoint(path, model, opt, hist, {"n_examples": 24, "batch_size": 8})
    return info, model, opt, hist


# ----------------------------------------------------------------------------- checkpoints: round trip


def test_checkpoint_round_trip_with_callback_states(tmp_path, files):
    path = tmp_path / "c.ckpt"
    path.write_bytes(files["ckpt"])
    ref, ref_opt = trained()
    info, model, opt, hist = resume(path)
    assert isinstance(info, ResumeInfo)
    assert info.next_epoch == 2 and info.finished is False and info.schedule_state == {"k": 1}
    np.testing.assert_array_equal(model.params, ref.params)
    np.testing.assert_array_equal(model.state, ref.state)
    assert model.step_count == ref.step_count == 3 and opt.t == ref_opt.t == 3
    for k in ("v", "s"):
        np.testing.assert_array_equal(opt.state[k], ref_opt.state[k])
    assert hist.batch_cost == [0.5, 1.5, 2.5] and hist.epoch == [0, 1] and hist.history["loss"] == [1.0, 0.5]
    assert hist.norms == {"layers[0].W": {"weight": [1.0, 1.0], "grad": [0.1, 0.1]}}
    want = callback_states(ref)
    assert [(d["type"], d["position"], d["config"], d["values"]) for d in info.callback_states] == \
        [(d["type"], d["position"], d["config"], d["values"]) for d in want]
    for got, exp in zip(info.callback_states, want):
        assert got["arrays"].keys() == exp["arrays"].keys()
        for k in exp["arrays"]:
            assert got["arrays"][k].dtype == exp["arrays"][k].dtype
            np.testing.assert_array_equal(got["arrays"][k], exp["arrays"][k])
    assert checkpoint_info(path)["callbacks"] == [{"type": "EarlyStopping", "position": 0},
                                                  {"type": "Plateau", "position": 1}]
    # a checkpoint is also a model file
    np.testing.assert_array_equal(fd.load(path, backend=B).params, ref.params)


@pytest.mark.parametrize("finished, stored", [(False, False), ("early_stop", "early_stop"),
                                              ("completed", "completed"), (True, "completed")])
def test_finished_reason_round_trips(tmp_path, finished, stored):
    model, opt = trained()
    save_checkpoint(tmp_path / "c", model, opt, history_like(3, 1), next_epoch=1, run_info={"n_examples": 24,
                    "batch_size": 8}, callback_states=[], finished=finished)
    assert checkpoint_info(tmp_path / "c")["finished"] == stored
    info, *_ = resume(tmp_path / "c")
    assert info.finished == stored and info.callback_states == [] and info.schedule_state is None


def test_finished_must_be_a_known_reason(tmp_path):
    model, opt = trained()
    with pytest.raises(ValueError, match="finished must be"):
        save_checkpoint(tmp_path / "c", model, opt, history_like(3, 1), next_epoch=1, run_info={},
                        finished="yes")
    assert not (tmp_path / "c").exists()


def test_a_refused_checkpoint_changes_nothing(tmp_path, files):
    parts = members_of(files["ckpt"])
    parts = [(n, d) for n, d in parts if n != "opt.s.npy"]
    (tmp_path / "c").write_bytes(rebuild(parts))
    model, opt, hist = fresh()
    before = model.params.copy()
    with pytest.raises(ModelFileError, match=r"missing optimizer state opt\.s"):
        load_checkpoint(tmp_path / "c", model, opt, hist, {"n_examples": 24, "batch_size": 8})
    np.testing.assert_array_equal(model.params, before)
    assert opt.t == 0 and opt.state == {} and hist.batch_cost == [] and model.step_count == 0


def test_checkpoint_of_another_run_or_optimizer_is_refused(tmp_path, files):
    path = tmp_path / "c"
    path.write_bytes(files["ckpt"])
    model, opt, hist = fresh()
    with pytest.raises(ModelFileError, match="batch_size"):
        load_checkpoint(path, model, opt, hist, {"n_examples": 24, "batch_size": 4})
    with pytest.raises(ModelFileError, match="holds optimizer Adam, not SGD"):
        load_checkpoint(path, model, fd.SGD(0.1), hist, {"n_examples": 24, "batch_size": 8})
    other = fd.Sequential([fd.Dense(4, 2)], backend=B)
    with pytest.raises(ModelFileError, match="different model"):
        load_checkpoint(path, other, opt, hist, {"n_examples": 24, "batch_size": 8})
    (tmp_path / "m").write_bytes(files["model"])
    with pytest.raises(ModelFileError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "m", model, opt, hist, {"n_examples": 24, "batch_size": 8})


def test_old_format_checkpoint_is_refused_with_the_reason(tmp_path):
    model, opt = trained()
    fd.io.save_model(model, tmp_path / "old", optimizer=opt, metadata={"checkpoint": {
        "next_epoch": 1, "run": {"n_examples": 24, "batch_size": 8}, "history": {}, "epochs": [],
        "batch_cost": [], "norms": {}}})
    m, o, h = fresh()
    with pytest.raises(ModelFileError, match="older fastdl"):
        load_checkpoint(tmp_path / "old", m, o, h, {"n_examples": 24, "batch_size": 8})


@pytest.mark.parametrize("drop", ["format", "version", "config", "params", "state", "step_count", "optimizer",
                                  "opt.v", "opt.s", "checkpoint", "history", "history.batch_cost",
                                  "cb.0.best_params", "cb.1.counts"])
def test_a_checkpoint_missing_any_part_is_refused(tmp_path, files, drop):
    parts = [(n, d) for n, d in members_of(files["ckpt"]) if n != drop + ".npy"]
    assert len(parts) == len(members_of(files["ckpt"])) - 1
    (tmp_path / "c").write_bytes(rebuild(parts))
    with pytest.raises(ModelFileError):
        resume(tmp_path / "c")


def json_member(parts, name, fn):
    """Rewrite JSON member ``name`` (either text layout) with ``fn(obj) -> obj``."""
    out = []
    for n, d in parts:
        if n == name + ".npy":
            arr = np.load(io.BytesIO(d), allow_pickle=False)
            if arr.dtype == np.uint8:
                obj = fn(json.loads(arr.tobytes().decode()))
                d = npy(np.frombuffer(json.dumps(obj).encode(), np.uint8))
            else:
                d = npy(np.array(json.dumps(fn(json.loads(str(arr))))))
        out.append((n, d))
    return out


def _set(path, value):
    def fn(obj):
        o = obj
        for k in path[:-1]:
            o = o[k]
        o[path[-1]] = value
        return obj
    return fn


@pytest.mark.parametrize("path, value, match", [
    (("next_epoch",), -1, "next_epoch"),
    (("next_epoch",), "3", "next_epoch"),
    (("finished",), "yes", "finished"),
    (("finished",), 1, "finished"),
    (("run",), [1], "run must be an object"),
    (("callbacks",), {"a": 1}, "callbacks must be a list"),
    (("callbacks", 0, "position"), "0", "callbacks\\[0\\]"),
    (("callbacks", 1, "position"), 0, "repeats position"),
    (("callbacks", 0, "arrays", "best_params", "shape"), [10 ** 12], "best_params|callback arrays"),
    (("callbacks", 0, "arrays", "best_params", "dtype"), "object", "invalid name, shape or dtype"),
    (("checkpoint_version",), 99, "checkpoint version 99"),
])
def test_malformed_checkpoint_metadata_is_refused(tmp_path, files, path, value, match):
    parts = json_member(members_of(files["ckpt"]), "checkpoint", _set(path, value))
    (tmp_path / "c").write_bytes(rebuild(parts))
    with pytest.raises(ModelFileError, match=match):
        resume(tmp_path / "c")


@pytest.mark.parametrize("t, match", [(-1, "t=-1"), ("3", "t='3'"), (2.5, "t=2.5"), (None, "t=None")])
def test_adam_step_count_must_be_a_non_negative_integer(tmp_path, files, t, match):
    for key in ("ckpt", "model"):
        parts = json_member(members_of(files[key]), "optimizer", _set(("t",), t))
        (tmp_path / "c").write_bytes(rebuild(parts))
        with pytest.raises(ModelFileError, match=match):
            resume(tmp_path / "c") if key == "ckpt" else load_optimizer(tmp_path / "c")


def test_missing_optimizer_array_is_refused_in_model_files_too(tmp_path, files):
    parts = [(n, d) for n, d in members_of(files["model"]) if n != "opt.s.npy"]
    (tmp_path / "m").write_bytes(rebuild(parts))
    with pytest.raises(ModelFileError, match=r"missing optimizer state opt\.s"):
        load_optimizer(tmp_path / "m")


def test_history_longer_than_the_steps_taken_is_refused(tmp_path, files):
    parts = [(n, npy(np.zeros(4)) if n == "history.batch_cost.npy" else d) for n, d in members_of(files["ckpt"])]
    (tmp_path / "c").write_bytes(rebuild(parts))
    with pytest.raises(ModelFileError, match="4 entries but only 3 steps"):
        resume(tmp_path / "c")


# ----------------------------------------------------------------------------- malformed model files


def replaced(blob, name, data):
    return rebuild([(n, data if n == name + ".npy" else d) for n, d in members_of(blob)])


@pytest.mark.parametrize("name, data, match", [
    ("version", npy(np.array([1, 1])), "'version' must be one integer"),
    ("version", npy(np.array("one")), "'version' must be one integer"),
    ("version", npy(np.array(1.0)), "'version' must be one integer"),
    ("version", npy(np.array(2 ** 40)), "format version 1099511627776"),
    ("step_count", npy(np.array([3, 4])), "'step_count' must be one integer"),
    ("step_count", npy(np.array(-5)), "'step_count' is -5"),
    ("format", npy(np.array([1, 2])), "bad 'format' marker"),
    ("config", npy(np.array("[" * 100000 + "]" * 100000)), "nested 100000 levels deep"),
    ("config", npy(np.array('{"layers": ' + "[" * 5000 + "]" * 5000 + "}")), "nested"),
    ("config", npy(np.array('{"layers": 3}')), "invalid architecture"),
    ("config", npy(np.array('{"layers": [{"type": "Dense", "config": {"n_in": "4", "n_out": 3}}]}')),
     "invalid architecture: layers\\[0\\]"),
    ("config", npy(np.arange(5)), "'config' must be a string"),
    ("params", npy_header((10 ** 12,), "<f4") + b"\0" * 64, "declares shape \\(1000000000000,\\)"),
    ("params", npy_header((2 ** 62, 2 ** 62), "<f4") + b"\0" * 64, "declares shape|invalid"),
    ("params", npy(np.zeros(26, np.float32))[:40] + b"{'descr': 'O'", "invalid .npy header"),
    ("params", npy_header((26,), "|O") + b"\0" * 208, "Python objects"),
    ("params", b"\x93NUMPY\x07\x00" + b"\0" * 120, "invalid .npy header"),
    ("params", npy(np.zeros(27, np.float32)), "'params' has shape \\(27,\\) but the architecture needs \\(26,\\)"),
    ("params", npy(np.zeros(26, np.int32)), "'params' is int32"),
    ("state", npy(np.full(6, np.inf, np.float32)), "'state' contains NaN or infinite"),
    ("opt.v", npy(np.zeros(26, np.float32))[:-4], "declares shape"),
])
def test_malformed_members_give_model_file_error(tmp_path, files, name, data, match):
    (tmp_path / "m").write_bytes(replaced(files["model"], name, data))
    with pytest.raises(ModelFileError, match=match):
        fd.load(tmp_path / "m", backend=B)
        load_optimizer(tmp_path / "m")


def test_big_endian_and_fortran_arrays_from_other_writers_load(tmp_path, files):
    model, _ = trained()
    data = npy(model.params.astype(">f4"))
    (tmp_path / "m").write_bytes(replaced(files["model"], "params", data))
    np.testing.assert_array_equal(fd.load(tmp_path / "m", backend=B).params, model.params)


@pytest.mark.parametrize("method", [1, 9, 12, 14, 93, 99])
def test_unsupported_compression_is_refused(tmp_path, files, method):
    parts = members_of(files["model"])
    (tmp_path / "m").write_bytes(rebuild(parts, **{"params.npy": {"method": method}}))
    with pytest.raises(ModelFileError, match=f"compression method {method}"):
        fd.load(tmp_path / "m", backend=B)


def test_deflated_members_from_other_writers_load(tmp_path, files):
    parts = members_of(files["model"])
    (tmp_path / "m").write_bytes(rebuild(parts, **{n: {"method": 8} for n, _ in parts}))
    model, _ = trained()
    np.testing.assert_array_equal(fd.load(tmp_path / "m", backend=B).params, model.params)
    assert load_optimizer(tmp_path / "m").t == 3


def test_encrypted_flag_is_refused(tmp_path, files):
    parts = members_of(files["model"])
    (tmp_path / "m").write_bytes(rebuild(parts, **{"config.npy": {"flags": 1}}))
    with pytest.raises(ModelFileError, match="'config.npy' is encrypted"):
        fd.load(tmp_path / "m", backend=B)


def test_duplicate_unknown_and_foreign_members_are_refused(tmp_path, files):
    parts = members_of(files["model"])
    cases = [(parts + [parts[3]], "twice"), (parts + [("extra.npy", npy(np.zeros(3)))], "unknown member 'extra.npy'"),
             (parts + [("readme.txt", b"hi")], "unexpected member 'readme.txt'"),
             (parts + [("opt.w.npy", npy(np.zeros(26, np.float32)))], "optimizer arrays \\['w'\\]"),
             (parts + [("cb.0.x.npy", npy(np.zeros(3)))], "checkpoint members")]
    for i, (p, match) in enumerate(cases):
        (tmp_path / f"m{i}").write_bytes(rebuild(p))
        with pytest.raises(ModelFileError, match=match):
            fd.load(tmp_path / f"m{i}", backend=B)
            load_checkpoint(tmp_path / f"m{i}", *fresh(), {})


def test_lying_sizes_and_crc_are_refused(tmp_path, files):
    parts = members_of(files["model"])
    for i, override in enumerate([{"usize": 10 ** 9}, {"crc": 12345}, {"usize": 3}]):
        (tmp_path / f"m{i}").write_bytes(rebuild(parts, **{"params.npy": override}))
        with pytest.raises(ModelFileError):
            fd.load(tmp_path / f"m{i}", backend=B)


def test_metadata_must_be_an_object_and_capped_in_depth(tmp_path, files):
    (tmp_path / "m").write_bytes(replaced(files["meta"], "metadata", npy(np.array("[1, 2]"))))
    with pytest.raises(ModelFileError, match="'metadata' must be a JSON object"):
        load_metadata(tmp_path / "m")
    (tmp_path / "m").write_bytes(replaced(files["meta"], "metadata", npy(np.array('{"a": ' + "[" * 50 + "]" * 50
                                                                                   + "}"))))
    with pytest.raises(ModelFileError, match="nested 51 levels"):
        load_metadata(tmp_path / "m")


# ----------------------------------------------------------------------------- decompression bombs

BOMB_ZEROS = 5 * 10 ** 8  # float32 zeros: 2 GB uncompressed, ~1.9 MB deflated


def bomb_member(name: str) -> dict:
    """A deflated .npy of BOMB_ZEROS float32 zeros, built without ever holding 2 GB.

    Each 4 MB chunk is compressed with a full flush, which makes its compressed
    form independent of what came before: the same bytes can be repeated.
    """
    chunk = bytes(4 * 10 ** 6)
    n_chunks = 4 * BOMB_ZEROS // len(chunk)
    header = npy_header((BOMB_ZEROS,), "<f4")
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    piece = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH) == piece
    tail = c.flush()
    crc = zlib.crc32(header)
    for _ in range(n_chunks):
        crc = zlib.crc32(chunk, crc)
    return {"name": name, "raw": head + piece * n_chunks + tail, "method": 8, "flags": 0,
            "usize": len(header) + n_chunks * len(chunk), "crc": crc}


@pytest.fixture(scope="module")
def bombs(tmp_path_factory, files) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bombs")
    bare = d / "bomb.fdl"
    bare.write_bytes(make_zip([bomb_member("arr_0.npy")]))
    assert 1.5e6 < bare.stat().st_size < 2.5e6  # the 1.9 MB file
    with zipfile.ZipFile(bare) as z:  # it is a real, valid zip
        assert z.infolist()[0].file_size == 4 * BOMB_ZEROS + 128
    extra = d / "extra.fdl"
    extra.write_bytes(make_zip([member(n, data) for n, data in members_of(files["model"])]
                               + [bomb_member("arr_0.npy")]))
    disguised = d / "params.fdl"  # the bomb as 'params' of a model that needs 26 parameters
    disguised.write_bytes(make_zip([bomb_member("params.npy") if n == "params.npy" else member(n, data)
                                    for n, data in members_of(files["model"])]))
    ckpt = d / "bomb.ckpt"
    ckpt.write_bytes(make_zip([member(n, data) for n, data in members_of(files["ckpt"])
                               if n != "history.batch_cost.npy"] + [bomb_member("history.batch_cost.npy")]))
    return {"bare": bare, "extra": extra, "params": disguised, "ckpt": ckpt}


RSS_PROBE = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import fastdl as fd
    from fastdl.checkpoint import load_checkpoint
    kind, path = sys.argv[1], sys.argv[2]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        if kind == "ckpt":
            model = fd.Sequential([fd.Dense(4, 3, use_bias=False), fd.BatchNorm(3), fd.ReLU(), fd.Dense(3, 2)],
                                  backend="reference")
            from types import SimpleNamespace
            h = SimpleNamespace(history={}, epoch=[], batch_cost=[], norms={})
            load_checkpoint(path, model, fd.Adam(0.01), h, {"n_examples": 24, "batch_size": 8})
        else:
            fd.load(path, backend="reference")
        print("LOADED")
    except fd.ModelFileError as exc:
        print("ModelFileError:", exc)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("GROWTH_KB", after - before)
""")


@pytest.mark.parametrize("kind, match", [("bare", "not a fastdl model file"),
                                         ("extra", "unknown member 'arr_0.npy'"),
                                         ("params", "decompression bomb"),
                                         ("ckpt", "decompression bomb")])
def test_decompression_bomb_is_refused_without_decompressing(tmp_path, bombs, kind, match):
    script = tmp_path / "probe.py"
    script.write_text(RSS_PROBE)
    proc = subprocess.run([sys.executable, str(script), kind, str(bombs[kind])], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ModelFileError" in proc.stdout and "LOADED" not in proc.stdout
    import re

    assert re.search(match, proc.stdout), proc.stdout
    growth_mb = int(proc.stdout.split("GROWTH_KB")[1]) / 1024
    assert growth_mb < 50, f"peak RSS grew by {growth_mb:.0f} MB while refusing a {kind} bomb"


def test_size_checks_come_before_decompression_even_at_modest_ratios(tmp_path, files):
    """A deflated 'params' that claims the wrong size is refused from its header, whatever its ratio."""
    parts = members_of(files["model"])
    wrong = npy(np.zeros(200_000, np.float32))  # 800 KB of zeros: below the inflation-ratio threshold
    (tmp_path / "m").write_bytes(rebuild([(n, wrong if n == "params.npy" else d) for n, d in parts],
                                         **{"params.npy": {"method": 8}}))
    with pytest.raises(ModelFileError, match="'params' has shape \\(200000,\\) but the architecture needs"):
        fd.load(tmp_path / "m", backend=B)


# ----------------------------------------------------------------------------- structured fuzzing

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8)
DTYPES = ["<f4", "<f8", ">f4", "<i8", "<i4", "|u1", "|b1", "<U7", "|S4", "<c8", "|O", "[('a', '<f4')]", "<f2"]
SHAPES = st.lists(st.integers(0, 40), max_size=3).map(tuple) | st.sampled_from([(10 ** 12,), (2 ** 63 - 1,), (-1,)])


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def mutate(data, parts: list[tuple[str, bytes]]) -> bytes:
    """One structured mutation of a valid file, then maybe byte flips."""
    parts = list(parts)
    names = [n for n, _ in parts]
    kind = data.draw(st.sampled_from(["drop", "dup", "rename", "json", "header", "scalar", "truncate_member",
                                      "method", "flags", "usize", "truncate_file"]))
    override: dict = {}
    if kind == "drop":
        del parts[data.draw(st.integers(0, len(parts) - 1))]
    elif kind == "dup":
        parts.append(parts[data.draw(st.integers(0, len(parts) - 1))])
    elif kind == "rename":
        i = data.draw(st.integers(0, len(parts) - 1))
        new = data.draw(st.sampled_from(names + ["opt.x.npy", "cb.7.a.npy", "arr_0.npy", "config", "../x.npy"]))
        parts[i] = (new, parts[i][1])
    elif kind == "json":
        jsons = [n for n in names if n[:-4] in ("config", "optimizer", "checkpoint", "history", "metadata")]
        if jsons:
            name = data.draw(st.sampled_from(jsons))
            arr = np.load(io.BytesIO(dict(parts)[name]), allow_pickle=False)
            text = arr.tobytes().decode() if arr.dtype == np.uint8 else str(arr)
            obj = json.loads(text)
            path = data.draw(st.sampled_from(list(_paths(obj))))
            value = data.draw(JSON_VALUES)
            if path:
                o = obj
                for k in path[:-1]:
                    o = o[k]
                if data.draw(st.booleans()) and isinstance(o, dict):
                    del o[path[-1]]
                else:
                    o[path[-1]] = value
            else:
                obj = value
            new = json.dumps(obj)
            blob = npy(np.frombuffer(new.encode(), np.uint8)) if arr.dtype == np.uint8 else npy(np.array(new))
            parts = [(n, blob if n == name else d) for n, d in parts]
    elif kind == "header":
        i = data.draw(st.integers(0, len(parts) - 1))
        name, d = parts[i]
        try:
            hdr = npy_header(data.draw(SHAPES), data.draw(st.sampled_from(DTYPES)), data.draw(st.booleans()))
        except Exception:  # noqa: BLE001 - numpy refuses to write some headers: write a broken one by hand
            hdr = b"\x93NUMPY\x01\x00" + struct.pack("<H", 10) + b"{'descr':}"
        body = d[len(npy_header((0,), "<f4")):] if data.draw(st.booleans()) else d[128:]
        parts[i] = (name, hdr + body)
    elif kind == "scalar":
        name = data.draw(st.sampled_from([n for n in names if n[:-4] in ("version", "step_count", "format")]))
        value = data.draw(st.sampled_from([np.array([1, 2]), np.array("one"), np.array(1.5), np.array(-1),
                                           np.array(2 ** 62), np.array(True), np.zeros((0,)), np.array(b"x")]))
        parts = [(n, npy(value) if n == name else d) for n, d in parts]
    elif kind == "truncate_member":
        i = data.draw(st.integers(0, len(parts) - 1))
        name, d = parts[i]
        parts[i] = (name, d[:data.draw(st.integers(0, max(len(d) - 1, 0)))])
    elif kind in ("method", "flags", "usize"):
        name = data.draw(st.sampled_from(names))
        if kind == "method":
            override[name] = {"method": data.draw(st.sampled_from([0, 8, 8, 1, 9, 12, 14, 95, 99]))}
        elif kind == "flags":
            override[name] = {"flags": data.draw(st.sampled_from([1, 8, 64, 0x41, 0x800]))}
        else:
            size = len(dict(parts)[name])
            override[name] = {"usize": data.draw(st.sampled_from([0, size - 1, size + 1, 2 ** 31, 2 ** 32 - 1]))}
    blob = bytearray(rebuild(parts, **override))
    if kind == "truncate_file":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    for _ in range(data.draw(st.integers(0, 3))):
        if blob:
            j = data.draw(st.integers(0, len(blob) - 1))
            blob[j] ^= data.draw(st.integers(1, 255))
    return bytes(blob)


def _assert_consistent(model) -> None:
    assert model.params.size == 4 * 3 + 3 * 2 + 3 * 2 + 2
    assert model.state.size == 6
    assert np.isfinite(model.params).all() and np.isfinite(model.state).all()


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@FUZZ
@given(data=st.data())
def test_fuzzed_model_files(tmp_path_factory, files, data):
    blob = mutate(data, members_of(files[data.draw(st.sampled_from(["model", "meta"]))]))
    path = tmp_path_factory.mktemp("fz") / "m.fdl"
    path.write_bytes(blob)
    for load in (lambda: _assert_consistent(fd.load(path, backend=B)), lambda: load_optimizer(path),
                 lambda: load_metadata(path)):
        try:
            load()
        except ModelFileError as exc:
            assert str(path) in str(exc)


@FUZZ
@given(data=st.data())
def test_fuzzed_checkpoints(tmp_path_factory, files, data):
    blob = mutate(data, members_of(files["ckpt"]))
    path = tmp_path_factory.mktemp("fz") / "c.ckpt"
    path.write_bytes(blob)
    try:
        info, model, opt, hist = resume(path)
    except ModelFileError:
        pass
    else:  # a mutation that kept the file valid (e.g. a flipped mantissa bit) must give a complete state
        _assert_consistent(model)
        assert set(opt.state) == {"v", "s"} and opt.t >= 0 and info.next_epoch >= 0
        assert len(hist.batch_cost) <= model.step_count
    try:
        checkpoint_info(path)
    except ModelFileError:
        pass


def test_a_checkpoint_is_opened_and_read_once(tmp_path, files, monkeypatch):
    """Issue 14.2: one open and one pass over the file, not one np.load per part."""
    import builtins

    import fastdl.io as fio

    path = tmp_path / "c.ckpt"
    path.write_bytes(files["ckpt"])
    opened = []

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(fio, "open", counting_open, raising=False)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load decompresses whole members"))
    info, model, _, _ = resume(path)
    assert opened == [str(path)]
    assert info.next_epoch == 2
    names = {n for n, _ in members_of(files["ckpt"])}
    reads = {}
    real_open = zipfile.ZipFile.open

    def counting_member_open(self, name, *args, **kwargs):
        key = getattr(name, "filename", name)
        reads[key] = reads.get(key, 0) + 1
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", counting_member_open)
    resume(path)
    # each member is decompressed at most twice: once for its header check, once for its data
    assert set(reads) == names
    assert max(reads.values()) <= 2, reads
