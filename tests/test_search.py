"""Hyperparameter search (SPEC.md "Hyperparameter sampling"): samplers, coarse to fine, parallel runs."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest

import fastdl as fd
from fastdl.cli import main
from fastdl.search import (Choice, IntUniform, LogUniform, OneMinusLogUniform, SearchResult, Uniform, parse_setting,
                           sample_space, search, shrink_space)


class FixedRng:
    """Stands in for a Generator: uniform() returns the low end (or the high end)."""

    def __init__(self, high: bool = False):
        self.high = high

    def uniform(self, lo, hi, size=None):
        return hi if self.high else lo


# ================================================================ samplers
def test_log_uniform_samples_the_exponent_uniformly():
    s = LogUniform(1e-4, 1e-1)
    assert (s.lo, s.hi) == (-4, -1)
    x = np.array([s.sample(np.random.default_rng(i)) for i in range(3000)])
    assert x.min() >= 1e-4 and x.max() <= 1e-1
    r = np.log10(x)
    # each decade equally likely: r ~ U[-4, -1]
    counts = np.histogram(r, bins=[-4, -3, -2, -1])[0] / len(r)
    assert np.allclose(counts, 1 / 3, atol=0.04)
    assert s.sample(FixedRng()) == pytest.approx(1e-4) and s.sample(FixedRng(True)) == pytest.approx(1e-1)
    assert s.log


def test_one_minus_log_uniform_for_betas():
    s = OneMinusLogUniform(0.9, 0.999)
    assert (s.lo, s.hi) == (pytest.approx(-3), pytest.approx(-1))       # SPEC: r in [-3, -1]
    assert s.sample(FixedRng()) == pytest.approx(0.999)                  # r = -3
    assert s.sample(FixedRng(True)) == pytest.approx(0.9)                # r = -1
    b = np.array([s.sample(np.random.default_rng(i)) for i in range(3000)])
    assert b.min() >= 0.9 and b.max() <= 0.999
    # as many betas in 0.9..0.99 as in 0.99..0.999 (a plain uniform would put 91% in the first)
    assert np.mean(b > 0.99) == pytest.approx(0.5, abs=0.04)


def test_int_uniform_includes_both_ends():
    s = IntUniform(1, 3)
    vals = [s.sample(np.random.default_rng(i)) for i in range(200)]
    assert set(vals) == {1, 2, 3} and all(type(v) is int for v in vals)
    lg = IntUniform(16, 256, log=True)
    v = np.array([lg.sample(np.random.default_rng(i)) for i in range(3000)])
    assert v.min() >= 16 and v.max() <= 256
    assert np.mean(v < 64) == pytest.approx(0.5, abs=0.05)               # log scale: 16..64 ~ 64..256


def test_uniform_and_choice():
    u = Uniform(0.5, 1.0)
    v = [u.sample(np.random.default_rng(i)) for i in range(500)]
    assert 0.5 <= min(v) and max(v) <= 1.0 and np.mean(v) == pytest.approx(0.75, abs=0.02) and not u.log
    c = Choice(["relu", "tanh"])
    assert {c.sample(np.random.default_rng(i)) for i in range(50)} == {"relu", "tanh"}


@pytest.mark.parametrize("make, match", [
    (lambda: LogUniform(1e-1, 1e-4), "low < high"),
    (lambda: LogUniform(0.0, 1.0), "low > 0"),
    (lambda: LogUniform(-1.0, 1.0), "low > 0"),
    (lambda: Uniform(1.0, 1.0), "low < high"),
    (lambda: IntUniform(3, 3), "low < high"),
    (lambda: IntUniform(0, 4, log=True), "low >= 1"),
    (lambda: OneMinusLogUniform(0.999, 0.9), "beta_min < beta_max"),
    (lambda: OneMinusLogUniform(0.9, 1.0), "beta_max < 1"),
    (lambda: Choice([]), "at least one"),
])
def test_bad_sampler_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make", [lambda: IntUniform(1.5, 3), lambda: Uniform("a", 1),
                                  lambda: LogUniform(1e-3, math.inf), lambda: Choice("abc"),
                                  lambda: IntUniform(True, 3)])
def test_bad_sampler_types(make):
    with pytest.raises(TypeError):
        make()


# ============================================================ coarse to fine
def test_shrink_is_in_the_samplers_own_scale():
    s = LogUniform(1e-4, 1e-1).shrink([1e-2], 0.5)          # log width 3 -> 1.5, centred on -2
    assert isinstance(s, LogUniform)
    assert (s.lo, s.hi) == (pytest.approx(-2.75), pytest.approx(-1.25))
    edge = LogUniform(1e-4, 1e-1).shrink([1e-1, 0.09], 0.5)  # clipped into the old range, width kept
    assert edge.hi == pytest.approx(-1) and edge.lo == pytest.approx(-2.5)
    b = OneMinusLogUniform(0.9, 0.999).shrink([0.99], 0.5)    # 1-beta: log width 2 -> 1 around -2
    assert (b.lo, b.hi) == (pytest.approx(-2.5), pytest.approx(-1.5))
    u = Uniform(0.0, 1.0).shrink([0.2, 0.4], 0.5)             # centred on the mean of the best values
    assert (u.low, u.high) == (pytest.approx(0.05), pytest.approx(0.55))


def test_shrink_integers_and_choices():
    s = IntUniform(1, 9).shrink([5], 0.5)
    assert (s.low, s.high) == (3, 7)
    assert IntUniform(1, 3).shrink([2], 0.25) == 2            # collapses to a constant
    assert IntUniform(16, 256, log=True).shrink([64], 0.5) == IntUniform(32, 128, log=True)
    assert Choice([16, 32, 64]).shrink([32, 64], 0.5) == Choice([32, 64])
    assert Choice(["relu", "tanh"]).shrink(["tanh"], 0.5) == "tanh"
    assert Choice([True, 1]).shrink([True], 0.5) is True    # True is not 1
    space = {"lr": LogUniform(1e-4, 1e-1), "epochs": 3}
    out = shrink_space(space, [{"lr": 1e-2, "epochs": 3}], 0.5)
    assert out["epochs"] == 3 and out["lr"] == LogUniform(10 ** -2.75, 10 ** -1.25)
    with pytest.raises(ValueError, match="shrink"):
        shrink_space(space, [], 0.0)


def test_sample_space_is_keyed_by_seed_round_index_and_name():
    space = {"lr": LogUniform(1e-4, 1e-1), "units": IntUniform(8, 64), "activation": ["relu", "tanh"], "epochs": 2}
    a = sample_space(space, seed=3, round=1, index=4)
    assert a == sample_space(space, seed=3, round=1, index=4)
    assert a["epochs"] == 2 and a["activation"] in ("relu", "tanh")     # a list is a uniform choice
    # order of keys and the other settings do not change a setting's value
    reordered = dict(reversed(list(space.items())))
    assert sample_space(reordered, seed=3, round=1, index=4) == a
    assert sample_space({"lr": space["lr"]}, seed=3, round=1, index=4)["lr"] == a["lr"]
    assert sample_space(space, seed=3, round=1, index=5)["lr"] != a["lr"]


@pytest.mark.parametrize("space, exc, match", [
    ({}, ValueError, "empty"),
    ({"learning_rate": LogUniform(1e-3, 1e-1)}, ValueError, "unknown setting 'learning_rate'"),
    ({"lr": LogUniform}, TypeError, "instantiate"),
    ({"hidden": [128, 64]}, ValueError, "ambiguous"),
    ([("lr", 0.1)], TypeError, "dict"),
])
def test_bad_spaces(space, exc, match):
    with pytest.raises(exc, match=match):
        sample_space(space)


def test_parse_setting():
    assert parse_setting("lr=log:1e-4:1e-1") == ("lr", LogUniform(1e-4, 1e-1))
    assert parse_setting("beta1=beta:0.9:0.999") == ("beta1", OneMinusLogUniform(0.9, 0.999))
    assert parse_setting("units=intlog:16:256") == ("units", IntUniform(16, 256, log=True))
    assert parse_setting("n_layers=int:1:3") == ("n_layers", IntUniform(1, 3))
    assert parse_setting("keep_prob=uniform:0.5:1") == ("keep_prob", Uniform(0.5, 1.0))
    assert parse_setting("batchnorm=choice:true,false") == ("batchnorm", Choice([True, False]))
    assert parse_setting("hidden=choice:64,128x64") == ("hidden", Choice([(64,), (128, 64)]))
    assert parse_setting("hidden=128x64") == ("hidden", (128, 64))
    assert parse_setting("epochs=5") == ("epochs", 5)
    assert parse_setting("optimizer=momentum") == ("optimizer", "momentum")
    for bad in ("lr", "lr=log:1e-4", "units=int:1.5:3", "lr=logg:1:2", "=3"):
        with pytest.raises(ValueError):
            parse_setting(bad)


# ================================================================== search
@pytest.fixture(scope="module")
def digits():
    X, y = fd.datasets.load_digits()
    X = (X / 16.0).astype(np.float32)
    Xtr, Xdv, Xte, ytr, ydv, yte = fd.data.train_dev_test_split(X, y, seed=0, stratify=True)
    return Xtr, ytr, Xdv, ydv


SPACE = {
    "lr": LogUniform(1e-3, 1e-1),
    "units": IntUniform(8, 32, log=True),
    "n_layers": IntUniform(1, 2),
    "beta1": OneMinusLogUniform(0.8, 0.99),
    "batchnorm": Choice([True, False]),
    "keep_prob": Uniform(0.7, 1.0),
    "epochs": 2,
    "batch_size": 64,
}
KW = dict(n_trials=4, rounds=2, seed=7, backend="reference")


@pytest.fixture(scope="module")
def serial(digits):
    Xtr, ytr, Xdv, ydv = digits
    return search(SPACE, Xtr, ytr, validation_data=(Xdv, ydv), n_jobs=1, **KW)


def outcomes(result: SearchResult) -> list[tuple]:
    return [t.outcome() for t in result.trials]


def test_serial_search_result(serial, digits):
    Xtr, ytr, Xdv, ydv = digits
    r = serial
    assert isinstance(r, SearchResult) and r.executor == "serial"
    assert [t.id for t in r.trials] == list(range(8)) and [t.round for t in r.trials] == [1] * 4 + [2] * 4
    assert len({t.seed for t in r.trials}) == 8                            # each trial its own seed
    for t in r.trials:
        assert t.status == "ok" and t.epochs == 2 and t.time > 0
        assert 0 <= t.dev_error <= 1 and 0 <= t.train_error <= 1 and t.score == t.dev_error
        assert set(t.settings) == set(SPACE) and t.settings["epochs"] == 2
        assert len(t.history["val_error"]) == 2 and t.history["val_error"][-1] == t.dev_error
    assert r.best_trial == min(r.trials, key=lambda t: (t.score, t.id))
    assert r.best_score == r.best_trial.dev_error and r.best_settings == r.best_trial.settings
    # the refitted best model is the best trial's model (training is deterministic)
    assert r.best_model.evaluate(Xdv, ydv)["error"] == r.best_trial.dev_error
    assert r.best_model.evaluate(Xtr, ytr)["error"] == r.best_trial.train_error


def test_rounds_sample_from_shrunk_ranges(serial):
    r = serial
    assert len(r.round_spaces) == 2 and r.round_spaces[0] == r.space
    lr0, lr1 = r.round_spaces[0]["lr"], r.round_spaces[1]["lr"]
    assert lr1.hi - lr1.lo == pytest.approx((lr0.hi - lr0.lo) / 2)
    best3 = sorted(r.trials[:4], key=lambda t: (t.score, t.id))[:3]
    centre = np.mean([math.log10(t.settings["lr"]) for t in best3])
    assert lr1.lo <= centre <= lr1.hi
    for t in r.trials[4:]:
        assert lr1.low <= t.settings["lr"] <= lr1.high


def test_search_is_reproducible_and_seed_dependent(serial, digits):
    Xtr, ytr, Xdv, ydv = digits
    again = search(SPACE, Xtr, ytr, validation_data=(Xdv, ydv), n_jobs=1, refit=False, **KW)
    assert outcomes(again) == outcomes(serial) and again.best_model is None
    other = search(SPACE, Xtr, ytr, validation_data=(Xdv, ydv), n_jobs=1, refit=False,
                   **{**KW, "seed": 8, "rounds": 1})
    assert [t.settings for t in other.trials] != [t.settings for t in serial.trials[:4]]


def test_joblib_processes_give_the_serial_results(serial, digits):
    Xtr, ytr, Xdv, ydv = digits
    par = search(SPACE, Xtr, ytr, validation_data=(Xdv, ydv), n_jobs=2, refit=False, **KW)
    assert par.executor == "joblib (n_jobs=2)"
    assert outcomes(par) == outcomes(serial)


def test_dask_cluster_gives_the_serial_results(serial, digits):
    distributed = pytest.importorskip("dask.distributed")
    Xtr, ytr, Xdv, ydv = digits
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        via_client = search(SPACE, Xtr, ytr, validation_data=(Xdv, ydv), client=client, refit=False, **KW)
        assert via_client.executor.startswith("dask")
        assert len(client.scheduler_info()["workers"]) == 2
        # a scheduler address: the search connects, runs there, and disconnects
        via_address = search(SPACE, Xtr, ytr, validation_data=(Xdv, ydv), scheduler=cluster.scheduler_address,
                             refit=False, **KW)
    assert outcomes(via_client) == outcomes(serial)
    assert outcomes(via_address) == outcomes(serial)


def test_dask_is_optional(monkeypatch, digits):
    Xtr, ytr, Xdv, ydv = digits
    monkeypatch.setitem(sys.modules, "dask.distributed", None)   # as if not installed
    with pytest.raises(ImportError, match=r"fastdl\[dask\]"):
        search(SPACE, Xtr, ytr, validation_data=(Xdv, ydv), scheduler="tcp://127.0.0.1:1", **KW)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(n_trials=0), ValueError, "n_trials"),
    (dict(rounds=0), ValueError, "rounds"),
    (dict(shrink=0.0), ValueError, "shrink"),
    (dict(n_jobs=0), ValueError, "n_jobs"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(client=object()), TypeError, "Client"),
    (dict(client="tcp://a:1", scheduler="tcp://b:1"), ValueError, "not both"),
    (dict(validation_data=(np.zeros((3, 5)), np.zeros(3))), ValueError, "features"),
    (dict(loss="hinge"), ValueError, "loss"),
])
def test_bad_search_arguments(digits, kw, exc, match):
    Xtr, ytr, Xdv, ydv = digits
    kw = {"validation_data": (Xdv, ydv), **kw}
    with pytest.raises(exc, match=match):
        search({"lr": LogUniform(1e-3, 1e-1), "epochs": 1}, Xtr, ytr, n_trials=kw.pop("n_trials", 2),
               backend="reference", **kw)


def test_invalid_settings_fail_before_training(digits):
    Xtr, ytr, Xdv, ydv = digits
    with pytest.raises(ValueError, match="optimizer"):
        search({"optimizer": Choice(["adam", "adagrad"])}, Xtr, ytr, validation_data=(Xdv, ydv), n_trials=6,
               n_jobs=1, backend="reference")


def test_diverged_trials_are_recorded_not_fatal(digits):
    Xtr, ytr, Xdv, ydv = digits
    r = search({"lr": Choice([1e20, 1e-2]), "optimizer": "sgd", "epochs": 1, "units": 8}, Xtr, ytr,
               validation_data=(Xdv, ydv), n_trials=6, n_jobs=1, seed=1, backend="reference")
    bad = [t for t in r.trials if t.settings["lr"] == 1e20]
    assert bad and all(t.status == "diverged" and t.score == math.inf for t in bad)
    assert r.best_trial.settings["lr"] == 1e-2 and math.isfinite(r.best_score)
    assert "diverged" in r.table()


def test_holds_out_a_dev_set_without_validation_data(digits):
    Xtr, ytr, _, _ = digits
    r = search({"lr": LogUniform(1e-3, 1e-1), "epochs": 1, "units": 8}, Xtr, ytr, n_trials=2, n_jobs=1,
               backend="reference", refit=False)
    assert len(r.trials) == 2 and all(0 <= t.dev_error <= 1 for t in r.trials)


def test_regression_is_scored_by_dev_loss():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 5)).astype(np.float32)
    y = (X @ rng.standard_normal((5, 2))).astype(np.float32)
    r = search({"lr": LogUniform(1e-3, 1e-1), "epochs": 2, "units": 8}, X, y, n_trials=3, n_jobs=1,
               loss="mse", backend="reference", refit=False)
    assert r.score_name == "dev_loss"
    assert all(t.dev_error is None and t.score == t.dev_loss for t in r.trials)


def test_poisson_regression_is_scored_by_dev_loss():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 3)).astype(np.float32)
    y = rng.poisson(np.exp(0.5 * X[:, 0] + 1.0)).astype(np.float32)
    r = search({"lr": LogUniform(1e-3, 1e-2), "epochs": 2, "units": 4}, X, y, n_trials=2, n_jobs=1,
               loss="poisson", backend="reference", refit=True)
    assert r.score_name == "dev_loss"
    assert all(t.dev_error is None and np.isfinite(t.score) and t.score == t.dev_loss for t in r.trials)
    assert r.best_model.loss.name == "poisson" and np.all(r.best_model.predict(X) > 0)


def test_table_and_records(serial):
    text = serial.table()
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["rank", "trial", "round", "dev_error", "train_error"]
    assert len(lines) == 9
    ranks = [line.split() for line in lines[1:]]
    assert [int(row[0]) for row in ranks] == list(range(1, 9))
    assert int(ranks[0][1]) == serial.best_trial.id
    devs = [float(row[3]) for row in ranks]
    assert devs == sorted(devs)
    assert len(serial.table(3).splitlines()) == 4
    recs = serial.to_records()
    assert len(recs) == 8 and recs[0]["lr"] == serial.trials[0].settings["lr"] and "dev_error" in recs[0]
    assert "best: trial" in str(serial)


def test_top_level_exports():
    assert fd.search is search and fd.LogUniform is LogUniform and fd.SearchResult is SearchResult


# ================================================================== the CLI
def test_fastdl_search_prints_a_ranked_table(capsys, tmp_path):
    model_path = tmp_path / "best.fdl"
    rc = main(["search", "--trials", "3", "--rounds", "2", "--epochs", "1", "--n-jobs", "1", "--backend",
               "reference", "--seed", "3", "--param", "hidden=choice:16,32x16", "--param", "batchnorm=false",
               "--save", str(model_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "6 trials in" in out and "on serial" in out
    table = out[out.index("rank  trial"):].splitlines()
    assert table[0].split()[:4] == ["rank", "trial", "round", "dev_error"]
    assert [row.split()[0] for row in table[1:7]] == ["1", "2", "3", "4", "5", "6"]
    assert "hidden" in table[0] and "units" not in table[0]     # explicit architectures replace units
    assert "best model: train error" in out and "test error" in out
    assert "bias/variance diagnosis:" in out
    assert fd.load(model_path).n_features == 64


def test_fastdl_search_on_a_dask_scheduler(capsys):
    distributed = pytest.importorskip("dask.distributed")
    argv = ["search", "--trials", "2", "--rounds", "1", "--epochs", "1", "--backend", "reference", "--param",
            "units=8", "--param", "n_layers=1", "--verbose", "0"]
    assert main(argv + ["--n-jobs", "1"]) == 0
    serial = capsys.readouterr().out
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        assert main(argv + ["--scheduler", cluster.scheduler_address]) == 0
    out = capsys.readouterr().out
    assert f"on dask ({cluster.scheduler_address})" in out

    def table(text):  # the ranked table without the time column
        rows = text[text.index("rank  trial"):text.index("best:")].splitlines()
        return [row.split()[:5] + row.split()[6:] for row in rows]
    assert table(out) == table(serial)


def test_fastdl_search_bad_param_exits_2(capsys):
    assert main(["search", "--param", "lr=logg:1:2", "--n-jobs", "1"]) == 2
    assert "unknown sampler" in capsys.readouterr().err


def test_rounds_are_numbered_from_1_in_the_log_and_the_table(digits, capsys):
    Xtr, ytr, Xdv, ydv = digits
    r = search(SPACE, Xtr, ytr, validation_data=(Xdv, ydv), n_jobs=1, refit=False, verbose=1, **KW)
    log = capsys.readouterr().out
    assert "round 1/2:" in log and "round 2/2:" in log and "round 0" not in log
    lines = r.table().splitlines()
    col = lines[0].split().index("round")
    table_rounds = {int(line.split()[col]) for line in lines[1:]}
    assert table_rounds == {1, 2} == {t.round for t in r.trials}
    best = min(r.trials, key=lambda t: (t.score, t.id))
    assert f"best so far trial {best.id} (round {best.round})" in log
    assert r.to_records()[0]["round"] == 1


def test_precision_and_classical_momentum_settings(digits):
    Xtr, ytr, Xdv, ydv = digits
    space = {"precision": Choice(["fp32", "bf16"]), "optimizer": "classical_momentum", "momentum": 0.8,
             "lr": 0.05, "epochs": 1, "units": 16}
    r = search(space, Xtr[:200], ytr[:200], validation_data=(Xdv, ydv), n_trials=4, seed=1, n_jobs=1,
               backend="reference", refit=False)
    assert {t.settings["precision"] for t in r.trials} <= {"fp32", "bf16"}
    assert all(t.status == "ok" and t.dev_error < 0.9 for t in r.trials)
    # float64 cannot train in bf16: refused before any trial runs
    with pytest.raises(ValueError, match="bf16"):
        search({"precision": "bf16", "epochs": 1}, Xtr[:50], ytr[:50], validation_data=(Xdv, ydv), n_trials=1,
               n_jobs=1, backend="reference", dtype="float64")
