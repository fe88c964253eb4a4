"""Search spaces: defaults, validation, sampling, coarse-to-fine shrinking, ``key=value`` parsing."""
from __future__ import annotations

import numbers
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from .samplers import Choice, IntUniform, LogUniform, OneMinusLogUniform, Sampler, Uniform


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
