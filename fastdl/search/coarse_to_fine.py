"""``search``: rounds of random trials, each round sampling around the best so far."""
from __future__ import annotations

import math
import numbers
import time
from typing import Any, Mapping

import numpy as np

from ..plan import LOSS_CODES, REGRESSION_LOSSES
from .result import SearchResult, _fmt
from .samplers import _int, _real
from .space import _check_space, _trial_seed, sample_space, shrink_space
from .trials import Trial, _build, _dask_client, _execute, _run_trial, _Task, _TrialData

_REGRESSION = frozenset(name for name, code in LOSS_CODES.items() if code in REGRESSION_LOSSES)


def _n_outputs(loss: str, y_train: np.ndarray, y_dev: np.ndarray) -> int:
    if loss == "softmax_cross_entropy":
        whole = y_train.dtype.kind in "iu" or (y_train.dtype.kind == "f" and np.all(y_train == np.round(y_train)))
        if y_train.ndim != 1 or not whole:
            raise ValueError("softmax_cross_entropy needs integer class labels y of shape (m,)")
        return int(max(np.max(y_train), np.max(y_dev) if len(y_dev) else 0)) + 1
    if loss == "binary_cross_entropy":
        return 1
    if loss in _REGRESSION:
        return 1 if y_train.ndim == 1 else int(y_train.shape[1])
    raise ValueError(f"unknown loss {loss!r}; choose softmax_cross_entropy, binary_cross_entropy, mse or poisson")


