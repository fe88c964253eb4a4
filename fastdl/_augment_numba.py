"""Compiled warps for :mod:`fastdl.augment` (imported lazily: numba loads on first use).

Bilinear sampling of every image of a batch ``(m, H, W, C)`` at source
coordinates given by a per-image affine map or by per-pixel coordinate
maps. Modes: 0 constant (fill), 1 nearest, 2 reflect (edge repeated),
3 wrap. Integer source coordinates reproduce pixels exactly.
"""
from __future__ import annotations

import math

import numpy as np

# fastdl's own cache directory (never the package's __pycache__): fastdl/backends/numba/_cache.py
from .backends.numba._cache import fastdl_njit


@fastdl_njit(nogil=True, inline="always")
def _index(k, n, mode):
    if 0 <= k < n:
        return k
    if mode == 0:
        return -1
    if mode == 1:
        return 0 if k < 0 else n - 1
    if mode == 2:  # symmetric: ... b a | a b c ... c | c b ...
        period = 2 * n
        k = k % period
        return k if k < n else period - 1 - k
    return k % n


@fastdl_njit(nogil=True, inline="always")
def _sample(X, out, n, i, j, sy, sx, mode, fill):
    H, W, C = X.shape[1], X.shape[2], X.shape[3]
    fy0 = math.floor(sy)
    fx0 = math.floor(sx)
    wy = sy - fy0
    wx = sx - fx0
    iy = int(fy0)
    ix = int(fx0)
    if 0 <= iy and iy + 1 < H and 0 <= ix and ix + 1 < W:  # interior: no index mapping
        for c in range(C):
            top = X[n, iy, ix, c] + wx * (X[n, iy, ix + 1, c] - X[n, iy, ix, c])
            bot = X[n, iy + 1, ix, c] + wx * (X[n, iy + 1, ix + 1, c] - X[n, iy + 1, ix, c])
            out[n, i, j, c] = top + wy * (bot - top)
        return
    y0 = _index(iy, H, mode)
    y1 = _index(iy + 1, H, mode)
    x0 = _index(ix, W, mode)
    x1 = _index(ix + 1, W, mode)
    for c in range(C):
        v00 = X[n, y0, x0, c] if (y0 >= 0 and x0 >= 0) else fill
        v01 = X[n, y0, x1, c] if (y0 >= 0 and x1 >= 0) else fill
        v10 = X[n, y1, x0, c] if (y1 >= 0 and x0 >= 0) else fill
        v11 = X[n, y1, x1, c] if (y1 >= 0 and x1 >= 0) else fill
        # weights that are exactly 0 leave the neighbour out (exact copies for whole-pixel shifts)
        top = v00 if wx == 0.0 else (1.0 - wx) * v00 + wx * v01
        bot = v10 if wx == 0.0 else (1.0 - wx) * v10 + wx * v11
        out[n, i, j, c] = top if wy == 0.0 else (1.0 - wy) * top + wy * bot


@fastdl_njit(nogil=True)
def affine_bilinear(X, M, mode, fill, out):
    """``out[n, i, j] = X[n] sampled at M[n] @ (i, j, 1)``; M has shape (m, 2, 3)."""
    m, H, W = X.shape[0], X.shape[1], X.shape[2]
    for n in range(m):
        a00, a01, a02 = M[n, 0, 0], M[n, 0, 1], M[n, 0, 2]
        a10, a11, a12 = M[n, 1, 0], M[n, 1, 1], M[n, 1, 2]
        for i in range(H):
            for j in range(W):
                _sample(X, out, n, i, j, a00 * i + a01 * j + a02, a10 * i + a11 * j + a12, mode, fill)


@fastdl_njit(nogil=True)
def affine_chain_bilinear(X, codes, P, mode, fill, out):
    """Compose the built-in transforms of each image (codes: 0 shift, 1 rotation; P: (T, m, 3)
    parameters) into one inverse affine map, then sample bilinearly (see ``augment._chain_matrices``)."""
    m, H, W = X.shape[0], X.shape[1], X.shape[2]
    cy = (H - 1) / 2.0
    cx = (W - 1) / 2.0
    for n in range(m):
        a00, a01, a02, a10, a11, a12 = 1.0, 0.0, 0.0, 0.0, 1.0, 0.0
        for t in range(codes.shape[0]):
            if codes[t] == 0:
                nx = 2.0 * P[t, n, 2] + 1.0
                q = math.floor(P[t, n, 0] / nx)
                dy = q - P[t, n, 1]
                dx = P[t, n, 0] - q * nx - P[t, n, 2]
                b00, b01, b02, b10, b11, b12 = 1.0, 0.0, -dy, 0.0, 1.0, -dx
            else:
                th = P[t, n, 0] * (math.pi / 180.0)
                c = math.cos(th)
                s = math.sin(th)
                b00, b01, b02 = c, s, cy - c * cy - s * cx
                b10, b11, b12 = -s, c, cx + s * cy - c * cx
            # A <- A @ B (2x3 affine parts, implicit last row 0 0 1)
            a00, a01, a02, a10, a11, a12 = (a00 * b00 + a01 * b10, a00 * b01 + a01 * b11,
                                            a00 * b02 + a01 * b12 + a02,
                                            a10 * b00 + a11 * b10, a10 * b01 + a11 * b11,
                                            a10 * b02 + a11 * b12 + a12)
        for i in range(H):
            for j in range(W):
                _sample(X, out, n, i, j, a00 * i + a01 * j + a02, a10 * i + a11 * j + a12, mode, fill)


@fastdl_njit(nogil=True)
def map_bilinear(X, SY, SX, mode, fill, out):
    """``out[n, i, j] = X[n] sampled at (SY[n, i, j], SX[n, i, j])``."""
    m, H, W = X.shape[0], X.shape[1], X.shape[2]
    for n in range(m):
        for i in range(H):
            for j in range(W):
                _sample(X, out, n, i, j, SY[n, i, j], SX[n, i, j], mode, fill)


def warm_up() -> None:
    """Compile (or load from the cache) the float32 and float64 versions."""
    for dt in (np.float32, np.float64):
        X = np.zeros((1, 2, 2, 1), dt)
        M = np.zeros((1, 2, 3))
        affine_bilinear(X, M, 0, 0.0, np.empty_like(X))
        S = np.zeros((1, 2, 2))
        map_bilinear(X, S, S, 0, 0.0, np.empty_like(X))
        affine_chain_bilinear(X, np.zeros(1, np.int64), np.zeros((1, 1, 3)), 0, 0.0, np.empty_like(X))
