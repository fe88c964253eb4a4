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
classifiers, mean loss for ``mse``). After each round the ranges shrink
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

import math
import numbers
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "Sampler", "Uniform", "LogUniform", "OneMinusLogUniform", "IntUniform", "Choice", "Trial", "SearchResult",
    "search", "sample_space", "shrink_space", "parse_setting", "SETTINGS_DEFAULTS",
]


# =========================================================================== samplers
def _real(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise TypeError(f"{name} must be a finite real number, got {v!r}")
    return float(v)


def _int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    return int(v)


class Sampler:
    """Base class of the search-space samplers.

    ``sample(rng)`` draws one value; ``shrink(best_values, factor)`` returns
    the narrower sampler (or a constant) of the next coarse-to-fine round.
    ``log`` says whether values are best plotted on a log axis.
    """

    log: bool = False

    def sample(self, rng: np.random.Generator) -> Any:  # pragma: no cover
        raise NotImplementedError

    def shrink(self, best_values: Sequence[Any], factor: float) -> Any:  # pragma: no cover
        raise NotImplementedError

    def _args(self) -> tuple:  # pragma: no cover
        return ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._args() == self._args()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._args()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(a) for a in self._args())})"


class _Continuous(Sampler):
    """Uniform on an internal scale ``[lo, hi]`` (identity, log10, ...)."""

    lo: float
    hi: float

    def _to_internal(self, v: float) -> float:  # pragma: no cover
        raise NotImplementedError

    def _from_internal(self, r: float) -> float:  # pragma: no cover
        raise NotImplementedError

    def _narrowed(self, lo: float, hi: float) -> "Sampler":  # pragma: no cover
        raise NotImplementedError

    def _clip(self, v: float) -> float:  # guard 10**log10(x) round-off
        a, b = sorted((self._from_internal(self.lo), self._from_internal(self.hi)))
        return min(max(v, a), b)

    def sample(self, rng: np.random.Generator) -> float:
        return self._clip(float(self._from_internal(rng.uniform(self.lo, self.hi))))

    def shrink(self, best_values: Sequence[Any], factor: float) -> "Sampler":
        """A window ``factor`` times as wide (in this sampler's scale) centred on the best values' mean."""
        r = np.array([self._to_internal(float(v)) for v in best_values], dtype=np.float64)
        width = (self.hi - self.lo) * factor
        centre = float(np.clip(r.mean(), self.lo, self.hi))
        lo = min(max(centre - width / 2.0, self.lo), self.hi - width)
        return self._narrowed(lo, lo + width)


class Uniform(_Continuous):
    """``x ~ U[low, high]``: for settings on a linear scale (e.g. ``keep_prob``)."""

    def __init__(self, low: float, high: float):
        self.low, self.high = _real("low", low), _real("high", high)
        if self.low >= self.high:
            raise ValueError(f"Uniform needs low < high, got low={low!r}, high={high!r}")
        self.lo, self.hi = self.low, self.high

    def _to_internal(self, v):
        return v

    def _from_internal(self, r):
        return r

    def _narrowed(self, lo, hi):
        return Uniform(lo, hi)

    def _args(self):
        return (self.low, self.high)


class LogUniform(_Continuous):
    """``r ~ U[log10 low, log10 high]``, ``x = 10**r``: learning rate, L2 strength (SPEC.md).

    ``LogUniform(1e-4, 1)`` samples as many values in [1e-4, 1e-3] as in [0.1, 1].
    """

    log = True

    def __init__(self, low: float, high: float):
        self.low, self.high = _real("low", low), _real("high", high)
        if self.low <= 0:
            raise ValueError(f"LogUniform needs low > 0 (it samples log10(x)), got low={low!r}; "
                             "use Uniform for ranges that include 0")
        if self.low >= self.high:
            raise ValueError(f"LogUniform needs low < high, got low={low!r}, high={high!r}")
        self.lo, self.hi = math.log10(self.low), math.log10(self.high)

    def _to_internal(self, v):
        return math.log10(v)

    def _from_internal(self, r):
        return 10.0 ** r

    def _narrowed(self, lo, hi):
        return LogUniform(10.0 ** lo, 10.0 ** hi)

    def _args(self):
        return (self.low, self.high)


