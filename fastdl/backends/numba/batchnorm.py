"""BatchNorm: training forward (batch statistics + running update), inference, backward.

Statistics: float64, on data shifted by its first row K (robust to a large
common offset). Rows are swept 8 at a time: the shifted sum and sum of
squares of those 8 rows are formed in registers and added to per-feature
accumulators once per sweep. Each tile of _BN_TILE_ROWS rows gives a mean
and M2 = q - s*s/nb; tiles, then the P row parts (shape-only), are merged
in order with Chan's formula, so serial and parallel runs give the same
bits. Shifting by a row of the data bounds the cancellation in q - s*s/nb:
sum((z - K)^2) <= (m + 1) * M2, i.e. at most log2(m + 1) bits of the
float64 result, far below float32 resolution and the float64 tests' 1e-12.
Backward sums: float64 sum(dy) and sum(dy * (z - mean)) (z - mean is exact
in float64, the product rounded once), scaled by inv_std once per feature;
same 8-row sweeps.
The element-wise passes (out, dZ) run in the array dtype with per-feature
coefficients computed in float64 and rounded once; the mean is subtracted as
the float32 ``mean`` plus a correction folded into the constant term, so a
large common offset cancels exactly (Sterbenz): out and dZ are within about
2 float32 ulp of the magnitude of their terms, whatever the offset.
Column blocking was tried and lost everywhere (rows 2^k bytes apart map onto
a few L2 sets; short row segments defeat the prefetchers).
"""
from __future__ import annotations

import numpy as np

from ._cache import jit as _jit
from ._chunks import T_BN, T_BN_INFER, chunked, current_thresholds, n_chunks, part_lo, parts, rows_per_chunk, scratch
from ._math import _as_dtype_of

_BN_TILE_ROWS = 64      # rows per Chan tile (the merge costs ~10 flops per feature per tile)


@_jit
def _bn_tile_sums(Z, K, r0, r1, s, q):
    """s = sum(Z - K), q = sum((Z - K)^2) over rows [r0, r1), float64."""
    n = Z.shape[1]
    for j in range(n):
        s[j] = 0.0
        q[j] = 0.0
    i = r0
    while i + 8 <= r1:
        z0 = Z[i]
        z1 = Z[i + 1]
        z2 = Z[i + 2]
        z3 = Z[i + 3]
        z4 = Z[i + 4]
        z5 = Z[i + 5]
        z6 = Z[i + 6]
        z7 = Z[i + 7]
        for j in range(n):
            k = K[j]
            d0 = z0[j] - k
            d1 = z1[j] - k
            d2 = z2[j] - k
            d3 = z3[j] - k
            d4 = z4[j] - k
            d5 = z5[j] - k
            d6 = z6[j] - k
            d7 = z7[j] - k
            s[j] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            q[j] += ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7))
        i += 8
    while i < r1:
        z0 = Z[i]
        for j in range(n):
            d0 = z0[j] - K[j]
            s[j] += d0
            q[j] += d0 * d0
        i += 1


@_jit
def _bn_stats_part(Z, K, r0, r1, pmean, pm2, s, q):
    """Shifted mean and M2 of rows [r0, r1) into pmean, pm2: Chan-merged tiles of _BN_TILE_ROWS rows."""
    n = Z.shape[1]
    cnt = 0
    for t0 in range(r0, r1, _BN_TILE_ROWS):
        t1 = min(t0 + _BN_TILE_ROWS, r1)
        nb = t1 - t0
        _bn_tile_sums(Z, K, t0, t1, s, q)
        if cnt == 0:
            for j in range(n):
                mb = s[j] / nb
                pmean[j] = mb
                pm2[j] = q[j] - s[j] * mb
        else:
            tot = cnt + nb
            wa = cnt * nb / tot
            fb = nb / tot
            for j in range(n):
                mb = s[j] / nb
                delta = mb - pmean[j]
                pmean[j] += delta * fb
                pm2[j] += (q[j] - s[j] * mb) + delta * delta * wa
        cnt += nb


