"""Optimiser updates (one fused pass over flat arrays) and the float64 reductions.

Element-wise arithmetic in the array dtype, scalars cast to it once. The
per-step coefficients ``c1`` / ``c2`` come from the caller
(:func:`fastdl.plan.step_coefficients`, docs/spec.md "Optimisers"); the
kernels never see a step count. SGD, momentum, RMSprop and Nesterov use the
reference's operation order (float32 results match NumPy bit for bit); Adam
computes ``p -= c1 * v / (sqrt(s * c2) + eps)``: one division and one square
root per element.

All five optimisers share ONE chunk function (a branch on the kind per chunk
of 32k elements costs nothing), so the serial/parallel driver exists once.
"""
from __future__ import annotations

import numpy as np

from ...plan import OPT_ADAM, OPT_CLASSICAL_MOMENTUM, OPT_MOMENTUM, OPT_NESTEROV, OPT_RMSPROP, OPT_SGD
from ._cache import jit as _jit, rjit as _rjit
from ._chunks import CHUNK, RED_CHUNK, T_ADAM, T_OPT, T_SSQ, chunked, current_thresholds, flat_bounds, n_chunks


@_jit
def _opt_loop(kind, p, g, v, s, h0, h1, h2, h3, h4, h5, h6):
    """One optimiser update on 1-D views (scalars already in the array dtype)."""
    n = p.shape[0]
    if kind == OPT_ADAM:        # h: beta1, 1-beta1, beta2, 1-beta2, c1, c2, eps
        for i in range(n):
            gi = g[i]
            vi = h0 * v[i] + h1 * gi
            si = h2 * s[i] + h3 * gi * gi
            v[i] = vi
            s[i] = si
            p[i] -= h4 * vi / (np.sqrt(si * h5) + h6)
    elif kind == OPT_MOMENTUM:  # h: beta, 1-beta, c1
        for i in range(n):
            vi = h0 * v[i] + h1 * g[i]
            v[i] = vi
            p[i] -= h2 * vi
    elif kind == OPT_RMSPROP:   # h: beta2, 1-beta2, lr, eps
        for i in range(n):
            gi = g[i]
            si = h0 * s[i] + h1 * gi * gi
            s[i] = si
            p[i] -= h2 * gi / (np.sqrt(si) + h3)
    elif kind == OPT_NESTEROV:  # h: mu, c1 (scikit-learn's rule)
        for i in range(n):
            gi = g[i]
            vi = h0 * v[i] - h1 * gi
            v[i] = vi
            p[i] += h0 * vi - h1 * gi
    elif kind == OPT_CLASSICAL_MOMENTUM:
        for i in range(n):
            vi = h0 * v[i] - h1 * g[i]
            v[i] = vi
            p[i] += vi
    else:                       # SGD, h: lr
        for i in range(n):
            p[i] -= h0 * g[i]


@chunked
@_jit
def _opt(c, kind, p, g, v, s, h0, h1, h2, h3, h4, h5, h6):
    lo, hi = flat_bounds(c, p.shape[0], CHUNK)
    t = p.dtype.type
    # v / s are empty for the kinds without them: slice only what exists
    vv = v[lo:hi] if v.shape[0] != 0 else v
    ss = s[lo:hi] if s.shape[0] != 0 else s
    _opt_loop(kind, p[lo:hi], g[lo:hi], vv, ss, t(h0), t(h1), t(h2), t(h3), t(h4), t(h5), t(h6))


@_jit
def optimizer_step_impl(kind, params, grads, v, s, h0, h1, h2, h3, h4, h5, h6, parallel):
    """The update of optimiser ``kind`` (plan.OPT_*) with its float64 scalars (see _opt_loop)."""
    _opt(parallel, n_chunks(params.shape[0], CHUNK), kind, params, grads, v, s, h0, h1, h2, h3, h4, h5, h6)


@_jit
def optimizer_step(kind, params, grads, v, s, beta1, beta2, eps, c1, c2, thr):
    """The update of plan kind ``kind`` from an OptimizerSpec's hyperparameters (the epoch executor's form),
    with the public kernels' serial/parallel decision from the threshold array ``thr``."""
    n = params.shape[0]
    if kind == OPT_ADAM:
        optimizer_step_impl(kind, params, grads, v, s, beta1, 1 - beta1, beta2, 1 - beta2, c1, c2, eps,
                            n >= thr[T_ADAM])
        return
    big = n >= thr[T_OPT]
    if kind == OPT_MOMENTUM:
        optimizer_step_impl(kind, params, grads, v, s, beta1, 1 - beta1, c1, 0.0, 0.0, 0.0, 0.0, big)
    elif kind == OPT_RMSPROP:
        optimizer_step_impl(kind, params, grads, v, s, beta2, 1 - beta2, c1, eps, 0.0, 0.0, 0.0, big)
    elif kind == OPT_NESTEROV or kind == OPT_CLASSICAL_MOMENTUM:
        optimizer_step_impl(kind, params, grads, v, s, beta1, c1, 0.0, 0.0, 0.0, 0.0, 0.0, big)
    else:
        optimizer_step_impl(OPT_SGD, params, grads, v, s, c1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, big)