class OneMinusLogUniform(_Continuous):
    """For EWA betas: ``r ~ U[log10(1 - beta_max), log10(1 - beta_min)]``, ``beta = 1 - 10**r`` (SPEC.md).

    ``OneMinusLogUniform(0.9, 0.999)`` gives ``r in [-3, -1]``: betas in
    0.9..0.99 (averaging 10..100 values) are as likely as in 0.99..0.999.
    """

    log = True  # plotted as 1 - beta on a log axis

    def __init__(self, beta_min: float, beta_max: float):
        self.beta_min, self.beta_max = _real("beta_min", beta_min), _real("beta_max", beta_max)
        if not 0.0 <= self.beta_min < self.beta_max < 1.0:
            raise ValueError(f"OneMinusLogUniform needs 0 <= beta_min < beta_max < 1, got "
                             f"beta_min={beta_min!r}, beta_max={beta_max!r}")
        self.lo, self.hi = math.log10(1.0 - self.beta_max), math.log10(1.0 - self.beta_min)

    def _to_internal(self, v):
        return math.log10(1.0 - v)

    def _from_internal(self, r):
        return 1.0 - 10.0 ** r

    def _narrowed(self, lo, hi):
        return OneMinusLogUniform(1.0 - 10.0 ** hi, 1.0 - 10.0 ** lo)

    def _args(self):
        return (self.beta_min, self.beta_max)


class IntUniform(Sampler):
    """Integers uniform in ``[low, high]`` (both included): hidden units, number of layers.

    ``log=True`` samples ``floor(10**r)`` with ``r ~ U[log10 low, log10(high + 1))``,
    so 16..32 is as likely as 128..256.
    """

    def __init__(self, low: int, high: int, log: bool = False):
        self.low, self.high = _int("low", low), _int("high", high)
        if self.low >= self.high:
            raise ValueError(f"IntUniform needs low < high, got low={low!r}, high={high!r} "
                             "(for a fixed value put the integer itself in the space)")
        self.log = bool(log)
        if self.log and self.low <= 0:
            raise ValueError(f"IntUniform(log=True) needs low >= 1, got low={low!r}")

    def sample(self, rng: np.random.Generator) -> int:
        if not self.log:
            return int(rng.integers(self.low, self.high + 1))
        r = rng.uniform(math.log10(self.low), math.log10(self.high + 1))
        return int(min(max(math.floor(10.0 ** r), self.low), self.high))

    def shrink(self, best_values: Sequence[Any], factor: float) -> "IntUniform | int":
        f = (lambda v: math.log10(v)) if self.log else float
        g = (lambda r: 10.0 ** r) if self.log else (lambda r: r)
        lo_i, hi_i = f(self.low), f(self.high)
        width = (hi_i - lo_i) * factor
        centre = float(np.mean([f(int(v)) for v in best_values]))
        a = min(max(centre - width / 2.0, lo_i), hi_i - width)
        low = max(self.low, int(math.ceil(g(a) - 1e-9)))
        high = min(self.high, int(math.floor(g(a + width) + 1e-9)))
        if low >= high:
            return int(min(max(round(g(centre)), self.low), self.high))
        return IntUniform(low, high, log=self.log)

    def _args(self):
        return (self.low, self.high, self.log)

    def __repr__(self) -> str:
        return f"IntUniform({self.low}, {self.high}{', log=True' if self.log else ''})"


class Choice(Sampler):
    """One of ``options``, uniformly (categorical: activation, batchnorm on/off, batch size...).

    Coarse to fine keeps the options used by the best trials.
    """

    def __init__(self, options: Sequence[Any]):
        if isinstance(options, (str, bytes)) or not isinstance(options, Sequence):
            raise TypeError(f"Choice needs a list of options, got {options!r}")
        self.options = list(options)
        if not self.options:
            raise ValueError("Choice needs at least one option")

    def sample(self, rng: np.random.Generator) -> Any:
        return self.options[int(rng.integers(len(self.options)))]

    def shrink(self, best_values: Sequence[Any], factor: float) -> Any:
        kept = [o for o in self.options if any(_same(o, v) for v in best_values)]
        if not kept:
            return self
        return kept[0] if len(kept) == 1 else Choice(kept)

    def _args(self):
        return (tuple(self.options),)

    def __repr__(self) -> str:
        return f"Choice({self.options!r})"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, bool) or isinstance(b, bool):  # True == 1, but they are different options
        return a is b
    return bool(a == b)


