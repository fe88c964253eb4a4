"""Bias / variance diagnosis (docs/spec.md "Bias / variance diagnosis")."""
from __future__ import annotations

import math
import re

import pytest

import fastdl as fd
from fastdl.cli import build_mlp, main
from fastdl.diagnose import (BIAS_RECOMMENDATIONS, HIGH_BIAS, HIGH_BIAS_AND_VARIANCE, HIGH_VARIANCE, NEITHER,
                             VARIANCE_RECOMMENDATIONS, Diagnosis, diagnose)


# ------------------------------------------------------------ SPEC examples
@pytest.mark.parametrize("train, dev, optimal, verdict", [
    (0.01, 0.11, 0.0, HIGH_VARIANCE),
    (0.15, 0.16, 0.0, HIGH_BIAS),
    (0.15, 0.30, 0.0, HIGH_BIAS_AND_VARIANCE),
    (0.005, 0.01, 0.0, NEITHER),
    (0.15, 0.16, 0.15, NEITHER),
])
def test_spec_examples(train, dev, optimal, verdict):
    d = fd.diagnose(train, dev, optimal_error=optimal)
    assert d.verdict == verdict
    assert d.avoidable_bias == pytest.approx(train - optimal)
    assert d.variance == pytest.approx(dev - train)
    assert d.high_bias == (verdict in (HIGH_BIAS, HIGH_BIAS_AND_VARIANCE))
    assert d.high_variance == (verdict in (HIGH_VARIANCE, HIGH_BIAS_AND_VARIANCE))


def test_verdict_names():
    assert (HIGH_BIAS, HIGH_VARIANCE, HIGH_BIAS_AND_VARIANCE, NEITHER) == (
        "high bias", "high variance", "high bias and high variance", "neither")


# --------------------------------------------------------- recommendations
def test_recommendations_fix_bias_first_then_variance():
    d = diagnose(0.15, 0.30)
    recs = list(d.recommendations)
    # bias: bigger network, train longer, another architecture; then variance: data, L2, dropout, augmentation
    assert recs[:3] == list(BIAS_RECOMMENDATIONS)
    assert "bigger network" in recs[0] and "longer" in recs[1] and "architecture" in recs[2]
    rest = recs[3:]
    assert "more training data" in rest[0]
    assert [("L2" in r, "dropout" in r, "augment" in r) for r in rest[1:4]] == [
        (True, False, False), (False, True, False), (False, False, True)]
    assert sum("architecture" in r for r in recs) == 1  # listed once


def test_recommendations_for_each_verdict():
    assert diagnose(0.15, 0.16).recommendations == BIAS_RECOMMENDATIONS
    assert diagnose(0.01, 0.11).recommendations == VARIANCE_RECOMMENDATIONS
    assert diagnose(0.005, 0.01).recommendations == ()


# --------------------------------------------------------------- threshold
def test_threshold_rule_is_an_absolute_gap_and_configurable():
    assert diagnose(0.01, 0.03).verdict == NEITHER             # gap 2 points is not above 2 points
    assert diagnose(0.13, 0.15, 0.11).verdict == NEITHER       # 0.15-0.13 == 0.02 despite float round-off
    assert diagnose(0.01, 0.031).verdict == HIGH_VARIANCE
    assert diagnose(0.005, 0.01, threshold=0.004).verdict == HIGH_BIAS_AND_VARIANCE
    d = diagnose(0.05, 0.06, threshold=(0.1, 0.005))
    assert (d.high_bias, d.high_variance) == (False, True)
    assert (d.bias_threshold, d.variance_threshold) == (0.1, 0.005)


@pytest.mark.parametrize("bad", [-0.1, 1.0, (0.1,), (0.1, 0.2, 0.3), "0.1", True])
def test_bad_thresholds(bad):
    with pytest.raises((ValueError, TypeError)):
        diagnose(0.1, 0.2, threshold=bad)


