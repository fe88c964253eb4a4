"""The result of a search: trials, best settings and model, tables."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any


from .samplers import Sampler
from .trials import Trial


@dataclass
class SearchResult:
    """What :func:`search` returns.

    Attributes
    ----------
    trials : list of Trial
        Every trial, in id order (round by round).
    best_trial : Trial
        Lowest ``score`` (ties: the earlier trial).
    best_model : Sequential or None
        The best configuration retrained with its seed (identical to the
        trial's model: training is deterministic); ``None`` with ``refit=False``.
    space : dict
        The search space as given; ``round_spaces[r - 1]`` is the (shrunk)
        space sampled in round ``r`` (rounds are numbered from 1, as in the
        log and the table).
    score_name : str
        ``'dev_error'`` or ``'dev_loss'``.
    time : float
        Wall time of the search in seconds; ``executor`` says where trials ran.
    """

    trials: list[Trial]
    best_trial: Trial
    best_model: Any
    space: dict[str, Any]
    round_spaces: list[dict[str, Any]]
    score_name: str
    seed: int
    time: float
    executor: str

    @property
    def best_settings(self) -> dict[str, Any]:
        return dict(self.best_trial.settings)

    @property
    def best_score(self) -> float:
        return self.best_trial.score

    def ranked(self) -> list[Trial]:
        """Trials from best to worst."""
        return sorted(self.trials, key=lambda t: (t.score, t.id))

    def sampled_keys(self) -> list[str]:
        """Settings that were sampled (not constants)."""
        return [k for k, v in self.space.items() if isinstance(v, Sampler)]

    def to_records(self) -> list[dict[str, Any]]:
        """One flat dict per trial (for pandas: ``pd.DataFrame(result.to_records())``)."""
        return [{"id": t.id, "round": t.round, "seed": t.seed, **t.settings, "score": t.score,
                 "dev_error": t.dev_error, "train_error": t.train_error, "dev_loss": t.dev_loss,
                 "train_loss": t.train_loss, "epochs": t.epochs, "time": t.time, "status": t.status}
                for t in self.trials]

    def table(self, top: "int | None" = None) -> str:
        """A ranked text table of the trials (best first)."""
        keys = self.sampled_keys() or list(self.space)
        rows = self.ranked()[:top] if top else self.ranked()
        head = ["rank", "trial", "round", self.score_name]
        if self.score_name == "dev_error":
            head.append("train_error")
        head += ["time_s"] + keys
        cells = []
        for i, t in enumerate(rows, 1):
            c = [str(i), str(t.id), str(t.round), _fmt(t.score)]
            if self.score_name == "dev_error":
                c.append(_fmt(t.train_error))
            c += [f"{t.time:.2f}"] + [_fmt(t.settings.get(k)) for k in keys]
            if t.status != "ok":
                c[3] = t.status
            cells.append(c)
        widths = [max(len(h), *(len(c[j]) for c in cells)) if cells else len(h) for j, h in enumerate(head)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)

    def plot(self, path: Any = None, **kwargs: Any):
        """Dev score against each sampled setting (:func:`fastdl.plotting.plot_search`)."""
        from ..plotting import plot_search

        return plot_search(self, path, **kwargs)

    def __str__(self) -> str:
        n_rounds = len(self.round_spaces)
        return (f"search: {len(self.trials)} trials in {n_rounds} round{'s' * (n_rounds != 1)}, "
                f"{self.time:.2f} s ({self.executor})\n{self.table(10)}\n"
                f"best: trial {self.best_trial.id}, {self.score_name} {_fmt(self.best_score)}, "
                f"settings {self.best_settings}")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4f}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.3g}"
    if isinstance(v, tuple):
        return "x".join(str(x) for x in v) if all(isinstance(x, numbers.Integral) for x in v) else str(v)
    return str(v)