def search(space: Mapping[str, Any], X, y, *, validation_data: "tuple[Any, Any] | None" = None,
           dev_size: float = 0.2, n_trials: int = 10, rounds: int = 1, top_k: int = 3, shrink: float = 0.5,
           seed: int = 0, n_jobs: int = -1, client: Any = None, scheduler: "str | None" = None,
           loss: str = "softmax_cross_entropy", backend: str = "auto", dtype: str = "float32",
           refit: bool = True, verbose: int = 0) -> SearchResult:
    """Random hyperparameter search with coarse-to-fine rounds, scored on the dev set.

    Parameters
    ----------
    space : dict
        Setting name -> sampler (:class:`LogUniform`, :class:`OneMinusLogUniform`,
        :class:`IntUniform`, :class:`Uniform`, :class:`Choice`), a list
        (a uniform choice) or a constant. Settings (defaults in
        :data:`SETTINGS_DEFAULTS`): ``hidden`` (tuple of widths) or
        ``n_layers`` and ``units``; ``activation``, ``batchnorm``,
        ``keep_prob``, ``l2``, ``l2_scale``, ``optimizer``, ``lr``, ``beta``,
        ``beta1``, ``beta2``, ``eps``, ``momentum`` and ``nesterov``
        (``optimizer='classical_momentum'``), ``batch_size``, ``epochs``,
        ``schedule`` (and ``decay_rate``, ``base``, ``k``, ``factor``,
        ``every``), ``patience``, ``precision`` (``'fp32'``/``'bf16'``,
        e.g. ``Choice(['fp32', 'bf16'])``).
    X, y : arrays
        Training data (standardise X first, e.g. with :class:`fastdl.data.Standardizer`).
    validation_data : (X_dev, y_dev), optional
        The dev set that scores the trials; without it a stratified
        ``dev_size`` share of ``X, y`` is held out (seeded by ``seed``).
    n_trials : int
        Trials per round (``n_trials * rounds`` in total).
    rounds : int
        Coarse-to-fine rounds; after each, every range shrinks around the
        ``top_k`` best trials so far by ``shrink`` (see :func:`shrink_space`).
    seed : int
        Fixes every sample and every model seed (results do not depend on
        ``n_jobs`` or ``client``).
    n_jobs : int
        Local worker processes (joblib); ``-1`` all cores, ``1`` in this process.
    client, scheduler : dask.distributed.Client or str, optional
        Run the trials on a Dask cluster (a Client, or the scheduler address).
    loss, backend, dtype : str
        Passed to every :class:`fastdl.Sequential`.
    refit : bool
        Retrain the best configuration in this process (``result.best_model``).
    verbose : int
        1 prints one line per round.

    Returns
    -------
    SearchResult
    """
    t_start = time.perf_counter()
    space = _check_space(space)
    for name, v, lo in (("n_trials", n_trials, 1), ("rounds", rounds, 1), ("top_k", top_k, 1)):
        if _int(name, v) < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(n_jobs, numbers.Integral) or n_jobs == 0:
        raise ValueError(f"n_jobs must be a nonzero integer (-1 = all cores), got {n_jobs!r}")
    shrink = _real("shrink", shrink)
    if not 0.0 < shrink <= 1.0:
        raise ValueError(f"shrink must be in (0, 1], got {shrink!r}")

    X = np.asarray(X)
    y = np.asarray(y)
    if validation_data is None:
        from ..data import train_dev_test_split

        classify = loss == "softmax_cross_entropy" or loss == "binary_cross_entropy"
        X, X_dev, _, y, y_dev, _ = train_dev_test_split(X, y, dev_size=dev_size, test_size=0, seed=seed,
                                                        stratify=classify)
    else:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError("validation_data must be a tuple (X_dev, y_dev)")
        X_dev, y_dev = (np.asarray(a) for a in validation_data)
    if X.ndim != 2 or X_dev.ndim != 2 or X.shape[1] != X_dev.shape[1]:
        raise ValueError(f"X and X_dev must be 2-D with the same number of features, got {X.shape} and {X_dev.shape}")
    n_out = _n_outputs(loss, y, y_dev)
    data = _TrialData(X, y, X_dev, y_dev)

    owned = False
    dask_client, owned = _dask_client(client, scheduler)
    if dask_client is not None:
        executor = f"dask ({getattr(dask_client, 'scheduler', None) and dask_client.scheduler.address})"
    elif n_jobs == 1:
        executor = "serial"
    else:
        executor = f"joblib (n_jobs={n_jobs})"

    trials: list[Trial] = []
    round_spaces: list[dict[str, Any]] = []
    current = space
    remote = None
    try:
        if dask_client is not None:
            # once per search, under a unique key, held until the end
            remote = dask_client.scatter(data, broadcast=True, hash=False)
        for rnd in range(rounds):
            if rnd > 0:
                best = [t.settings for t in sorted(trials, key=lambda t: (t.score, t.id))[:top_k]
                        if math.isfinite(t.score)]
                current = shrink_space(current, best, shrink)
            round_spaces.append(current)
            tasks = []
            for i in range(n_trials):
                tid = rnd * n_trials + i
                settings = sample_space(current, seed, rnd, i)
                # rounds are numbered from 1 wherever a user sees them (log, table, Trial.round); the
                # 0-based rnd only keys the random streams
                task = _Task(tid, rnd + 1, _trial_seed(seed, rnd, i), settings, loss, n_out, backend, dtype)
                _build(task, X.shape[1])  # fail fast, in this process, on invalid settings
                tasks.append(task)
            t0 = time.perf_counter()
            trials.extend(_execute(tasks, data, n_jobs, dask_client, remote))
            if verbose:
                best_t = min(trials, key=lambda t: (t.score, t.id))
                print(f"round {rnd + 1}/{rounds}: {n_trials} trials in {time.perf_counter() - t0:.2f} s; "
                      f"best so far trial {best_t.id} (round {best_t.round}) with {_fmt(best_t.score)}", flush=True)
    finally:
        if remote is not None:
            remote.release()
        if owned:
            dask_client.close()

    best_trial = min(trials, key=lambda t: (t.score, t.id))
    best_model = None
    if refit:
        task = _Task(best_trial.id, best_trial.round, best_trial.seed, dict(best_trial.settings), loss, n_out,
                     backend, dtype)
        _, best_model = _run_trial(task, data, return_model=True)
    score_name = "dev_error" if best_trial.dev_error is not None or loss not in _REGRESSION else "dev_loss"
    return SearchResult(trials, best_trial, best_model, dict(space), round_spaces, score_name, int(seed),
                        time.perf_counter() - t_start, executor)