# ------------------------------------------------------------------ inputs
@pytest.mark.parametrize("train, dev, optimal, match", [
    (11, 0.2, 0.0, "did you mean 0.11"),
    (-0.1, 0.2, 0.0, "train_error"),
    (0.1, float("nan"), 0.0, "dev_error"),
    (0.1, 0.2, 1.5, "optimal_error"),
])
def test_bad_error_values(train, dev, optimal, match):
    with pytest.raises(ValueError, match=match):
        diagnose(train, dev, optimal)


@pytest.mark.parametrize("bad", [True, "0.1", None, [0.1]])
def test_bad_error_types(bad):
    with pytest.raises(TypeError):
        diagnose(0.1, bad) if bad is not None else diagnose(object())


def test_notes_on_unusual_inputs():
    d = diagnose(0.05, 0.03)
    assert d.variance == pytest.approx(-0.02) and not d.high_variance
    assert any("below the train error" in n for n in d.notes)
    d = diagnose(0.05, 0.06, optimal_error=0.1)
    assert d.avoidable_bias == pytest.approx(-0.05) and not d.high_bias
    assert any("below the optimal error" in n for n in d.notes)


def test_str_is_readable():
    text = str(diagnose(0.15, 0.30))
    assert text.startswith("bias/variance diagnosis: high bias and high variance")
    assert "train error 15.00%" in text and "dev error 30.00%" in text
    assert "avoidable bias +15.00%" in text and "variance       +15.00%" in text
    assert "1. use a bigger network" in text and "fix bias first" in text
    assert "no change needed" in str(diagnose(0.005, 0.01))
    assert diagnose(0.01, 0.11).as_dict()["verdict"] == "high variance"


# -------------------------------------------------- from fit and from models
@pytest.fixture(scope="module")
def trained():
    X, y = fd.datasets.load_digits()
    X = X / 16.0
    Xtr, Xdv, _, ytr, ydv, _ = fd.data.train_dev_test_split(X, y, seed=0, stratify=True)
    model = fd.Sequential(build_mlp(64, [16], 10, batchnorm=False), backend="reference", seed=0)
    history = model.fit(Xtr, ytr, epochs=2, validation_data=(Xdv, ydv))
    return model, history, (Xtr, ytr), (Xdv, ydv)


def test_from_history(trained):
    model, history, _, _ = trained
    d = diagnose(history)
    assert d.train_error == history.history["error"][-1]
    assert d.dev_error == history.history["val_error"][-1]
    assert diagnose(model) == d                     # a trained model: its .history
    assert diagnose(history.history) == d           # the plain dict
    d0 = Diagnosis.from_history(history, epoch=0, optimal_error=0.01)
    assert d0.train_error == history.history["error"][0] and d0.optimal_error == 0.01
    with pytest.raises(ValueError, match="out of range"):
        Diagnosis.from_history(history, epoch=5)


def test_from_model_and_evaluate_results(trained):
    model, _, train, dev = trained
    d = Diagnosis.from_model(model, train, dev)
    assert d.train_error == model.evaluate(*train)["error"]
    assert d.dev_error == model.evaluate(*dev)["error"]
    assert diagnose({"train": model.evaluate(*train), "dev": model.evaluate(*dev)}) == d


def test_history_without_validation_is_a_clear_error():
    X, y = fd.datasets.load_digits()
    model = fd.Sequential(build_mlp(64, [8], 10, batchnorm=False), backend="reference")
    history = model.fit(X[:100] / 16, y[:100], epochs=1)
    with pytest.raises(ValueError, match="validation_data"):
        diagnose(history)


# ----------------------------------------------------------------- the CLI
def test_fastdl_train_prints_the_diagnosis(capsys):
    assert main(["train", "--epochs", "2", "--hidden", "16", "--backend", "reference", "--verbose", "0",
                 "--optimal-error", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "bias/variance diagnosis: " in out
    errors = {part: float(v) for part, v in re.findall(r"^\s*(train|dev): error (\d\.\d+)", out, flags=re.M)}
    d = diagnose(errors["train"], errors["dev"], optimal_error=0.01)
    assert f"bias/variance diagnosis: {d.verdict}" in out
    assert "optimal error 1.00%" in out
    assert math.isfinite(d.variance)
