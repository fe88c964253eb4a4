"""Pictures of training and search (matplotlib, an optional extra: ``pip install 'fastdl[plot]'``).

Every function returns a ``matplotlib.figure.Figure`` and, given ``path``,
also writes it (PNG, SVG, PDF... by the file's suffix). Figures are made
with the Agg canvas directly, never through ``pyplot``: no window opens, no
global figure list grows, and plotting works in threads and on servers.

- :func:`plot_history`: learning curves of ``fit`` (train/dev cost and error
  per epoch, the mini-batch cost with its bias-corrected EWA, the learning
  rate, per-layer gradient and weight norms).
- :func:`plot_batch_cost`, :func:`plot_grad_norms`, :func:`plot_lr_schedule`:
  single panels.
- :func:`plot_search`: dev score against each sampled hyperparameter (log
  axes for log-scale samplers; ``1 - beta`` for :class:`OneMinusLogUniform`).
"""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from .smoothing import ewa

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_history", "plot_batch_cost", "plot_grad_norms", "plot_lr_schedule", "plot_search",
           "new_figure"]


def _mpl():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'fastdl[plot]' (or pip install matplotlib)") \
            from exc
    return matplotlib, Figure, FigureCanvasAgg


def new_figure(figsize: tuple[float, float] = (6.4, 4.8), dpi: int = 100) -> "Figure":
    """A Figure on an Agg canvas (no pyplot, no display needed)."""
    _, Figure, FigureCanvasAgg = _mpl()
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: "Figure", path: Any, dpi: "int | None" = None) -> "Figure":
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def _history_parts(history: Any) -> tuple[dict[str, list[float]], list[float], dict[str, dict[str, list[float]]]]:
    """(per-epoch dict, batch costs, norms) from a History, a model with .history, or a dict."""
    if hasattr(history, "history") and not isinstance(history, Mapping):
        inner = history.history
        if hasattr(inner, "history") and not isinstance(inner, Mapping):  # a model
            history = inner
            inner = history.history
        return dict(inner), list(getattr(history, "batch_cost", [])), dict(getattr(history, "norms", {}))
    if isinstance(history, Mapping):
        return dict(history), [], {}
    raise TypeError(f"expected a fastdl History (model.fit's return value), got {type(history).__name__}")


def _epochs(values: Sequence[float]) -> np.ndarray:
    return np.arange(1, len(values) + 1)


