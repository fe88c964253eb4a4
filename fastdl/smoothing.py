"""Exponentially weighted averages (docs/spec.md "Exponentially weighted averages", notes 2.3-2.5).

``v_0 = 0``, ``v_t = beta * v_{t-1} + (1 - beta) * x_t`` averages over about
``1 / (1 - beta)`` values; the bias-corrected ``v_t / (1 - beta**t)`` removes
the pull towards 0 of the first steps. Used to smooth the mini-batch cost
curve (:func:`fastdl.plotting.plot_training`).
"""
from __future__ import annotations

import numbers

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["ewa", "EWA"]


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not np.isfinite(beta):
        raise TypeError(f"beta must be a real number in [0, 1), got {beta!r}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r} (beta = 0.9 averages about 10 values)")
    return float(beta)


def ewa(values: ArrayLike, beta: float = 0.9, bias_correction: bool = True) -> np.ndarray:
    """Exponentially weighted average of a sequence.

    Parameters
    ----------
    values : array_like, shape (T,) or (T, ...)
        ``x_1 .. x_T`` along the first axis (extra axes are averaged
        independently, e.g. one column per curve).
    beta : float in [0, 1)
        Weight of the past; averages over about ``1 / (1 - beta)`` values.
        ``beta = 0`` returns the values unchanged.
    bias_correction : bool
        Divide ``v_t`` by ``1 - beta**t`` (t counts from 1) so early values are
        not biased towards the initial ``v_0 = 0``.

    Returns
    -------
    ndarray of float64, same shape as ``values``
        ``v_1 .. v_T`` (corrected when ``bias_correction``).

    Examples
    --------
    >>> ewa([1.0, 2.0, 3.0], beta=0.5, bias_correction=False)
    array([0.5  , 1.25 , 2.125])
    >>> ewa([1.0, 2.0, 3.0], beta=0.5).round(4)
    array([1.    , 1.6667, 2.4286])
    """
    beta = _check_beta(beta)
    x = np.asarray(values)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"values must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if x.ndim == 0:
        raise ValueError("values must be a sequence (shape (T,) or (T, ...)), got a scalar")
    if x.shape[0] == 0:
        return x.copy()
    from scipy.signal import lfilter  # imported here: scipy.signal is slow to import

    # v_t = beta v_{t-1} + (1-beta) x_t with v_0 = 0: a first-order IIR filter, run in C.
    v = lfilter([1.0 - beta], [1.0, -beta], x, axis=0)
    if bias_correction and beta > 0.0:
        t = np.arange(1, x.shape[0] + 1, dtype=np.float64)
        v /= (-np.expm1(t * np.log(beta))).reshape((-1,) + (1,) * (x.ndim - 1))  # 1 - beta**t, accurately
    return v


class EWA:
    """Streaming exponentially weighted average (one value at a time).

    >>> avg = EWA(beta=0.5)
    >>> avg.update(1.0), avg.update(2.0)
    (1.0, 1.6666666666666667)
    >>> avg.value, avg.raw, avg.t
    (1.6666666666666667, 1.25, 2)
    """

    def __init__(self, beta: float = 0.9, bias_correction: bool = True):
        self.beta = _check_beta(beta)
        self.bias_correction = bool(bias_correction)
        self.raw = 0.0
        self.t = 0

    def update(self, x: float) -> float:
        """Add ``x_t`` and return the (corrected) average ``v_t``."""
        self.t += 1
        self.raw = self.beta * self.raw + (1.0 - self.beta) * float(x)
        return self.value

    @property
    def value(self) -> float:
        """Current average (``nan`` before the first update)."""
        if self.t == 0:
            return float("nan")
        if self.bias_correction and self.beta > 0.0:
            return self.raw / (1.0 - self.beta ** self.t)
        return self.raw

    def __repr__(self) -> str:
        return f"EWA(beta={self.beta}, t={self.t}, value={self.value:.6g})"