@_jit
def _bn_merge(pmean, pm2, K, m, mu, var):
    """Merge per-part statistics in part order; undo the shift; var = M2 / m."""
    P, n = pmean.shape
    for j in range(n):
        mu[j] = pmean[0, j]
        var[j] = pm2[0, j]
    cnt = part_lo(m, P, 1)
    for p in range(1, P):
        nb = part_lo(m, P, p + 1) - part_lo(m, P, p)
        tot = cnt + nb
        wa = cnt * nb / tot
        fb = nb / tot
        pmr = pmean[p]
        pm2r = pm2[p]
        for j in range(n):
            delta = pmr[j] - mu[j]
            mu[j] += delta * fb
            var[j] += pm2r[j] + delta * delta * wa
        cnt = tot
    for j in range(n):
        # max(): the rounding of q - s*s/nb can leave a tiny negative M2 on a constant feature
        var[j] = max(var[j] / cnt, 0.0)
        mu[j] += K[j]


@_jit
def _bn_finish_stats(gamma, beta, eps, momentum, running_mean, running_var, mean, inv_std, mu, var, a, c):
    """Write mean, inv_std and the running statistics; the output pass's coefficients a, c.

    Several short loops over few arrays each, so that every one vectorises
    (the sqrt and the division included). Overwrites var with float64 inv_std.
    """
    n = mu.shape[0]
    mom = running_mean.dtype.type(momentum)
    omm = 1.0 - momentum
    for j in range(n):
        # reference: momentum * running (array dtype) + (1 - momentum) * batch (float64)
        running_mean[j] = np.float64(mom * running_mean[j]) + omm * mu[j]
        running_var[j] = np.float64(mom * running_var[j]) + omm * var[j]
    for j in range(n):
        var[j] = 1.0 / np.sqrt(var[j] + eps)
    for j in range(n):
        mean[j] = mu[j]
        inv_std[j] = var[j]
    for j in range(n):
        # out = (z - mean) * a + c with mean the rounded mu: c = beta - (mu - mean) * a
        a64 = np.float64(gamma[j]) * var[j]
        a[j] = a64
        c[j] = beta[j] - (mu[j] - np.float64(mean[j])) * a64


@_jit
def _bn_out_rows(Z, mean, a, c, out, r0, r1):
    """out = (Z - mean) * a + c on rows [r0, r1), in the array dtype; 4 rows per sweep."""
    n = Z.shape[1]
    i = r0
    while i + 4 <= r1:
        z0 = Z[i]
        z1 = Z[i + 1]
        z2 = Z[i + 2]
        z3 = Z[i + 3]
        o0 = out[i]
        o1 = out[i + 1]
        o2 = out[i + 2]
        o3 = out[i + 3]
        for j in range(n):
            # all loads before the stores: with a row stride that is a multiple of 2 KiB, a store
            # to out row i followed by a load from Z row i+2 at the same column stalls (4K aliasing)
            x0 = z0[j]
            x1 = z1[j]
            x2 = z2[j]
            x3 = z3[j]
            h = mean[j]
            g = a[j]
            b = c[j]
            o0[j] = (x0 - h) * g + b
            o1[j] = (x1 - h) * g + b
            o2[j] = (x2 - h) * g + b
            o3[j] = (x3 - h) * g + b
        i += 4
    while i < r1:
        z0 = Z[i]
        o0 = out[i]
        for j in range(n):
            o0[j] = (z0[j] - mean[j]) * a[j] + c[j]
        i += 1



def bn_train_scratch_size(n: int, P: int) -> int:
    """float64 scratch elements of the BatchNorm training forward."""
    return n * (5 + 4 * P)


def bn_backward_scratch_size(n: int, P: int) -> int:
    """float64 scratch elements of the BatchNorm backward."""
    return n * (3 + 2 * P)