def _integer_x(ax: "Axes") -> None:
    """Epochs and steps are whole numbers: no 2.5 or 7.5 ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# --------------------------------------------------------------------- panels
def _draw_cost(ax: "Axes", h: Mapping[str, list[float]]) -> None:
    if h.get("cost") and h.get("loss") and not np.allclose(h["cost"], h["loss"]):
        ax.plot(_epochs(h["cost"]), h["cost"], label="train J (with L2)", color="C0", linestyle="--")
    if h.get("loss"):
        ax.plot(_epochs(h["loss"]), h["loss"], label="train", color="C0")
    elif h.get("cost"):
        ax.plot(_epochs(h["cost"]), h["cost"], label="train", color="C0")
    if h.get("val_loss"):
        ax.plot(_epochs(h["val_loss"]), h["val_loss"], label="dev", color="C1")
    ax.set_title("cost per epoch")
    ax.set_xlabel("epoch")
    _integer_x(ax)
    ax.set_ylabel("cost")
    if ax.lines:
        ax.legend(fontsize="small")


def _draw_error(ax: "Axes", h: Mapping[str, list[float]]) -> None:
    if h.get("error"):
        ax.plot(_epochs(h["error"]), h["error"], label="train (mini-batches)", color="C0")
    if h.get("val_error"):
        ax.plot(_epochs(h["val_error"]), h["val_error"], label="dev", color="C1")
    ax.set_title("error per epoch")
    ax.set_xlabel("epoch")
    _integer_x(ax)
    ax.set_ylabel("error rate")
    if ax.lines:
        ax.legend(fontsize="small")


def _draw_batch_cost(ax: "Axes", batch_cost: Sequence[float], beta: float) -> None:
    if len(batch_cost):
        steps = np.arange(1, len(batch_cost) + 1)
        ax.plot(steps, batch_cost, color="C0", alpha=0.3, linewidth=0.8, label="mini-batch J")
        ax.plot(steps, ewa(batch_cost, beta, bias_correction=True), color="C3", linewidth=1.5,
                label=f"EWA (beta={beta:g}, bias-corrected)")
        ax.legend(fontsize="small")
    ax.set_title("mini-batch cost")
    ax.set_xlabel("step (mini-batch)")
    _integer_x(ax)
    ax.set_ylabel("J")


def _draw_lr(ax: "Axes", lr: Sequence[float]) -> None:
    title = "learning rate"
    if len(lr):
        a = np.asarray(lr, dtype=np.float64)
        ax.plot(_epochs(a), a, color="C2", marker="." if len(a) <= 50 else None, label="learning rate")
        lo, hi = float(np.min(a)), float(np.max(a))
        if lo > 0 and hi / lo > 20:
            ax.set_yscale("log")
            _log_ticks(ax.yaxis, lo, hi)
        elif hi > 0 and hi - lo <= 1e-9 * hi:
            # constant: matplotlib would zoom into rounding noise (offset labels like 1e-9 + 3e-3);
            # show it from 0 to twice its value, labelled in plain numbers
            from matplotlib.ticker import FuncFormatter

            ax.set_ylim(0, 2 * hi)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            title = f"learning rate (constant {hi:g})"
        else:  # decaying by less than 20x: linear from 0, plain labels (0.001, not 1e-3 x 1.0)
            from matplotlib.ticker import FuncFormatter

            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_ylim(0, hi * 1.08)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    _integer_x(ax)
    ax.set_ylabel("alpha")


def _positive(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return np.where(a > 0, a, np.nan)  # zeros cannot go on a log axis


def _norm_names(norms: Mapping[str, Any], which: str) -> list[str]:
    if which == "weights":  # one line per layer: the Dense weight matrices
        names = [n for n in norms if n.endswith(".W")]
        return names or list(norms)
    if which == "all":
        return list(norms)
    raise ValueError(f"which must be 'weights' or 'all', got {which!r}")


def _draw_norms(ax: "Axes", norms: Mapping[str, Mapping[str, list[float]]], kind: str, which: str) -> None:
    for i, name in enumerate(_norm_names(norms, which)):
        vals = norms[name].get(kind, [])
        if len(vals):
            ax.plot(_epochs(vals), _positive(vals), label=name, color=f"C{i % 10}")
    if ax.lines:
        ax.set_yscale("log")
        vals = np.concatenate([np.asarray(line.get_ydata(), np.float64) for line in ax.lines])
        vals = vals[np.isfinite(vals) & (vals > 0)]
        if len(vals):
            _log_ticks(ax.yaxis, float(vals.min()), float(vals.max()))
        ax.legend(fontsize="x-small")
    ax.set_title("gradient norm per layer" if kind == "grad" else "weight norm per layer")
    ax.set_xlabel("epoch")
    _integer_x(ax)
    ax.set_ylabel("||dW||" if kind == "grad" else "||W||")


# ---------------------------------------------------------------- public API
def plot_history(history: Any, path: Any = None, *, ewa_beta: float = 0.98, which: str = "weights",
                 title: "str | None" = None, dpi: "int | None" = None) -> "Figure":
    """Learning curves of a ``fit`` run, six panels.

    Panels: cost per epoch (train, dev; train ``J`` with the L2 term dashed
    when it differs); error per epoch; mini-batch cost ``J`` with its
    bias-corrected EWA (``ewa_beta``); learning rate per epoch; gradient
    norm and weight norm per layer over epochs (log scale: vanishing or
    exploding gradients show as lines falling or rising by decades).

    Parameters
    ----------
    history : History or Sequential
        What ``fit`` returned (or the model, whose ``.history`` is used).
    path : str or Path, optional
        Write the figure there (format from the suffix, e.g. ``.png``).
    which : {'weights', 'all'}
        Norm lines for the Dense weights only (one per layer) or every array.

    Returns
    -------
    matplotlib.figure.Figure
    """
    h, batch_cost, norms = _history_parts(history)
    fig = new_figure((15, 8.5))
    axes = fig.subplots(2, 3)
    _draw_cost(axes[0, 0], h)
    _draw_error(axes[0, 1], h)
    _draw_batch_cost(axes[0, 2], batch_cost, ewa_beta)
    _draw_lr(axes[1, 0], h.get("lr", []))
    _draw_norms(axes[1, 1], norms, "grad", which)
    _draw_norms(axes[1, 2], norms, "weight", which)
    fig.suptitle(title or f"training: {len(h.get('loss', h.get('cost', [])))} epochs, {len(batch_cost)} steps")
    return _finish(fig, path, dpi)


def plot_batch_cost(history: Any, path: Any = None, *, ewa_beta: float = 0.98) -> "Figure":
    """The mini-batch cost ``J`` per step with its bias-corrected EWA (notes 2.1-2.5)."""
    _, batch_cost, _ = _history_parts(history)
    fig = new_figure()
    _draw_batch_cost(fig.add_subplot(), batch_cost, ewa_beta)
    return _finish(fig, path)


def plot_grad_norms(history: Any, path: Any = None, *, which: str = "weights") -> "Figure":
    """Per-layer gradient norms over epochs on a log axis (vanishing / exploding gradients)."""
    _, _, norms = _history_parts(history)
    fig = new_figure()
    _draw_norms(fig.add_subplot(), norms, "grad", which)
    return _finish(fig, path)


def plot_lr_schedule(schedules: Any, path: Any = None, *, lr: float = 0.01, epochs: int = 50,
                     steps_per_epoch: int = 1) -> "Figure":
    """Learning-rate curves of one or more schedules (SPEC.md "Learning-rate decay").

    Parameters
    ----------
    schedules : Schedule, name, list of them, dict label -> schedule, or a History
        A History plots the learning rate ``fit`` recorded per epoch.
    lr : float
        ``alpha0``.
    epochs, steps_per_epoch : int
        With ``steps_per_epoch > 1`` the curve is drawn per step (per-step
        schedules such as ``InverseSqrtDecay(per_step=True)`` show their shape).
    """
    from .schedules import get_schedule

    fig = new_figure()
    ax = fig.add_subplot()
    if hasattr(schedules, "batch_cost") or (hasattr(schedules, "history") and not isinstance(schedules, Mapping)):
        h, _, _ = _history_parts(schedules)
        _draw_lr(ax, h.get("lr", []))
        ax.set_title("learning rate (recorded)")
        return _finish(fig, path)
    if isinstance(schedules, Mapping):
        items = list(schedules.items())
    elif isinstance(schedules, (list, tuple)):
        items = [(repr(get_schedule(s)), s) for s in schedules]
    else:
        items = [(repr(get_schedule(schedules)), schedules)]
    if not items:
        raise ValueError("no schedule to plot")
    for name, v in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    n = epochs * steps_per_epoch
    steps = np.arange(1, n + 1)
    epoch_of = (steps - 1) // steps_per_epoch
    x = steps / steps_per_epoch if steps_per_epoch > 1 else epoch_of
    for i, (label, s) in enumerate(items):
        sched = get_schedule(s)
        ax.plot(x, [sched(lr, int(e), int(t)) for e, t in zip(epoch_of, steps)], label=str(label), color=f"C{i}")
    ax.set_title("learning-rate schedule")
    ax.set_xlabel("epoch")
    _integer_x(ax)
    ax.set_ylabel("alpha")
    ax.legend(fontsize="small")
    return _finish(fig, path)


def _log_ticks(axis: Any, lo: float, hi: float) -> None:
    """Readable log-axis labels: plain numbers (0.001, 0.002, 0.005 ... 1e-05), never 2x10^-3.

    Over fewer than ~2 decades the 2 and 5 sub-ticks are labelled too (else a
    narrow range shows one label or none); over more, only the powers of ten.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(fmt)
    decades = math.log10(hi / lo) if lo > 0 and hi > 0 else 99.0
    if decades < 0.8:  # within one decade powers of ten may not even appear: evenly spaced round numbers
        from matplotlib.ticker import MaxNLocator, NullLocator

        axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
        axis.set_minor_locator(NullLocator())
        return
    axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0) if decades < 2.2 else tuple(range(2, 10))))
    axis.set_minor_formatter(fmt if decades < 2.2 else NullFormatter())
    if decades < 2.2:
        axis.set_tick_params(which="minor", labelsize="small")


