"""Learning-rate schedules (docs/spec.md "Learning-rate decay").

A schedule maps ``(alpha0, epoch, step)`` to the learning rate of the next
update; ``epoch`` counts from 0 and ``step`` (updates) from 1. ``alpha0`` is
the optimiser's ``lr``, so a callback that changes ``optimizer.lr`` between
epochs (manual decay) composes with any schedule.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ._validation import check_positive


class Schedule:
    """Base class: constant learning rate."""

    #: False when the rate depends on the epoch only (then :meth:`rates` calls the schedule once)
    per_step: bool = False

    def __call__(self, alpha0: float, epoch: int, step: int) -> float:
        return alpha0

    def rates(self, alpha0: float, epoch: int, first_step: int, n: int) -> np.ndarray:
        """The rates of ``n`` consecutive updates of one epoch, steps ``first_step, first_step + 1, ...``.

        Equal, element for element, to calling the schedule per step (the
        fused epoch takes them as one array).
        """
        if not self.per_step:
            return np.full(n, float(self(alpha0, epoch, first_step)))
        return np.array([self(alpha0, epoch, first_step + i) for i in range(n)], dtype=np.float64)

    def get_config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """``alpha = alpha0``."""


class InverseTimeDecay(Schedule):
    """``alpha = alpha0 / (1 + decay_rate * epoch)``."""

    def __init__(self, decay_rate: float = 1.0):
        self.decay_rate = check_positive("decay_rate", decay_rate, allow_zero=True)

    def __call__(self, alpha0, epoch, step):
        return alpha0 / (1.0 + self.decay_rate * epoch)

    def get_config(self):
        return {"decay_rate": self.decay_rate}


class ExponentialDecay(Schedule):
    """``alpha = base**epoch * alpha0`` (e.g. base 0.95)."""

    def __init__(self, base: float = 0.95):
        self.base = check_positive("base", base)

    def __call__(self, alpha0, epoch, step):
        return self.base ** epoch * alpha0

    def get_config(self):
        return {"base": self.base}


class InverseSqrtDecay(Schedule):
    """``alpha = k / sqrt(epoch + 1) * alpha0``, or per step ``k / sqrt(t) * alpha0``."""

    def __init__(self, k: float = 1.0, per_step: bool = False):
        self.k = check_positive("k", k)
        self.per_step = bool(per_step)

    def __call__(self, alpha0, epoch, step):
        n = step if self.per_step else epoch + 1
        return self.k / math.sqrt(max(n, 1)) * alpha0

    def get_config(self):
        return {"k": self.k, "per_step": self.per_step}


class StaircaseDecay(Schedule):
    """``alpha = alpha0 * factor ** floor(epoch / every)`` (halve every N epochs by default)."""

    def __init__(self, factor: float = 0.5, every: int = 10):
        self.factor = check_positive("factor", factor)
        self.every = check_positive("every", every, integer=True)

    def __call__(self, alpha0, epoch, step):
        return alpha0 * self.factor ** (epoch // self.every)

    def get_config(self):
        return {"factor": self.factor, "every": self.every}


class LambdaSchedule(Schedule):
    """Any ``fn(alpha0, epoch, step) -> lr`` (not serialisable)."""

    per_step = True  # unknown: ask fn for every step

    def __init__(self, fn: Callable[[float, int, int], float]):
        self.fn = fn

    def __call__(self, alpha0, epoch, step):
        return float(self.fn(alpha0, epoch, step))


SCHEDULES: dict[str, type[Schedule]] = {
    "constant": Constant,
    "inverse_time": InverseTimeDecay,
    "exponential": ExponentialDecay,
    "inverse_sqrt": InverseSqrtDecay,
    "staircase": StaircaseDecay,
}


def get_schedule(spec: "str | Schedule | None", **kwargs) -> Schedule:
    """A schedule from a name in :data:`SCHEDULES`, an instance, or None (constant)."""
    if spec is None:
        return Constant()
    if isinstance(spec, Schedule):
        return spec
    if spec not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {spec!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[spec](**kwargs)
