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
    ax.set_ylabel("J")


def _draw_lr(ax: "Axes", lr: Sequence[float]) -> None:
    if len(lr):
        ax.plot(_epochs(lr), lr, color="C2", marker="." if len(lr) <= 50 else None, label="learning rate")
        if min(lr) > 0 and max(lr) / min(lr) > 20:
            ax.set_yscale("log")
    ax.set_title("learning rate")
    ax.set_xlabel("epoch")
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
        ax.legend(fontsize="x-small")
    ax.set_title("gradient norm per layer" if kind == "grad" else "weight norm per layer")
    ax.set_xlabel("epoch")
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
    ax.set_ylabel("alpha")
    ax.legend(fontsize="small")
    return _finish(fig, path)


def _plain_log_ticks(ax: "Axes") -> None:
    """Log x-axis labelled 0.001, 0.002, 0.005, ... (not 2x10^-3: those overlap on narrow ranges)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_formatter(fmt)
    ax.tick_params(axis="x", which="minor", labelsize="small")


def plot_search(result: Any, path: Any = None, *, keys: "Iterable[str] | None" = None, ncols: int = 3,
                dpi: "int | None" = None) -> "Figure":
    """Dev score against each sampled hyperparameter of a :class:`fastdl.search.SearchResult`.

    One panel per sampled setting; points coloured by round, the best trial
    starred. ``LogUniform`` (and ``IntUniform(log=True)``) settings get a log
    x-axis; ``OneMinusLogUniform`` settings are drawn as ``1 - value`` on a
    log axis (how they were sampled); ``Choice`` settings as categories.
    Diverged trials are left out (counted in the title).
    """
    from .search import Choice, OneMinusLogUniform, Sampler

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
    fig = new_figure((4.6 * ncols, 3.6 * nrows + 0.5))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    rounds = np.array([t.round for t in ok])
    scores = np.array([t.score for t in ok])
    n_rounds = max(1, len(result.round_spaces))
    best = result.best_trial
    mpl, _, _ = _mpl()
    cmap = mpl.colormaps["viridis"]
    colors = [cmap(r / max(1, n_rounds - 1)) for r in rounds]
    label = result.score_name.replace("_", " ")
    for ax, k in zip(axes, keys):
        sampler = space[k]
        vals = [t.settings.get(k) for t in ok]
        best_v = best.settings.get(k)
        if isinstance(sampler, Choice) or not isinstance(sampler, Sampler):
            cats = [str(o) for o in (sampler.options if isinstance(sampler, Choice) else [sampler])]
            pos = {c: i for i, c in enumerate(cats)}
            x = np.array([pos.get(str(v), np.nan) for v in vals], dtype=np.float64)
            ax.set_xticks(range(len(cats)), cats)
            ax.set_xlim(-0.5, len(cats) - 0.5)
            bx = pos.get(str(best_v), np.nan)
            xlabel = k
        elif isinstance(sampler, OneMinusLogUniform):
            x = 1.0 - np.array(vals, dtype=np.float64)
            bx = 1.0 - float(best_v)
            ax.set_xscale("log")
            xlabel = f"1 - {k} (log scale)"
        else:
            x = np.array(vals, dtype=np.float64)
            bx = float(best_v)
            if sampler.log:
                ax.set_xscale("log")
            xlabel = k + (" (log scale)" if sampler.log else "")
        if ax.get_xscale() == "log":
            _plain_log_ticks(ax)
        ax.scatter(x, scores, c=colors, s=28, edgecolors="k", linewidths=0.4, zorder=2)
        if math.isfinite(best.score):
            ax.scatter([bx], [best.score], marker="*", s=220, color="C3", edgecolors="k", zorder=3,
                       label=f"best (trial {best.id})")
            ax.legend(fontsize="x-small", loc="best")
        ax.set_title(f"{label} vs {k}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    extra = f", {n_bad} diverged (not shown)" if n_bad else ""
    fig.suptitle(f"random search: {len(result.trials)} trials, {n_rounds} round{'s' * (n_rounds != 1)}"
                 f" (colour = round){extra}")
    return _finish(fig, path, dpi)