def _plain_log_ticks(ax: "Axes") -> None:
    """Log x-axis with readable labels over the axis's current limits (see :func:`_log_ticks`)."""
    lo, hi = ax.get_xlim()
    _log_ticks(ax.xaxis, lo, hi)


def _int_log_ticks(axis: Any, lo: int, hi: int) -> None:
    """An integer setting on a log axis: ticks at powers of two (16, 32, 64 ...) labelled as integers."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo, hi = max(1, int(lo)), max(1, int(hi))
    ticks = [2 ** k for k in range(int(math.floor(math.log2(lo))), int(math.ceil(math.log2(hi))) + 1)]
    if len(ticks) > 8:  # many octaves: every other power of two
        ticks = ticks[::2]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(round(v))}"))
    axis.set_minor_locator(NullLocator())


def _robust_top(scores: np.ndarray) -> "float | None":
    """An upper y-limit that keeps the useful range readable, or None when no score is an outlier.

    Outliers: scores above Q3 + 3 IQR (and above twice the median), e.g. a
    trial stuck at chance (error 0.9) among trials at 0.02-0.10.
    """
    if len(scores) < 4:
        return None
    q1, med, q3 = np.percentile(scores, [25, 50, 75])
    limit = max(q3 + 3.0 * (q3 - q1), 2.0 * med, q3 + 1e-12)
    inliers = scores[scores <= limit]
    if len(inliers) == len(scores) or len(inliers) == 0:
        return None
    lo, hi = float(inliers.min()), float(inliers.max())
    return hi + 0.12 * max(hi - lo, 1e-3 * max(abs(hi), 1e-12))


def plot_search(result: Any, path: Any = None, *, keys: "Iterable[str] | None" = None, ncols: int = 3,
                dpi: "int | None" = None, clip_outliers: bool = True) -> "Figure":
    """Dev score against each sampled hyperparameter of a :class:`fastdl.search.SearchResult`.

    One panel per sampled setting; points coloured by round (legend, rounds
    numbered from 1 as in the log and the table), the best trial starred.
    ``LogUniform`` settings get a log x-axis with plain labels;
    ``OneMinusLogUniform`` settings are drawn as ``1 - value`` on a log axis
    (how they were sampled); ``IntUniform`` settings get integer ticks
    (powers of two on a log axis for ``log=True``); ``Choice`` settings are
    categories. Integer and categorical points are spread sideways a little
    (jitter) so that repeated values stay visible.

    ``clip_outliers``: scores far above the rest (beyond Q3 + 3 IQR, e.g.
    a trial stuck at chance level) would squash the useful range, so the
    y-axis stops above the others and those trials are drawn as triangles
    on the top edge, with their count and worst value noted. Diverged trials
    are left out (counted in the title).
    """
    from .search import Choice, IntUniform, OneMinusLogUniform, Sampler

    space = result.space
    keys = list(keys) if keys is not None else [k for k, v in space.items() if isinstance(v, Sampler)]
    if not keys:
        raise ValueError("the search sampled no setting (only constants): nothing to plot against")
    for k in keys:
        if k not in space:
            raise ValueError(f"{k!r} is not in the search space {sorted(space)}")
    ok = [t for t in result.trials if math.isfinite(t.score)]
    n_bad = len(result.trials) - len(ok)
    ncols = max(1, min(ncols, len(keys)))
    nrows = math.ceil(len(keys) / ncols)
    fig = new_figure((4.6 * ncols, 3.6 * nrows + 0.8))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    rounds = np.array([t.round for t in ok], dtype=np.int64)
    scores = np.array([t.score for t in ok], dtype=np.float64)
    n_rounds = max(1, len(result.round_spaces))
    round_ids = sorted(set(rounds.tolist())) or [1]
    best = result.best_trial
    mpl, _, _ = _mpl()
    cmap = mpl.colormaps["viridis"]
    # rounds are 1-based; a few discrete colours, dark (coarse) to light (fine)
    round_colour = {r: cmap(0.85 * (r - 1) / max(1, n_rounds - 1)) for r in range(1, n_rounds + 1)}
    top = _robust_top(scores) if clip_outliers else None
    shown = np.minimum(scores, top) if top is not None else scores
    high = scores > top if top is not None else np.zeros(len(scores), bool)
    jitter_rng = np.random.default_rng(0)  # fixed: the same picture every time
    label = result.score_name.replace("_", " ")
    for ax, k in zip(axes, keys):
        sampler = space[k]
        vals = [t.settings.get(k) for t in ok]
        best_v = best.settings.get(k)
        jitter = 0.0
        if isinstance(sampler, Choice) or not isinstance(sampler, Sampler):
            cats = [str(o) for o in (sampler.options if isinstance(sampler, Choice) else [sampler])]
            pos = {c: i for i, c in enumerate(cats)}
            x = np.array([pos.get(str(v), np.nan) for v in vals], dtype=np.float64)
            ax.set_xticks(range(len(cats)), cats)
            ax.set_xlim(-0.5, len(cats) - 0.5)
            bx = pos.get(str(best_v), np.nan)
            xlabel = f"{k} (categorical)"
            jitter = 0.12
        elif isinstance(sampler, OneMinusLogUniform):
            x = 1.0 - np.array(vals, dtype=np.float64)
            bx = 1.0 - float(best_v)
            ax.set_xscale("log")
            xlabel = f"1 - {k} (log scale)"
        elif isinstance(sampler, IntUniform):
            x = np.array(vals, dtype=np.float64)
            bx = float(best_v)
            if sampler.log:
                ax.set_xscale("log")
                jitter = 0.0
            else:
                from matplotlib.ticker import MaxNLocator

                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                jitter = 0.08 if sampler.high - sampler.low <= 12 else 0.0
                ax.set_xlim(sampler.low - 0.5, sampler.high + 0.5)
            xlabel = f"{k} (integer{', log scale' if sampler.log else ''})"
        else:
            x = np.array(vals, dtype=np.float64)
            bx = float(best_v)
            if sampler.log:
                ax.set_xscale("log")
            xlabel = k + (" (log scale)" if sampler.log else "")
        if jitter:
            x = x + jitter_rng.uniform(-jitter, jitter, size=len(x))
        for r in round_ids:
            sel = (rounds == r) & ~high
            if sel.any():
                ax.scatter(x[sel], shown[sel], color=round_colour.get(r, "C0"), s=28, edgecolors="k",
                           linewidths=0.4, zorder=2, label=f"round {r}")
            has_normal = sel.any()
            sel = (rounds == r) & high
            if sel.any():
                ax.scatter(x[sel], shown[sel], color=round_colour.get(r, "C0"), marker="^", s=44, edgecolors="k",
                           linewidths=0.4, zorder=2, clip_on=False, label=None if has_normal else f"round {r}")
        if math.isfinite(best.score):
            ax.scatter([bx], [best.score], marker="*", s=220, color="C3", edgecolors="k", zorder=3,
                       label=f"best (trial {best.id}, round {best.round})")
        if ax.get_xscale() == "log":
            finite = x[np.isfinite(x) & (x > 0)]
            lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (1.0, 10.0)
            if isinstance(sampler, IntUniform):
                lo, hi = sampler.low, sampler.high
                ax.set_xlim(lo / 1.15, hi * 1.15)
                _int_log_ticks(ax.xaxis, lo, hi)
            else:
                ax.set_xlim(lo / 1.3, hi * 1.3)
                _log_ticks(ax.xaxis, lo / 1.3, hi * 1.3)
        if top is not None:
            lo_y = float(scores[~high].min())
            ax.set_ylim(lo_y - 0.08 * (top - lo_y), top)
            n_high = int(high.sum())
            ax.text(0.99, 0.98, f"\u25b2 {n_high} trial{'s' * (n_high != 1)} above "
                    f"(up to {scores.max():.3g})", transform=ax.transAxes, ha="right", va="top",
                    fontsize="x-small", color="0.3")
        ax.set_title(f"{label} vs {k}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.25)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # one legend for the whole figure: rounds and the best trial
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize="small")
    extra = f", {n_bad} diverged (not shown)" if n_bad else ""
    fig.suptitle(f"random search: {len(result.trials)} trials, {n_rounds} round{'s' * (n_rounds != 1)}"
                 f" (colour = round){extra}")
    return _finish(fig, path, dpi)
