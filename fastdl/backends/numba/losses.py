"""Losses (mean over rows, float64) with their gradients, and the inference softmax.

Per-example weights (scikit-learn's rule, docs/spec.md): every loss takes a
trailing ``w``, float64 ``(m,)`` or empty (unweighted: exactly the
unweighted numbers). With weights, ``sw = sum(w)`` added left to right from
0.0, ``loss = sum_i(w_i L_i) / sw`` and ``dZ_i = (w_i / sw) * g_i`` with
``g_i`` the row's gradient for m = 1.
"""
from __future__ import annotations

import numpy as np

from ._cache import jit as _jit, rjit as _rjit
from ._chunks import T_SOFTMAX, chunked, current_thresholds, n_chunks, part_lo, parts, rows_per_chunk
from ._math import _exp64, _exp_dt, _log1p_unit, _log64, _max64, _sum64


@_jit
def weight_sum(w):
    """sum(w) left to right from 0.0 in float64 (the order every executor uses)."""
    s = 0.0
    for i in range(w.shape[0]):
        s += w[i]
    return s


@_jit
def _sce_rows(Z, y, dZ, do_grad, w, sw, r0, r1, buf, ssum, shift):
    """Sum over rows [r0, r1) of (w_i *) (logsumexp(z) - z_y); dZ rows if do_grad.

    Returns (loss_sum, number_of_bad_labels); a row with a bad label is
    skipped (the wrapper raises). One exp per element, in the array's
    precision: the row's exp(z - max) is kept in ``buf`` and reused for dZ.
    The row sums go to ``ssum`` and ``max - z_y`` to ``shift`` (float64), and
    their logs are taken afterwards in one vectorised loop.
    """
    m, k = Z.shape
    mf = np.float64(m)
    weighted = w.shape[0] != 0
    bad = 0
    for i in range(r0, r1):
        yi = np.int64(y[i])          # int64 already; the cast lets the epoch executor type its other-loss branches
        if yi < 0 or yi >= k:
            bad += 1
            ssum[i] = 1.0
            shift[i] = 0.0
            continue
        zr = Z[i]
        if k <= 16:
            # rows this short are reduced inline: a call to the vectorised
            # helpers (array arguments, refcounts) costs more than the row
            mxt = buf.dtype.type(-np.inf)
            for j in range(k):
                v = zr[j]
                mxt = v if v > mxt else mxt
            mx = np.float64(mxt)
        else:
            mx = _max64(zr)
            mxt = buf.dtype.type(mx)
        for j in range(k):
            buf[j] = _exp_dt(zr[j] - mxt)        # a NaN in the row makes s NaN: all NaN
        if k <= 16:
            s = 0.0
            for j in range(k):
                s += np.float64(buf[j])
        else:
            s = _sum64(buf)
        ssum[i] = s
        shift[i] = mx - np.float64(zr[yi])
        if do_grad:
            q = 1.0 / s
            dzr = dZ[i]
            if weighted:
                cw = w[i] / sw if sw != 0.0 else 0.0
                for j in range(k):
                    dzr[j] = (np.float64(buf[j]) * q) * cw
                dzr[yi] = (np.float64(buf[yi]) * q - 1.0) * cw
            else:
                qm = q / mf
                for j in range(k):
                    dzr[j] = np.float64(buf[j]) * qm
                dzr[yi] = (np.float64(buf[yi]) * q - 1.0) / mf
    loss = 0.0
    if weighted:
        for i in range(r0, r1):
            loss += w[i] * (_log64(ssum[i]) + shift[i])
    else:
        for i in range(r0, r1):
            loss += _log64(ssum[i]) + shift[i]
    return loss, bad


@chunked
@_jit
def _sce(c, P, Z, y, dZ, do_grad, w, sw, bufs, ssum, shift, losses, bads):
    m = Z.shape[0]
    lo, bd = _sce_rows(Z, y, dZ, do_grad, w, sw, part_lo(m, P, c), part_lo(m, P, c + 1), bufs[c], ssum, shift)
    losses[c] = lo
    bads[c] = bd


