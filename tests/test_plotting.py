"""Exponentially weighted averages (fd.ewa) and the pictures of fastdl.plotting / --plot."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

import fastdl as fd
from fastdl.cli import build_mlp, main
from fastdl.smoothing import EWA, ewa

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ======================================================================= EWA
def test_ewa_hand_computed():
    # v1 = 0.5*1 = 0.5; v2 = 0.5*0.5 + 0.5*2 = 1.25; v3 = 0.5*1.25 + 0.5*3 = 2.125
    assert np.allclose(ewa([1.0, 2.0, 3.0], 0.5, bias_correction=False), [0.5, 1.25, 2.125])
    # corrected: / (1 - 0.5**t) = / 0.5, 0.75, 0.875
    assert np.allclose(ewa([1.0, 2.0, 3.0], 0.5), [1.0, 1.25 / 0.75, 2.125 / 0.875])
    # beta 0.9 on a constant 10: raw 1, 1.9, 2.71 (biased towards v0 = 0); corrected exactly 10
    assert np.allclose(ewa([10, 10, 10], 0.9, bias_correction=False), [1.0, 1.9, 2.71])
    assert np.allclose(ewa([10, 10, 10], 0.9), [10, 10, 10])
    # notes 2.3: the first temperature alone, beta = 0.98: v1 = 0.02 * 40 = 0.8, corrected 40
    assert ewa([40.0], 0.98, bias_correction=False)[0] == pytest.approx(0.8)
    assert ewa([40.0], 0.98)[0] == pytest.approx(40.0)


def test_ewa_matches_the_recurrence():
    x = np.random.default_rng(0).standard_normal(500)
    v, out = 0.0, []
    for t, xt in enumerate(x, 1):
        v = 0.98 * v + 0.02 * xt
        out.append(v / (1 - 0.98 ** t))
    assert np.allclose(ewa(x, 0.98), out, rtol=1e-10, atol=1e-12)
    assert np.array_equal(ewa(x, 0.0), x)                                  # beta 0: the values
    cols = np.stack([x, 2 * x], axis=1)                                     # columns averaged independently
    assert np.allclose(ewa(cols, 0.9), np.stack([ewa(x, 0.9), ewa(2 * x, 0.9)], axis=1))
    assert ewa([], 0.9).shape == (0,)
    assert fd.ewa is ewa


def test_streaming_ewa():
    avg = EWA(beta=0.5)
    assert np.isnan(avg.value)
    assert [avg.update(v) for v in (1.0, 2.0, 3.0)] == pytest.approx(list(ewa([1.0, 2.0, 3.0], 0.5)))
    assert avg.raw == pytest.approx(2.125) and avg.t == 3
    plain = EWA(0.5, bias_correction=False)
    assert [plain.update(v) for v in (1.0, 2.0)] == pytest.approx([0.5, 1.25])


@pytest.mark.parametrize("beta, exc", [(1.0, ValueError), (-0.1, ValueError), (True, TypeError), ("0.9", TypeError),
                                       (float("nan"), TypeError)])
def test_ewa_bad_beta(beta, exc):
    with pytest.raises(exc):
        ewa([1.0, 2.0], beta)


def test_ewa_bad_values():
    with pytest.raises(ValueError, match="scalar"):
        ewa(3.0, 0.9)
    with pytest.raises(TypeError):
        ewa(["a", "b"], 0.9)


# ==================================================================== plots
needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                               reason="matplotlib not installed (pip install 'fastdl[plot]')")


def check_png(path, min_size=(200, 200)):
    """A real, non-blank PNG: signature, decodes, size, pixels not all the same."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] >= min_size[0] and img.shape[1] >= min_size[1]
    assert float(img[..., :3].var()) > 0.0
    return img


@pytest.fixture(scope="module")
def history():
    X, y = fd.datasets.load_digits()
    X = X / 16.0
    Xtr, Xdv, _, ytr, ydv, _ = fd.data.train_dev_test_split(X, y, seed=0, stratify=True)
    model = fd.Sequential(build_mlp(64, [16, 16], 10, batchnorm=True), backend="reference", seed=0, l2=0.1)
    return model.fit(Xtr, ytr, epochs=4, batch_size=64, validation_data=(Xdv, ydv),
                     lr_schedule=fd.schedules.ExponentialDecay(0.5))


def _ax(fig, title):
    found = [ax for ax in fig.axes if ax.get_title() == title]
    assert found, f"no panel titled {title!r}: {[a.get_title() for a in fig.axes]}"
    return found[0]


