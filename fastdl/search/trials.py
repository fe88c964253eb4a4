"""One trial (build, train, score) and where trials run (serially, joblib, Dask)."""
from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Any


from .space import _OPTIMIZER_ARGS, _SCHEDULE_ARGS, SETTINGS_DEFAULTS


@dataclass
class Trial:
    """One trained and scored configuration.

    ``score`` is what the search minimises: ``dev_error`` for classifiers,
    ``dev_loss`` for regression (``inf`` when training diverged).
    ``history`` holds the per-epoch curves of ``fit``. ``round`` is the
    coarse-to-fine round, numbered from 1 (as in the log and the table);
    ``id`` numbers the trials of the whole search from 0.
    """

    id: int
    round: int
    seed: int
    settings: dict[str, Any]
    score: float = math.inf
    dev_error: "float | None" = None
    train_error: "float | None" = None
    dev_loss: "float | None" = None
    train_loss: "float | None" = None
    epochs: int = 0
    time: float = 0.0
    status: str = "ok"
    history: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def outcome(self) -> tuple:
        """Everything but the wall time (what reproducibility compares)."""
        return (self.id, self.round, self.seed, tuple(sorted(self.settings.items())), self.score, self.dev_error,
                self.train_error, self.dev_loss, self.train_loss, self.epochs, self.status,
                tuple(sorted((k, tuple(v)) for k, v in self.history.items())))


class _TrialData:
    """The arrays every trial trains on (one object, so Dask scatters it once)."""

    def __init__(self, X_train, y_train, X_dev, y_dev):
        self.X_train, self.y_train, self.X_dev, self.y_dev = X_train, y_train, X_dev, y_dev


@dataclass(frozen=True)
class _Task:
    id: int
    round: int
    seed: int
    settings: dict
    loss: str
    n_out: int
    backend: str
    dtype: str


def _build(task: _Task, n_in: int):
    """Model, optimiser, schedule and fit arguments of one trial."""
    from ..callbacks import EarlyStopping
    from ..cli import build_mlp
    from ..model import Sequential
    from ..optim import get_optimizer
    from ..schedules import get_schedule

    s = {**SETTINGS_DEFAULTS, **task.settings}
    hidden = s["hidden"]
    if hidden is None:
        hidden = (int(s["units"]),) * int(s["n_layers"])
    elif isinstance(hidden, numbers.Integral):
        hidden = (int(hidden),)
    hidden = tuple(int(h) for h in hidden)
    layers = build_mlp(n_in, hidden, task.n_out, activation=s["activation"], batchnorm=bool(s["batchnorm"]),
                       keep_prob=float(s["keep_prob"]))
    # precision= only when not fp32: a trial of the default space builds the same model as before
    extra = {"precision": str(s["precision"])} if s["precision"] != "fp32" else {}
    model = Sequential(layers, loss=task.loss, l2=float(s["l2"]), l2_scale=s["l2_scale"], dtype=task.dtype,
                       backend=task.backend, seed=task.seed, **extra)
    opt_name = str(s["optimizer"]).lower()
    if opt_name not in _OPTIMIZER_ARGS:
        raise ValueError(f"unknown optimizer {s['optimizer']!r}; choose one of {sorted(_OPTIMIZER_ARGS)}")
    opt = get_optimizer(opt_name, **{k: s[k] for k in _OPTIMIZER_ARGS[opt_name]})
    sched_name = s["schedule"]
    if sched_name not in _SCHEDULE_ARGS:
        raise ValueError(f"unknown schedule {sched_name!r}; choose one of {sorted(_SCHEDULE_ARGS)}")
    schedule = get_schedule(sched_name, **{k: s[k] for k in _SCHEDULE_ARGS[sched_name] if k in s})
    patience = int(s["patience"])
    fit_kw = dict(optimizer=opt, epochs=int(s["epochs"]), batch_size=int(s["batch_size"]), lr_schedule=schedule,
                  callbacks=[EarlyStopping(patience=patience)] if patience > 0 else [], verbose=0)
    return model, fit_kw


def _run_trial(task: _Task, data: _TrialData, return_model: bool = False) -> "Trial | tuple[Trial, Any]":
    """Train and score one configuration (runs in a worker process / Dask task)."""
    from ..training import TrainingDiverged

    t0 = time.perf_counter()
    trial = Trial(task.id, task.round, task.seed, dict(task.settings))
    model, fit_kw = _build(task, data.X_train.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # batch_size > m, gradient-norm warnings: a search explores bad settings
        try:
            history = model.fit(data.X_train, data.y_train, validation_data=(data.X_dev, data.y_dev), **fit_kw)
        except TrainingDiverged:
            trial.status = "diverged"
            trial.history = {k: list(v) for k, v in (model.history.history if model.history else {}).items()}
            trial.epochs = len(trial.history.get("loss", []))
            trial.time = time.perf_counter() - t0
            return (trial, model) if return_model else trial
    tr = model.evaluate(data.X_train, data.y_train)
    dv = model.evaluate(data.X_dev, data.y_dev)
    trial.train_loss, trial.dev_loss = tr["loss"], dv["loss"]
    trial.train_error, trial.dev_error = tr.get("error"), dv.get("error")
    score = trial.dev_error if trial.dev_error is not None else trial.dev_loss
    trial.score = score if math.isfinite(score) else math.inf
    if not math.isfinite(score):
        trial.status = "diverged"
    trial.history = {k: list(v) for k, v in history.history.items()}
    trial.epochs = len(history.epoch)
    trial.time = time.perf_counter() - t0
    return (trial, model) if return_model else trial


# =========================================================================== executors
def _dask_client(client: Any, scheduler: Any) -> tuple[Any, bool]:
    """(client, owned): connect to a scheduler address, or use the given Client."""
    if client is None and scheduler is None:
        return None, False
    if client is not None and scheduler is not None:
        raise ValueError("give either client= or scheduler=, not both")
    target = client if client is not None else scheduler
    if not isinstance(target, str):
        if not (hasattr(target, "submit") and hasattr(target, "gather") and hasattr(target, "scatter")):
            raise TypeError(f"client must be a dask.distributed.Client or a scheduler address, "
                            f"got {type(target).__name__}")
        return target, False
    try:
        from dask.distributed import Client
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("running trials on a Dask cluster needs dask.distributed: "
                          "pip install 'fastdl[dask]'") from exc
    return Client(target), True


def _execute(tasks: list[_Task], data: _TrialData, n_jobs: int, client: Any, remote: Any = None) -> list[Trial]:
    if client is not None:
        futures = [client.submit(_run_trial, t, remote, pure=False) for t in tasks]
        results = client.gather(futures)
    elif n_jobs == 1 or len(tasks) == 1:
        results = [_run_trial(t, data) for t in tasks]
    else:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=n_jobs)(delayed(_run_trial)(t, data) for t in tasks)
    return sorted(results, key=lambda tr: tr.id)