def sgd_step(params, grads, lr: float) -> None:
    """``params -= lr * grads``."""
    optimizer_step_impl(OPT_SGD, params, grads, params[:0], params[:0], float(lr), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                        params.size >= current_thresholds()[T_OPT])


def momentum_step(params, grads, v, beta: float, c1: float) -> None:
    """``v = beta*v + (1-beta)*g``; ``params -= c1 * v`` (c1 = lr, or lr/(1-beta**t) bias-corrected)."""
    beta = float(beta)
    optimizer_step_impl(OPT_MOMENTUM, params, grads, v, params[:0], beta, 1 - beta, float(c1), 0.0, 0.0, 0.0, 0.0,
                        params.size >= current_thresholds()[T_OPT])


def rmsprop_step(params, grads, s, lr: float, beta2: float, eps: float) -> None:
    """``s = beta2*s + (1-beta2)*g^2``; ``params -= lr*g/(sqrt(s)+eps)``."""
    beta2 = float(beta2)
    optimizer_step_impl(OPT_RMSPROP, params, grads, params[:0], s, beta2, 1 - beta2, float(lr), float(eps), 0.0,
                        0.0, 0.0, params.size >= current_thresholds()[T_OPT])


def adam_step(params, grads, v, s, beta1: float, beta2: float, eps: float, c1: float, c2: float) -> None:
    """Fused Adam: both moments and ``params -= c1 * v / (sqrt(c2 * s) + eps)`` in one pass."""
    beta1, beta2 = float(beta1), float(beta2)
    optimizer_step_impl(OPT_ADAM, params, grads, v, s, beta1, 1 - beta1, beta2, 1 - beta2, float(c1), float(c2),
                        float(eps), params.size >= current_thresholds()[T_ADAM])


def nesterov_step(params, grads, v, mu: float, c1: float, nesterov: bool) -> None:
    """scikit-learn's rule: ``v = mu*v - c1*g``; ``params += mu*v - c1*g`` (Nesterov) or ``params += v``."""
    optimizer_step_impl(OPT_NESTEROV if nesterov else OPT_CLASSICAL_MOMENTUM, params, grads, v, params[:0],
                        float(mu), float(c1), 0.0, 0.0, 0.0, 0.0, 0.0, params.size >= current_thresholds()[T_OPT])


# ---------------------------------------------------------------------------------- reductions


@_rjit
def _ssq_loop(x):
    """Sum of squares in float64 (reassociation allowed only here: a vectorised, fixed order)."""
    s = 0.0
    for i in range(x.shape[0]):
        a = np.float64(x[i])
        s += a * a
    return s


@chunked
@_jit
def _ssq(c, x, out):
    lo, hi = flat_bounds(c, x.shape[0], RED_CHUNK)
    out[c] = _ssq_loop(x[lo:hi])


@_jit
def sum_squares_impl(x, parallel):
    """sum(x**2) in float64: partial sums of RED_CHUNK elements, added in order (same bits either way)."""
    xf = x.reshape(x.size)
    nch = n_chunks(xf.size, RED_CHUNK)
    partial = np.empty(nch)
    _ssq(parallel, nch, xf, partial)
    tot = 0.0
    for c in range(nch):
        tot += partial[c]
    return tot


@_rjit
def all_finite_impl(x):
    """True if no element of the 1-D array is NaN or infinite.

    ``x * 0`` is 0 for every finite value and NaN otherwise; summed in the
    array's dtype with reassociation this is one vectorised pass, 4-8x
    cheaper than the float64 sum of squares (the per-step divergence check).
    """
    acc = x.dtype.type(0)
    for i in range(x.shape[0]):
        acc += x[i] * x.dtype.type(0)
    return acc == 0


def sum_squares(x) -> float:
    """``sum(x**2)`` accumulated in float64 (same chunking serial or parallel)."""
    return float(sum_squares_impl(x, x.size >= current_thresholds()[T_SSQ]))


def all_finite(x) -> bool:
    """True if no element of the 1-D array is NaN or infinite (one vectorised pass)."""
    return bool(all_finite_impl(x.reshape(x.size)))