@_jit
def _bn_train_views(scratch, Z, P):
    """The forward's work arrays, carved from ``scratch`` (bn_train_scratch_size): K, per-part
    mean and M2, per-part tile sums, mu, var (float64), and a, c in Z's dtype."""
    n = Z.shape[1]
    K = scratch[:n]
    pmean = scratch[n:n + P * n].reshape((P, n))
    pm2 = scratch[n + P * n:n + 2 * P * n].reshape((P, n))
    ts = scratch[n + 2 * P * n:n + 3 * P * n].reshape((P, n))
    tq = scratch[n + 3 * P * n:n + 4 * P * n].reshape((P, n))
    r = scratch[n + 4 * P * n:]
    a = _as_dtype_of(r[2 * n:3 * n], Z)[:n]
    c = _as_dtype_of(r[3 * n:4 * n], Z)[:n]
    return K, pmean, pm2, ts, tq, r[:n], r[n:2 * n], a, c


@_jit
def _bn_shift(Z, K):
    z0 = Z[0]
    for j in range(K.shape[0]):
        K[j] = z0[j]
    return K



@chunked
@_jit
def _bn_stats(c, P, Z, K, pmean, pm2, ts, tq):
    m = Z.shape[0]
    _bn_stats_part(Z, K, part_lo(m, P, c), part_lo(m, P, c + 1), pmean[c], pm2[c], ts[c], tq[c])


@chunked
@_jit
def _bn_out(c, rpc, Z, mean, a, cc, out):
    _bn_out_rows(Z, mean, a, cc, out, c * rpc, min(Z.shape[0], (c + 1) * rpc))


@_jit
def batchnorm_train_impl(Z, gamma, beta, eps, momentum, running_mean, running_var, mean, inv_std, out,
                         P, scratch, parallel):
    """The training forward on ``scratch`` (bn_train_scratch_size(n, P) float64 elements)."""
    m, n = Z.shape
    K, pmean, pm2, ts, tq, mu, var, a, c = _bn_train_views(scratch, Z, P)
    _bn_shift(Z, K)
    _bn_stats(parallel, P, P, Z, K, pmean, pm2, ts, tq)
    _bn_merge(pmean, pm2, K, m, mu, var)
    _bn_finish_stats(gamma, beta, eps, momentum, running_mean, running_var, mean, inv_std, mu, var, a, c)
    rpc = rows_per_chunk(m, n)
    _bn_out(parallel, n_chunks(m, rpc), rpc, Z, mean, a, c, out)


def batchnorm_forward_train(Z, gamma, beta, eps: float, momentum: float,
                            running_mean, running_var, mean, inv_std, out) -> None:
    """Batch statistics (float64, shifted, Chan-merged tiles), running update, normalised output."""
    m, n = Z.shape
    if m == 0:
        raise ValueError("batchnorm_forward_train: empty batch (Z has 0 rows); batch statistics are undefined")
    P = parts(m)
    batchnorm_train_impl(Z, gamma, beta, float(eps), float(momentum), running_mean, running_var, mean, inv_std,
                         out, P, scratch(bn_train_scratch_size(n, P)), Z.size >= current_thresholds()[T_BN])


@_jit
def _bn_infer_rows(Z, gamma, beta, rm, sd, out, r0, r1):
    n = Z.shape[1]
    for i in range(r0, r1):
        zr = Z[i]
        orow = out[i]
        for j in range(n):
            # reference order: gamma * (Z - running_mean) / sqrt(running_var + eps) + beta
            orow[j] = gamma[j] * (zr[j] - rm[j]) / sd[j] + beta[j]


@_jit
def _bn_sd(running_var, eps):
    e = running_var.dtype.type(eps)
    sd = np.empty_like(running_var)
    for j in range(running_var.shape[0]):
        sd[j] = np.sqrt(running_var[j] + e)
    return sd



@chunked
@_jit
def _bn_infer(c, rpc, Z, gamma, beta, rm, sd, out):
    _bn_infer_rows(Z, gamma, beta, rm, sd, out, c * rpc, min(Z.shape[0], (c + 1) * rpc))


