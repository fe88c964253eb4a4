"""Random hyperparameter search, coarse to fine, in parallel (SPEC.md "Hyperparameter sampling").

>>> import fastdl as fd
>>> from fastdl.search import LogUniform, OneMinusLogUniform, IntUniform, Choice
>>> space = {
...     "lr": LogUniform(1e-4, 1e-1),            # r ~ U[-4, -1], lr = 10**r
...     "beta1": OneMinusLogUniform(0.8, 0.99),  # 1 - beta1 on a log scale
...     "units": IntUniform(16, 128), "n_layers": IntUniform(1, 2),
...     "batchnorm": Choice([True, False]), "l2": LogUniform(1e-5, 1e-1),
...     "epochs": 5,                              # constants are allowed
... }
>>> result = fd.search(space, X_train, y_train, validation_data=(X_dev, y_dev),
...                    n_trials=20, rounds=2, seed=0)            # doctest: +SKIP
>>> print(result.table(5)); model = result.best_model          # doctest: +SKIP

Every trial builds an MLP from its settings (:func:`fastdl.cli.build_mlp`),
trains it with ``fit`` and is scored on the dev set (error rate for
classifiers, mean dev loss for regression (``mse``, ``poisson``)). After each round the ranges shrink
around the ``top_k`` best trials so far and the next round samples again.

Reproducibility: the samples of trial ``i`` of round ``r`` come from
generators seeded by ``(seed, r, i, parameter name)`` and its model seed from
``(seed, r, i)``; training is deterministic. The trials and their results are
therefore the same whether they run serially (``n_jobs=1``), in local
processes (joblib, ``n_jobs=-1``), or on a Dask cluster (``client=``), in any
order.

Import note: ``fd.search`` is the function; the samplers live in the module
(``from fastdl.search import LogUniform``, also exported as ``fd.LogUniform``).

Parallel execution
------------------
``n_jobs``: local processes through joblib (a runtime dependency of fastdl);
``-1`` uses every core, ``1`` runs in this process. ``client``: a
``dask.distributed.Client`` or a scheduler address such as
``"tcp://10.0.0.5:8786"`` (``pip install 'fastdl[dask]'``); the data are
scattered to the workers once per round and every trial is a task, so a
search that outgrows one machine runs on an existing cluster unchanged
(fastdl must be installed on the workers).
"""
from __future__ import annotations

from .coarse_to_fine import search
from .result import SearchResult
from .samplers import Choice, IntUniform, LogUniform, OneMinusLogUniform, Sampler, Uniform
from .space import SETTINGS_DEFAULTS, parse_setting, sample_space, shrink_space
from .trials import Trial

__all__ = [
    "Sampler", "Uniform", "LogUniform", "OneMinusLogUniform", "IntUniform", "Choice", "Trial", "SearchResult",
    "search", "sample_space", "shrink_space", "parse_setting", "SETTINGS_DEFAULTS",
]