@needs_mpl
def test_plot_history_draws_every_curve(history, tmp_path):
    from fastdl.plotting import plot_history

    path = tmp_path / "curves.png"
    fig = plot_history(history, path, ewa_beta=0.9)
    img = check_png(path, (600, 1200))
    assert img.shape[:2] == (850, 1500)                                     # 15 x 8.5 in at 100 dpi
    cost = _ax(fig, "cost per epoch")
    assert [line.get_label() for line in cost.lines] == ["train J (with L2)", "train", "dev"]
    assert np.allclose(cost.lines[2].get_ydata(), history.history["val_loss"])
    err = _ax(fig, "error per epoch")
    assert [line.get_label() for line in err.lines] == ["train (mini-batches)", "dev"]
    assert np.allclose(err.lines[1].get_ydata(), history.history["val_error"])
    mb = _ax(fig, "mini-batch cost")
    raw, smooth = mb.lines
    assert np.allclose(raw.get_ydata(), history.batch_cost)
    assert np.allclose(smooth.get_ydata(), ewa(history.batch_cost, 0.9))   # bias-corrected EWA
    assert "bias-corrected" in smooth.get_label()
    lr = _ax(fig, "learning rate")
    assert np.allclose(lr.lines[0].get_ydata(), [1e-3 * 0.5 ** e for e in range(4)])
    grads = _ax(fig, "gradient norm per layer")
    assert grads.get_yscale() == "log"
    dense_w = [n for n in history.norms if n.endswith(".W")]
    assert [line.get_label() for line in grads.lines] == dense_w and len(dense_w) == 3
    assert np.allclose(grads.lines[0].get_ydata(), history.norms[dense_w[0]]["grad"])
    assert _ax(fig, "weight norm per layer").get_yscale() == "log"
    every = plot_history(history, which="all")
    assert len(_ax(every, "gradient norm per layer").lines) == len(history.norms)


@needs_mpl
def test_plot_history_without_l2_or_validation(tmp_path):
    from fastdl.plotting import plot_history

    X, y = fd.datasets.load_digits()
    model = fd.Sequential(build_mlp(64, [8], 10, batchnorm=False), backend="reference")
    h = model.fit(X[:200] / 16, y[:200], epochs=2)
    fig = plot_history(model, tmp_path / "h.png")                          # a model: its .history
    assert [line.get_label() for line in _ax(fig, "cost per epoch").lines] == ["train"]
    check_png(tmp_path / "h.png")
    with pytest.raises(TypeError, match="History"):
        plot_history(42)
    assert h is model.history


@needs_mpl
def test_single_panels(history, tmp_path):
    from fastdl.plotting import plot_batch_cost, plot_grad_norms

    fig = plot_batch_cost(history, tmp_path / "b.png")
    assert len(fig.axes[0].lines) == 2
    check_png(tmp_path / "b.png")
    fig = plot_grad_norms(history, tmp_path / "g.png")
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes[0].lines) == 3
    check_png(tmp_path / "g.png")


