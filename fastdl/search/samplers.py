"""Samplers of a search space: uniform, log-uniform, 1-minus-log-uniform, integer, choice."""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np


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