# =========================================================================== spaces
#: What each trial's model and ``fit`` use when the space does not set a key.
SETTINGS_DEFAULTS: dict[str, Any] = {
    "hidden": None,           # tuple of layer widths; overrides n_layers/units
    "n_layers": 1,            # hidden layers, each of `units` units
    "units": 64,
    "activation": "relu",     # relu, tanh, sigmoid
    "batchnorm": False,
    "keep_prob": 1.0,         # dropout keep probability (1 = none)
    "l2": 0.0,
    "l2_scale": "batch",
    "optimizer": "adam",      # sgd, momentum, rmsprop, adam
    "lr": 1e-3,
    "beta": 0.9,              # momentum
    "beta1": 0.9,             # adam
    "beta2": 0.999,           # rmsprop, adam
    "eps": 1e-8,
    "batch_size": 64,
    "epochs": 10,
    "schedule": "constant",   # constant, inverse_time, exponential, inverse_sqrt, staircase
    "patience": 0,            # early stopping on dev loss (0 = off)
    "momentum": 0.9,          # classical_momentum (PyTorch / scikit-learn form)
    "nesterov": True,         # classical_momentum
    "precision": "fp32",      # fp32, bf16 (bfloat16 matrix products, float32 parameters)
}
_SCHEDULE_ARGS = {"constant": (), "inverse_time": ("decay_rate",), "exponential": ("base",),
                  "inverse_sqrt": ("k", "per_step"), "staircase": ("factor", "every")}
_OPTIMIZER_ARGS = {"sgd": ("lr",), "momentum": ("lr", "beta"), "rmsprop": ("lr", "beta2", "eps"),
                   "adam": ("lr", "beta1", "beta2", "eps"),
                   "classical_momentum": ("lr", "momentum", "nesterov")}
KNOWN_KEYS = frozenset(SETTINGS_DEFAULTS) | {a for args in _SCHEDULE_ARGS.values() for a in args}


def _check_space(space: Any) -> dict[str, Any]:
    if not isinstance(space, Mapping):
        raise TypeError(f"space must be a dict of setting name -> sampler or value, got {type(space).__name__}")
    if not space:
        raise ValueError("the search space is empty: give at least one setting, e.g. {'lr': LogUniform(1e-4, 1e-1)}")
    out: dict[str, Any] = {}
    for k, v in space.items():
        if not isinstance(k, str):
            raise TypeError(f"space keys must be setting names (str), got {k!r}")
        if k not in KNOWN_KEYS:
            raise ValueError(f"unknown setting {k!r} in the search space; known settings: {sorted(KNOWN_KEYS)}")
        if isinstance(v, list):
            if k == "hidden" and v and all(isinstance(x, numbers.Integral) for x in v):
                raise ValueError("hidden=[...] of integers is ambiguous: use a tuple for fixed layer widths, "
                                 "hidden=(128, 64), or Choice([(64,), (128, 64)]) to search over architectures")
            v = Choice(v)  # like scikit-learn's param_distributions: a list is a uniform choice
        if isinstance(v, type) and issubclass(v, Sampler):
            raise TypeError(f"space[{k!r}] is the class {v.__name__}: instantiate it, e.g. {v.__name__}(low, high)")
        if not isinstance(v, Sampler) and hasattr(v, "rvs"):
            raise TypeError(f"space[{k!r}]: scipy.stats distributions are not supported; use LogUniform, "
                            "Uniform, IntUniform, OneMinusLogUniform or Choice")
        out[k] = v
    return out


def _param_rng(seed: int, rnd: int, index: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, rnd, index, zlib.crc32(name.encode())])


def _trial_seed(seed: int, rnd: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, rnd, index, 0x5EED]).generate_state(1)[0] % (2 ** 31 - 1))


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list):
        return tuple(_plain(x) for x in v)
    return v


def sample_space(space: Mapping[str, Any], seed: int = 0, round: int = 0, index: int = 0) -> dict[str, Any]:
    """The settings of trial ``index`` of ``round``: each sampler draws from its own seeded generator.

    A setting's value depends only on (seed, round, index, its name) and its
    sampler, not on the other settings or on the order of the keys.
    """
    space = _check_space(space)
    return {k: _plain(v.sample(_param_rng(seed, round, index, k)) if isinstance(v, Sampler) else v)
            for k, v in space.items()}


def shrink_space(space: Mapping[str, Any], best: Sequence[Mapping[str, Any]], factor: float = 0.5) -> dict[str, Any]:
    """Coarse to fine: narrow every sampler around the settings of the ``best`` trials.

    Continuous samplers get a window ``factor`` times as wide, in their own
    scale (log10 for :class:`LogUniform`, log10(1 - beta) for
    :class:`OneMinusLogUniform`), centred on the mean of the best values and
    kept inside the old range; integers likewise (a single value becomes a
    constant); :class:`Choice` keeps the options the best trials used.
    """
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"shrink factor must be in (0, 1], got {factor!r}")
    if not best:
        return dict(space)
    return {k: (v.shrink([b[k] for b in best], factor) if isinstance(v, Sampler) else v) for k, v in space.items()}