@needs_mpl
def test_plot_lr_schedule(tmp_path, history):
    from fastdl.plotting import plot_lr_schedule
    from fastdl.schedules import ExponentialDecay, InverseSqrtDecay, StaircaseDecay

    scheds = {"exponential": ExponentialDecay(0.9), "staircase": StaircaseDecay(0.5, 5),
              "1/sqrt(t)": InverseSqrtDecay(per_step=True)}
    fig = plot_lr_schedule(scheds, tmp_path / "lr.png", lr=0.1, epochs=20, steps_per_epoch=4)
    check_png(tmp_path / "lr.png")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == list(scheds)
    assert np.allclose(ax.lines[1].get_ydata()[::4], [0.1 * 0.5 ** (e // 5) for e in range(20)])
    assert np.allclose(ax.lines[2].get_ydata(), [0.1 / np.sqrt(t) for t in range(1, 81)])
    one = plot_lr_schedule("inverse_time", lr=1.0, epochs=3)
    assert np.allclose(one.axes[0].lines[0].get_ydata(), [1.0, 0.5, 1 / 3])
    recorded = plot_lr_schedule(history)
    assert np.allclose(recorded.axes[0].lines[0].get_ydata(), history.history["lr"])
    with pytest.raises(ValueError):
        plot_lr_schedule("constant", epochs=0)


@pytest.fixture(scope="module")
def search_result():
    from fastdl.search import Choice, IntUniform, LogUniform, OneMinusLogUniform, Uniform

    X, y = fd.datasets.load_digits()
    X = X / 16.0
    space = {"lr": LogUniform(1e-3, 1e-1), "units": IntUniform(8, 32), "beta1": OneMinusLogUniform(0.8, 0.99),
             "batchnorm": Choice([True, False]), "keep_prob": Uniform(0.8, 1.0), "epochs": 1}
    return fd.search(space, X, y, n_trials=4, rounds=2, n_jobs=1, seed=0, backend="reference", refit=False)


@needs_mpl
def test_plot_search(search_result, tmp_path):
    from fastdl.plotting import plot_search

    path = tmp_path / "search.png"
    fig = plot_search(search_result, path)
    check_png(path, (500, 900))
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["dev error vs lr", "dev error vs units", "dev error vs beta1",
                                                  "dev error vs batchnorm", "dev error vs keep_prob"]
    lr, units, beta1, bn, kp = visible
    assert lr.get_xscale() == "log" and units.get_xscale() == "linear" and kp.get_xscale() == "linear"
    assert beta1.get_xscale() == "log" and beta1.get_xlabel().startswith("1 - beta1")
    assert [t.get_text() for t in bn.get_xticklabels()] == ["True", "False"]
    rounds = [c for c in lr.collections if str(c.get_label()).startswith("round ")]
    assert [c.get_label() for c in rounds] == ["round 1", "round 2"]            # rounds numbered from 1
    points = np.concatenate([c.get_offsets() for c in rounds])
    assert len(points) == 8                                                  # every trial
    assert np.allclose(sorted(points[:, 0]), sorted(t.settings["lr"] for t in search_result.trials))
    b_rounds = [c for c in beta1.collections if str(c.get_label()).startswith("round ")]
    assert np.allclose(sorted(1 - np.concatenate([c.get_offsets() for c in b_rounds])[:, 0]),
                       sorted(t.settings["beta1"] for t in search_result.trials))
    star = next(c for c in lr.collections if str(c.get_label()).startswith("best")).get_offsets()
    assert star[0][1] == search_result.best_score                           # best trial starred
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["round 1", "round 2"] and legend[2].startswith("best (trial")
    # integer settings on integer ticks; readable log ticks (plain numbers, no 10^x mathtext)
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in units.get_xticks())
    assert units.get_xlabel() == "units (integer)"
    labels = [t.get_text() for t in lr.get_xticklabels() + lr.get_xticklabels(minor=True) if t.get_text()]
    assert labels and all("$" not in t for t in labels) and "0.01" in labels
    assert search_result.plot().axes                                         # SearchResult.plot
    with pytest.raises(ValueError, match="not in the search space"):
        plot_search(search_result, keys=["momentum"])


@needs_mpl
def test_missing_matplotlib_is_a_clear_error(monkeypatch, history):
    from fastdl.plotting import plot_history

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"fastdl\[plot\]"):
        plot_history(history)


# ================================================================ the CLI
def test_fastdl_train_plot_writes_learning_curves(tmp_path, capsys):
    path = tmp_path / "train.png"
    assert main(["train", "--epochs", "2", "--hidden", "16", "--backend", "reference", "--verbose", "0",
                 "--plot", str(path)]) == 0
    assert f"wrote learning curves to {path}" in capsys.readouterr().out
    img = check_png(path, (600, 1200))
    # six panels with curves: many distinct colours, not a blank canvas
    assert len(np.unique(img[..., :3].reshape(-1, 3).round(2), axis=0)) > 50


@needs_mpl
def test_fastdl_search_plot(tmp_path, capsys):
    path = tmp_path / "search.png"
    assert main(["search", "--trials", "3", "--rounds", "1", "--epochs", "1", "--n-jobs", "1", "--backend",
                 "reference", "--param", "units=int:8:16", "--param", "n_layers=1", "--plot", str(path)]) == 0
    assert f"wrote the search plot to {path}" in capsys.readouterr().out
    check_png(path, (300, 600))


@needs_mpl
def test_plot_without_matplotlib_fails_before_training(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["train", "--epochs", "1", "--backend", "reference", "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr()
    assert "fastdl[plot]" in err.err and "trained" not in err.out


class _FakeTrial:
    def __init__(self, i, rnd, lr, score):
        self.id, self.round, self.score, self.settings = i, rnd, score, {"lr": lr, "units": 16 + i}
        self.dev_error = score


@needs_mpl
def test_plot_search_outlier_does_not_squash_the_range():
    from types import SimpleNamespace

    from fastdl.plotting import plot_search
    from fastdl.search import IntUniform, LogUniform

    rng = np.random.default_rng(0)
    scores = list(0.02 + 0.06 * rng.random(19)) + [0.9]          # one trial stuck at chance
    trials = [_FakeTrial(i, 1 + i // 10, float(10 ** rng.uniform(-4, -1)), s) for i, s in enumerate(scores)]
    best = min(trials, key=lambda t: t.score)
    result = SimpleNamespace(space={"lr": LogUniform(1e-4, 1e-1), "units": IntUniform(16, 256, log=True)},
                             trials=trials, best_trial=best, round_spaces=[{}, {}], score_name="dev_error")
    fig = plot_search(result)
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert hi < 0.2 and lo < 0.02                                 # the useful range fills the panel
    assert any("1 trial above" in t.get_text() and "0.9" in t.get_text() for t in ax.texts)
    units = fig.axes[1]
    fig.canvas.draw()
    ticks = [t for t in units.get_xticks() if units.get_xlim()[0] <= t <= units.get_xlim()[1]]
    assert ticks == [16, 32, 64, 128, 256]                       # log-scale integers at powers of two
    unclipped = plot_search(result, clip_outliers=False).axes[0]
    assert unclipped.get_ylim()[1] > 0.9


@needs_mpl
def test_constant_learning_rate_panel():
    from fastdl.plotting import plot_history

    fig = plot_history({"loss": [1.0, 0.5, 0.4], "lr": [3e-3] * 3})
    ax = fig.axes[3]
    assert ax.get_title() == "learning rate (constant 0.003)"
    assert ax.get_ylim() == (0.0, 0.006) and ax.get_yscale() == "linear"
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "0.003" in labels and not any("e" in t for t in labels)
    decaying = plot_history({"loss": [1.0] * 4, "lr": [1.0, 0.1, 0.01, 0.001]}).axes[3]
    assert decaying.get_yscale() == "log"