@_jit
def batchnorm_infer_impl(Z, gamma, beta, running_mean, running_var, eps, out, parallel):
    m, n = Z.shape
    rpc = rows_per_chunk(m, n)
    _bn_infer(parallel, n_chunks(m, rpc), rpc, Z, gamma, beta, running_mean, _bn_sd(running_var, eps), out)


def batchnorm_forward_infer(Z, gamma, beta, running_mean, running_var, eps: float, out) -> None:
    """``out = gamma*(Z - running_mean)/sqrt(running_var + eps) + beta``."""
    batchnorm_infer_impl(Z, gamma, beta, running_mean, running_var, float(eps), out,
                         Z.size >= current_thresholds()[T_BN_INFER])


@_jit
def _bn_bwd_part(Z, mean, dout, r0, r1, pdg, pdb):
    """pdb = sum(dy), pdg = sum(dy * (z - mean)) over rows [r0, r1), float64; 8 rows per sweep."""
    n = Z.shape[1]
    for j in range(n):
        pdg[j] = 0.0
        pdb[j] = 0.0
    i = r0
    while i + 8 <= r1:
        z0 = Z[i]
        z1 = Z[i + 1]
        z2 = Z[i + 2]
        z3 = Z[i + 3]
        z4 = Z[i + 4]
        z5 = Z[i + 5]
        z6 = Z[i + 6]
        z7 = Z[i + 7]
        e0 = dout[i]
        e1 = dout[i + 1]
        e2 = dout[i + 2]
        e3 = dout[i + 3]
        e4 = dout[i + 4]
        e5 = dout[i + 5]
        e6 = dout[i + 6]
        e7 = dout[i + 7]
        for j in range(n):
            u = np.float64(mean[j])
            y0 = np.float64(e0[j])
            y1 = np.float64(e1[j])
            y2 = np.float64(e2[j])
            y3 = np.float64(e3[j])
            y4 = np.float64(e4[j])
            y5 = np.float64(e5[j])
            y6 = np.float64(e6[j])
            y7 = np.float64(e7[j])
            pdb[j] += ((y0 + y1) + (y2 + y3)) + ((y4 + y5) + (y6 + y7))
            pdg[j] += (((y0 * (z0[j] - u) + y1 * (z1[j] - u)) + (y2 * (z2[j] - u) + y3 * (z3[j] - u)))
                       + ((y4 * (z4[j] - u) + y5 * (z5[j] - u)) + (y6 * (z6[j] - u) + y7 * (z7[j] - u))))
        i += 8
    while i < r1:
        z0 = Z[i]
        e0 = dout[i]
        for j in range(n):
            y0 = np.float64(e0[j])
            pdb[j] += y0
            pdg[j] += y0 * (z0[j] - np.float64(mean[j]))
        i += 1


@_jit
def _bn_bwd_merge(pdg, pdb, gamma, inv_std, m, dgamma, dbeta, A, B, C):
    """Merge the part sums in part order (into part 0); dgamma, dbeta and the dZ coefficients.
    Short loops over few arrays each, so that every one vectorises."""
    P, n = pdg.shape
    dg = pdg[0]
    db = pdb[0]
    for p in range(1, P):
        pgr = pdg[p]
        pbr = pdb[p]
        for j in range(n):
            dg[j] += pgr[j]
            db[j] += pbr[j]
    for j in range(n):
        dg[j] *= np.float64(inv_std[j])       # sum(dy * (z - mean)) * inv_std = sum(dy * x_hat)
    for j in range(n):
        dgamma[j] = dg[j]
        dbeta[j] = db[j]
    mt = gamma.dtype.type(m)
    for j in range(n):
        # reference: c = gamma * inv_std / m in the array dtype; dZ = c * (m*dy - dbeta - x_hat*dgamma)
        cf = np.float64((gamma[j] * inv_std[j]) / mt)
        A[j] = cf * m
        B[j] = cf * dg[j] * np.float64(inv_std[j])
        C[j] = cf * db[j]