def _parse_value(text: str) -> Any:
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    if "x" in low and all(p.strip().isdigit() for p in low.split("x")):
        return tuple(int(p) for p in low.split("x"))  # 128x64: hidden layer widths
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_setting(text: str) -> tuple[str, Any]:
    """Parse ``NAME=SPEC`` (the ``fastdl search --param`` syntax) into ``(name, sampler or value)``.

    SPEC is ``log:LOW:HIGH`` (:class:`LogUniform`), ``uniform:LOW:HIGH``,
    ``int:LOW:HIGH``, ``intlog:LOW:HIGH`` (:class:`IntUniform`, log scale),
    ``beta:MIN:MAX`` (:class:`OneMinusLogUniform`), ``choice:A,B,...`` or a
    constant. Values: numbers, ``true``/``false``, words, ``128x64`` for a
    tuple of layer widths.

    >>> parse_setting("lr=log:1e-4:1e-1")
    ('lr', LogUniform(0.0001, 0.1))
    >>> parse_setting("hidden=choice:64,128x64")
    ('hidden', Choice([(64,), (128, 64)]))
    """
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"expected NAME=SPEC such as lr=log:1e-4:1e-1, got {text!r}")
    kind, colon, rest = spec.partition(":")
    kind = kind.strip().lower()
    ranges = {"log": LogUniform, "uniform": Uniform, "beta": OneMinusLogUniform,
              "int": IntUniform, "intlog": lambda a, b: IntUniform(a, b, log=True)}
    if colon and kind in ranges:
        parts = rest.split(":")
        if len(parts) != 2:
            raise ValueError(f"{name}: {kind}:LOW:HIGH needs two bounds, got {spec!r}")
        lo, hi = (_parse_value(p) for p in parts)
        if kind in ("int", "intlog"):
            if not (isinstance(lo, int) and isinstance(hi, int)) or isinstance(lo, bool) or isinstance(hi, bool):
                raise ValueError(f"{name}: {kind} bounds must be integers, got {spec!r}")
        elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
            raise ValueError(f"{name}: {kind} bounds must be numbers, got {spec!r}")
        return name, ranges[kind](lo, hi)
    if colon and kind == "choice":
        options = [_parse_value(p) for p in rest.split(",") if p.strip()]
        if name == "hidden":
            options = [(o,) if isinstance(o, int) and not isinstance(o, bool) else o for o in options]
        return name, Choice(options)
    if colon and kind.isalpha() and kind not in ("tcp", "http"):
        raise ValueError(f"{name}: unknown sampler {kind!r} in {spec!r}; use log, uniform, int, intlog, beta "
                         "or choice")
    value = _parse_value(spec)
    if name == "hidden" and isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    return name, value


# =========================================================================== trials
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
    from .callbacks import EarlyStopping
    from .cli import build_mlp
    from .model import Sequential
    from .optim import get_optimizer
    from .schedules import get_schedule

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
    from .training import TrainingDiverged

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


# =========================================================================== result
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
        from .plotting import plot_search

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


# =========================================================================== search
def _n_outputs(loss: str, y_train: np.ndarray, y_dev: np.ndarray) -> int:
    if loss == "softmax_cross_entropy":
        whole = y_train.dtype.kind in "iu" or (y_train.dtype.kind == "f" and np.all(y_train == np.round(y_train)))
        if y_train.ndim != 1 or not whole:
            raise ValueError("softmax_cross_entropy needs integer class labels y of shape (m,)")
        return int(max(np.max(y_train), np.max(y_dev) if len(y_dev) else 0)) + 1
    if loss == "binary_cross_entropy":
        return 1
    if loss == "mse":
        return 1 if y_train.ndim == 1 else int(y_train.shape[1])
    raise ValueError(f"unknown loss {loss!r}; choose softmax_cross_entropy, binary_cross_entropy or mse")


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
        from .data import train_dev_test_split

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
    score_name = "dev_error" if best_trial.dev_error is not None or loss != "mse" else "dev_loss"
    return SearchResult(trials, best_trial, best_model, dict(space), round_spaces, score_name, int(seed),
                        time.perf_counter() - t_start, executor)