@_jit
def softmax_cross_entropy_impl(Z, y, dZ, w, parallel):
    """(summed loss / m or / sum(w), number of bad labels); the row partition depends on m only."""
    m, k = Z.shape
    P = parts(m)
    sw = weight_sum(w) if w.shape[0] != 0 else np.float64(m)
    losses = np.zeros(P)
    bads = np.zeros(P, dtype=np.int64)
    _sce(parallel and P > 1, P, P, Z, y, dZ, dZ.size != 0, w, sw, np.empty((P, k), dtype=Z.dtype),
         np.empty(m), np.empty(m), losses, bads)
    tot = 0.0
    nb = 0
    for p in range(P):
        tot += losses[p]
        nb += bads[p]
    if w.shape[0] != 0 and sw == 0.0:     # weights summing to 0: the batch contributes nothing
        return 0.0, nb
    return tot / sw, nb


def _label_error(y, k):
    bad = y[(y < 0) | (y >= k)]
    return ValueError(f"softmax_cross_entropy: labels must be class ids in [0, {k}); got {bad[:5].tolist()}"
                      f"{' ...' if bad.size > 5 else ''} ({bad.size} out of range)")


_NO_W = np.empty(0)


def softmax_cross_entropy(Z, y, dZ, w=None) -> float:
    """Mean of ``logsumexp(z) - z_y`` (float64); ``dZ = (softmax(Z) - onehot(y)) / m`` unless empty."""
    if w is None:
        w = _NO_W
    m, k = Z.shape
    if m == 0:
        return float("nan")
    loss, bad = softmax_cross_entropy_impl(Z, y, dZ, w, Z.size >= current_thresholds()[T_SOFTMAX])
    if bad:
        raise _label_error(y, k)
    return loss


@_jit
def _softmax_rows(Z, out, r0, r1, buf):
    k = Z.shape[1]
    for i in range(r0, r1):
        zr = Z[i]
        mxt = buf.dtype.type(_max64(zr))
        for j in range(k):
            buf[j] = _exp_dt(zr[j] - mxt)      # in the array's precision, like the reference
        q = out.dtype.type(1.0 / _sum64(buf))
        orow = out[i]                          # written after Z's row is read: out may alias Z
        for j in range(k):
            orow[j] = buf[j] * q


@chunked
@_jit
def _softmax(c, rpc, Z, out):
    _softmax_rows(Z, out, c * rpc, min(Z.shape[0], (c + 1) * rpc), np.empty(Z.shape[1], dtype=Z.dtype))


