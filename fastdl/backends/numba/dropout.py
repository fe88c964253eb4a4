"""Inverted dropout with the contract's counter-based generator (bit-identical to the reference).

splitmix64 in explicit uint64 arithmetic (in Numba, mixing uint64 with int64
promotes to float64, so every constant is typed). Each element's bit
depends only on (seed, step, layer, flat index), never on threads or chunks.
"""
from __future__ import annotations

import numpy as np

from ..contract import GOLDEN, MIX_C1, MIX_C2, dropout_key, keep_threshold
from ._cache import jit as _jit
from ._chunks import CHUNK, T_DROPOUT, chunked, current_thresholds, flat_bounds, n_chunks

_U_G = np.uint64(GOLDEN)
_U_C1 = np.uint64(MIX_C1)
_U_C2 = np.uint64(MIX_C2)
_U_S27 = np.uint64(27)
_U_S30 = np.uint64(30)
_U_S31 = np.uint64(31)
_U_S32 = np.uint64(32)


@_jit
def _mix64(x):
    x ^= x >> _U_S30
    x *= _U_C1
    x ^= x >> _U_S27
    x *= _U_C2
    x ^= x >> _U_S31
    return x


@_jit
def key_of(seed, step, layer):
    """contract.dropout_key in uint64 arithmetic (seed, step, layer >= 0)."""
    k = _mix64(np.uint64(seed) + _U_G)
    k = _mix64(k ^ np.uint64(step))
    return _mix64(k ^ np.uint64(layer))


@_jit
def threshold_of(keep_prob):
    """contract.keep_threshold: keep_prob * 2**32 in float64, truncated."""
    return np.uint64(keep_prob * 4294967296.0)


@_jit
def _dropout_fwd_loop(a, base, key, thr, kp, mask, out):
    """Elements base .. base+len(a)-1 (flat, row-major) of the contract's generator (views from 0:
    loops over range(n) of 1-D views let LLVM drop wrap-around checks and vectorise)."""
    zero = out.dtype.type(0)
    one = out.dtype.type(1)
    b1 = np.uint64(base + 1)
    for i in range(a.shape[0]):
        keep = (_mix64(key + (b1 + np.uint64(i)) * _U_G) >> _U_S32) < thr
        mask[i] = np.uint8(1) if keep else np.uint8(0)
        # reference: A * mask / keep_prob, in the array dtype
        out[i] = (a[i] * (one if keep else zero)) / kp


@chunked
@_jit
def _dropout_fwd(c, a, key, thr, kp, mask, out):
    lo, hi = flat_bounds(c, a.shape[0], CHUNK)
    _dropout_fwd_loop(a[lo:hi], lo, key, thr, kp, mask[lo:hi], out[lo:hi])


@_jit
def dropout_forward_impl(A, key, thr, keep_prob, mask, out, parallel):
    a = A.reshape(A.size)
    _dropout_fwd(parallel, n_chunks(a.size, CHUNK), a, key, thr, out.dtype.type(keep_prob), mask.reshape(mask.size),
                 out.reshape(out.size))


def dropout_forward(A, keep_prob: float, seed: int, step: int, layer: int, mask, out) -> None:
    """Counter-based mask (bit-identical to the reference) + apply + 1/keep_prob, one pass."""
    dropout_forward_impl(A, np.uint64(dropout_key(seed, step, layer)), np.uint64(keep_threshold(keep_prob)),
                         float(keep_prob), mask, out, A.size >= current_thresholds()[T_DROPOUT])


@_jit
def _dropout_bwd_loop(d, mask, kp, dA):
    for i in range(d.shape[0]):
        dA[i] = (d[i] * mask[i]) / kp


@chunked
@_jit
def _dropout_bwd(c, d, mask, kp, dA):
    lo, hi = flat_bounds(c, d.shape[0], CHUNK)
    _dropout_bwd_loop(d[lo:hi], mask[lo:hi], kp, dA[lo:hi])


@_jit
def dropout_backward_impl(dout, mask, keep_prob, dA, parallel):
    d = dout.reshape(dout.size)
    _dropout_bwd(parallel, n_chunks(d.size, CHUNK), d, mask.reshape(mask.size), dA.dtype.type(keep_prob),
                 dA.reshape(dA.size))


def dropout_backward(dout, mask, keep_prob: float, dA) -> None:
    """``dA = dout * mask / keep_prob`` (``dA`` may alias ``dout``)."""
    dropout_backward_impl(dout, mask, float(keep_prob), dA, dout.size >= current_thresholds()[T_DROPOUT])