@_jit
def _bn_bwd_rows(Z, mean, dout, dZ, A, B, C, r0, r1):
    """dZ = A*dy - B*(z - mean) - C on rows [r0, r1), in the array dtype; 4 rows per sweep.
    Each dout element is read before the dZ element (which may alias it) is written."""
    n = Z.shape[1]
    i = r0
    while i + 4 <= r1:
        z0 = Z[i]
        z1 = Z[i + 1]
        z2 = Z[i + 2]
        z3 = Z[i + 3]
        e0 = dout[i]
        e1 = dout[i + 1]
        e2 = dout[i + 2]
        e3 = dout[i + 3]
        o0 = dZ[i]
        o1 = dZ[i + 1]
        o2 = dZ[i + 2]
        o3 = dZ[i + 3]
        for j in range(n):
            # all loads before the stores (4K aliasing, see _bn_out_rows)
            x0 = z0[j] - mean[j]
            x1 = z1[j] - mean[j]
            x2 = z2[j] - mean[j]
            x3 = z3[j] - mean[j]
            y0 = e0[j]
            y1 = e1[j]
            y2 = e2[j]
            y3 = e3[j]
            a = A[j]
            b = B[j]
            c = C[j]
            o0[j] = (a * y0 - b * x0) - c
            o1[j] = (a * y1 - b * x1) - c
            o2[j] = (a * y2 - b * x2) - c
            o3[j] = (a * y3 - b * x3) - c
        i += 4
    while i < r1:
        z0 = Z[i]
        e0 = dout[i]
        o0 = dZ[i]
        for j in range(n):
            o0[j] = (A[j] * e0[j] - B[j] * (z0[j] - mean[j])) - C[j]
        i += 1


@_jit
def _bn_bwd_views(scratch, Z, P):
    """The backward's work arrays, carved from ``scratch`` (bn_backward_scratch_size): per-part
    sums (float64) and the dZ coefficients A, B, C in Z's dtype."""
    n = Z.shape[1]
    pdg = scratch[:P * n].reshape((P, n))
    pdb = scratch[P * n:2 * P * n].reshape((P, n))
    r = scratch[2 * P * n:]
    return (pdg, pdb, _as_dtype_of(r[:n], Z)[:n], _as_dtype_of(r[n:2 * n], Z)[:n],
            _as_dtype_of(r[2 * n:3 * n], Z)[:n])



@chunked
@_jit
def _bn_bwd_sums(c, P, Z, mean, dout, pdg, pdb):
    m = Z.shape[0]
    _bn_bwd_part(Z, mean, dout, part_lo(m, P, c), part_lo(m, P, c + 1), pdg[c], pdb[c])


@chunked
@_jit
def _bn_bwd_dz(c, rpc, Z, mean, dout, dZ, A, B, C):
    _bn_bwd_rows(Z, mean, dout, dZ, A, B, C, c * rpc, min(Z.shape[0], (c + 1) * rpc))


@_jit
def batchnorm_backward_impl(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta, P, scratch, parallel):
    """The backward on ``scratch`` (bn_backward_scratch_size(n, P) float64 elements)."""
    m, n = Z.shape
    pdg, pdb, A, B, C = _bn_bwd_views(scratch, Z, P)
    _bn_bwd_sums(parallel, P, P, Z, mean, dout, pdg, pdb)
    _bn_bwd_merge(pdg, pdb, gamma, inv_std, m, dgamma, dbeta, A, B, C)
    rpc = rows_per_chunk(m, n)
    _bn_bwd_dz(parallel, n_chunks(m, rpc), rpc, Z, mean, dout, dZ, A, B, C)


def batchnorm_backward(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta) -> None:
    """Two passes: per-feature sums (float64), then ``dZ`` (may alias ``dout``)."""
    m, n = Z.shape
    if m == 0:
        raise ValueError("batchnorm_backward: empty batch (Z has 0 rows)")
    P = parts(m)
    batchnorm_backward_impl(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta, P,
                            scratch(bn_backward_scratch_size(n, P)), Z.size >= current_thresholds()[T_BN])