@_jit
def softmax_impl(Z, out, parallel):
    m, k = Z.shape
    rpc = max(1, min(m // 2, rows_per_chunk(m, k)))
    _softmax(parallel, n_chunks(m, rpc), rpc, Z, out)


def softmax(Z, out) -> None:
    """Row-wise max-shifted softmax (``exp`` in the array dtype, the row sum in float64)."""
    softmax_impl(Z, out, Z.size >= current_thresholds()[T_SOFTMAX] and Z.shape[0] >= 2)


@_jit
def sigmoid_bce_impl(Z, y, dZ, w):
    """Summed over the k outputs of a row, mean over rows (k = 1: one binary output).

    ``y`` holds the 0/1 targets of the m*k elements ((m,) or (m, k)).
    """
    m = Z.shape[0]
    mf = np.float64(m)
    weighted = w.shape[0] != 0
    sw = weight_sum(w) if weighted else mf
    z = Z.reshape(Z.size)                 # C-contiguous -> flat view
    t_all = y.reshape(y.size)
    k = Z.shape[1] if Z.ndim == 2 else 1
    do_grad = dZ.size != 0
    dz = dZ.reshape(dZ.size)
    terms = np.empty(z.shape[0])
    for e in range(z.shape[0]):
        zi = np.float64(z[e])
        t = np.float64(t_all[e])
        ex = _exp64(-abs(zi))
        zp = 0.0 if zi < 0.0 else zi      # np.maximum(z, 0): NaN stays NaN
        term = zp - zi * t + _log1p_unit(ex)
        terms[e] = w[e // k] * term if weighted else term
        if do_grad:
            # sigmoid(z) from the same exp, as reference._apply_activation computes it
            p = 1.0 / (1.0 + ex) if zi >= 0 else ex / (1.0 + ex)
            if weighted:
                dz[e] = (p - t) * (w[e // k] / sw) if sw != 0.0 else 0.0
            else:
                dz[e] = (p - t) / mf
    if weighted and sw == 0.0:
        return 0.0
    return _sum64(terms) / sw


def sigmoid_bce(Z, y, dZ, w=None) -> float:
    """Stable fused sigmoid + binary cross-entropy (mean over rows); ``dZ = (sigmoid(z) - y)/m``."""
    if w is None:
        w = _NO_W
    return sigmoid_bce_impl(Z, y, dZ, w)


@_rjit
def _sqdiff_sum(a, b):
    """sum((a - b)**2) in float64 over flat arrays (reassociation: vectorised, fixed order)."""
    s = 0.0
    for i in range(a.shape[0]):
        d = np.float64(a[i]) - np.float64(b[i])
        s += d * d
    return s


@_jit
def mse_impl(Yhat, Y, dZ, w):
    """``Y``: the targets, (m, k) or flat (m*k,)."""
    m = Yhat.shape[0]
    mf = np.float64(m)
    if w.shape[0] != 0:
        sw = weight_sum(w)
        tot = 0.0
        k = Yhat.shape[1]
        yf = Y.reshape(Y.size)
        for r in range(m):
            a = Yhat[r]
            b = yf[r * k:(r + 1) * k]
            tot += w[r] * _sqdiff_sum(a, b)
            if dZ.size != 0:
                dzr = dZ[r]
                cw = w[r] / sw if sw != 0.0 else 0.0
                for j in range(a.shape[0]):
                    dzr[j] = (np.float64(a[j]) - np.float64(b[j])) * cw
        return 0.5 * tot / sw if sw != 0.0 else 0.0
    a = Yhat.reshape(Yhat.size)
    b = Y.reshape(Y.size)
    if dZ.size != 0:
        dz = dZ.reshape(dZ.size)
        inv_m = 1.0 / mf                          # (yhat - y)/m to within an ulp, without a divide
        for i in range(a.shape[0]):
            dz[i] = (np.float64(a[i]) - np.float64(b[i])) * inv_m
    return 0.5 * _sqdiff_sum(a, b) / mf


def mse(Yhat, Y, dZ, w=None) -> float:
    """``0.5*||yhat - y||^2`` averaged over rows; ``dZ = (yhat - y)/m``."""
    if w is None:
        w = _NO_W
    return mse_impl(Yhat, Y, dZ, w)


@_jit
def poisson_impl(Z, Y, dZ, w):
    """Half Poisson deviance (log link) summed over the k outputs of a row, mean over rows.

    ``Y`` holds the m*k targets ((m, k) or flat), finite and >= 0 (validated by the
    callers). Per element in float64: ``(exp(z) - y*z) + (xlogy(y, y) - y)`` and
    ``dZ = (exp(z) - y) / m`` (weighted: ``* w_i / sw``); ``exp`` overflows to inf.
    """
    m = Z.shape[0]
    k = Z.shape[1]
    mf = np.float64(m)
    weighted = w.shape[0] != 0
    sw = weight_sum(w) if weighted else mf
    z = Z.reshape(Z.size)                 # C-contiguous -> flat view
    t_all = Y.reshape(Y.size)
    do_grad = dZ.size != 0
    dz = dZ.reshape(dZ.size)
    rows = np.empty(m)
    for r in range(m):
        acc = 0.0
        cw = 0.0
        if weighted and sw != 0.0:
            cw = w[r] / sw
        for e in range(r * k, r * k + k):
            zi = np.float64(z[e])
            t = np.float64(t_all[e])
            mu = _exp64(zi)
            c = t * np.log(t) if t > 0.0 else 0.0
            acc += (mu - t * zi) + (c - t)
            if do_grad:
                dz[e] = (mu - t) * cw if weighted else (mu - t) / mf
        rows[r] = w[r] * acc if weighted else acc
    if weighted and sw == 0.0:
        return 0.0
    return _sum64(rows) / sw


def poisson(Z, Y, dZ, w=None) -> float:
    """Mean over rows of the half Poisson deviance (log link) summed over outputs; ``dZ = (exp(Z) - Y)/m``."""
    if w is None:
        w = _NO_W
    return poisson_impl(Z, Y, dZ, w)
