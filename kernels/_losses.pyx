# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Output losses (mean over the m rows, no L2 term) and softmax.

* softmax / softmax-CE: rows in blocks that fit in L1 (``TILE`` elements).
  Per row the max and the shifted exponentials, written to the output
  (``dZ`` or a scratch tile) by one vectorised loop (float32: the exp of
  ``_kernel_common``; float64: libm); rows shorter than 64 get their shifted
  logits written first and ONE exp loop over the whole block, so that rows
  of 10 classes run at vector speed too. Then per row the float64 sum, the
  loss ``max + log(sum) - z_y`` (float64) and one scaling pass; the label's
  entry ``p_y - 1`` is formed in float64.
* sigmoid-BCE: float32 in float32 arithmetic with the vectorised exp and
  log1p; float64 with libm.
* MSE: squared differences summed in float64 over fixed blocks of elements.

Per-row losses / per-block partials go to a float64 buffer summed in a fixed
order, so results do not depend on the number of threads. Rows / blocks run
in parallel above a size threshold.
"""
cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport exp, fabs, fabsf, log, log1p
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc

from _kernel_common cimport (data, dim, fastdl_expf, fastdl_log1pf, fastdl_max_threads, fastdl_reluf, fastdl_self,
                             is_empty, is_float, is_int64, nthreads, r_exp, real, real2, row_max, row_sum, rtype,
                             tc_double, tc_void, wtype)

from fastdl.backends import reference as _ref

cnp.import_array()

cdef enum:
    TILE = 4096          # elements per block of softmax rows (16 KB of float32)
    # work per thread below which a kernel runs serially (_kernel_common.pxd)
    GRAIN_EXP = 131072   # exponentials, softmax(-CE)
    GRAIN_ROWS = 65536   # rows, sigmoid-BCE
    GRAIN_MSE = 524288   # elements, MSE (memory bound)
    BLOCK = 16384        # MSE partial-sum block


# ------------------------------------------------------------------ bodies

cdef inline void shifted_exp(const real* Z, real* E, real* zmax, Py_ssize_t nrows, Py_ssize_t k) noexcept nogil:
    """``E[r, :] = exp(Z[r, :] - max(Z[r, :]))`` for ``nrows`` rows; ``E`` may alias ``Z``."""
    cdef Py_ssize_t r, j, n = nrows * k
    cdef const real* z
    cdef real* e
    cdef real mx
    if k >= 64:                     # long rows: one fused, vectorised loop per row
        for r in range(nrows):
            z = Z + r * k
            e = E + r * k
            mx = row_max(z, k)
            zmax[r] = mx
            for j in range(k):
                e[j] = r_exp(z[j] - mx)
        return
    for r in range(nrows):          # short rows: shift row by row, then one exp loop over the block
        z = Z + r * k
        e = E + r * k
        mx = row_max(z, k)
        zmax[r] = mx
        for j in range(k):
            e[j] = z[j] - mx
    for j in range(n):
        E[j] = r_exp(E[j])


cdef tc_void sce_rows(const real* Z, const int64_t* y, real* dZ, bint grad, Py_ssize_t r0, Py_ssize_t r1,
                      Py_ssize_t k, double inv_m, double* row_loss, real* scratch) noexcept nogil:
    """Rows [r0, r1): losses into row_loss, and dZ when ``grad`` (else ``scratch`` holds the exps)."""
    cdef real zmax[TILE]
    cdef Py_ssize_t rows_per = TILE // k if k <= TILE else 1
    cdef Py_ssize_t b0, nb, r, j, yi
    cdef real* E
    cdef real* e
    cdef real c, ey
    cdef double s
    b0 = r0
    while b0 < r1:
        nb = r1 - b0 if r1 - b0 < rows_per else rows_per
        E = dZ + b0 * k if grad else scratch
        shifted_exp(Z + b0 * k, E, zmax, nb, k)
        for r in range(nb):
            e = E + r * k
            yi = y[b0 + r]
            s = row_sum(e, k)
            row_loss[b0 + r] = (<double>zmax[r] + log(s)) - <double>Z[(b0 + r) * k + yi]
            if grad:
                ey = e[yi]
                c = <real>(inv_m / s)
                for j in range(k):
                    e[j] = e[j] * c
                e[yi] = <real>((ey / s - 1.0) * inv_m)       # p_y - 1 formed in float64
        b0 += nb


cdef tc_void softmax_rows(const real* Z, real* out, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t k) noexcept nogil:
    cdef real zmax[TILE]
    cdef Py_ssize_t rows_per = TILE // k if k <= TILE else 1
    cdef Py_ssize_t b0, nb, r, j
    cdef real* e
    cdef real c
    b0 = r0
    while b0 < r1:
        nb = r1 - b0 if r1 - b0 < rows_per else rows_per
        shifted_exp(Z + b0 * k, out + b0 * k, zmax, nb, k)
        for r in range(nb):
            e = out + (b0 + r) * k
            c = <real>(1.0 / row_sum(e, k))
            for j in range(k):
                e[j] = e[j] * c
        b0 += nb


cdef tc_void bce_rows(const real* Z, const real2* y, real* dZ, bint grad, Py_ssize_t r0, Py_ssize_t r1,
                      double m, double* row_loss) noexcept nogil:
    """Per-row ``max(z,0) - z*t + log1p(exp(-|z|))`` and ``dZ = (sigmoid(z) - t) / m``.

    float32: float32 arithmetic with the vectorised exp / log1p (each row's
    loss is >= 0, so the float64 mean keeps the float32 relative accuracy);
    float64: libm in float64.
    """
    cdef Py_ssize_t i
    cdef double zd, td, ed
    cdef float zf, tf, ef, mf = <float>m, one = 1, zero = 0
    if real is float:
        for i in range(r0, r1):
            zf = Z[i]
            tf = <float>y[i]
            ef = fastdl_expf(-fabsf(zf))
            row_loss[i] = fastdl_reluf(zf) - zf * tf + fastdl_log1pf(ef)
        if grad:
            for i in range(r0, r1):
                zf = Z[i]
                ef = fastdl_expf(-fabsf(zf))
                dZ[i] = (fastdl_self(zf >= zero, one, ef) / (one + ef) - <float>y[i]) / mf
    else:
        for i in range(r0, r1):
            zd = Z[i]
            td = y[i]
            ed = exp(-fabs(zd))
            row_loss[i] = (zd if zd > 0.0 else 0.0) - zd * td + log1p(ed)
            if grad:
                dZ[i] = (((1.0 if zd >= 0.0 else ed) / (1.0 + ed)) - td) / m


cdef tc_double mse_block(const real* Yh, const real2* Y, real* dZ, bint grad, Py_ssize_t n,
                         double inv_m) noexcept nogil:
    """sum((Yh - Y)**2) over n elements in float64 (32 lanes); ``dZ = (Yh - Y) / m``."""
    cdef double acc[32]
    cdef double d, s
    cdef Py_ssize_t j, l, n32 = n & ~(<Py_ssize_t>31)
    if grad:
        for j in range(n):
            dZ[j] = <real>((<double>Yh[j] - <double>Y[j]) * inv_m)
    for l in range(32):
        acc[l] = 0.0
    for j in range(0, n32, 32):
        for l in range(32):
            d = <double>Yh[j + l] - <double>Y[j + l]
            acc[l] += d * d
    for l in range(16):
        acc[l] += acc[l + 16]
    for l in range(8):
        acc[l] += acc[l + 8]
    s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    for j in range(n32, n):
        d = <double>Yh[j] - <double>Y[j]
        s += d * d
    return s


# ------------------------------------------------------------------ drivers

cdef inline double ordered_sum(const double* x, Py_ssize_t n) noexcept nogil:
    """Sum of per-row / per-block partials in a fixed order (independent of threads)."""
    return row_sum(x, n)


cdef inline int row_threads(Py_ssize_t m, Py_ssize_t work, Py_ssize_t grain) noexcept nogil:
    cdef int nt = nthreads(work, grain)
    return <int>m if nt > m else nt


cdef double _sce(const real* Z, const int64_t* y, real* dZ, bint grad, Py_ssize_t m, Py_ssize_t k,
                 double* row_loss, real* scratch, int max_nt) noexcept nogil:
    # without grad, ``scratch`` holds max_nt tiles of max(k, TILE) elements for the exponentials
    cdef int nt = row_threads(m, m * k, GRAIN_EXP)
    cdef Py_ssize_t per, c
    cdef Py_ssize_t tile = k if k > TILE else TILE
    cdef double inv_m = 1.0 / m
    if nt > max_nt:
        nt = max_nt
    if nt <= 1:
        sce_rows(Z, y, dZ, grad, 0, m, k, inv_m, row_loss, scratch)
    else:
        per = (m + nt - 1) // nt
        for c in prange(nt, num_threads=nt, schedule='static'):
            if c * per < m:
                sce_rows(Z, y, dZ, grad, c * per, min(m, (c + 1) * per), k, inv_m, row_loss,
                         scratch + c * tile if scratch != NULL else NULL)
    return ordered_sum(row_loss, m) / m


cdef void _softmax(const real* Z, real* out, Py_ssize_t m, Py_ssize_t k) noexcept nogil:
    cdef int nt = row_threads(m, m * k, GRAIN_EXP)
    cdef Py_ssize_t per, c
    if nt <= 1:
        softmax_rows(Z, out, 0, m, k)
        return
    per = (m + nt - 1) // nt
    for c in prange(nt, num_threads=nt, schedule='static'):
        if c * per < m:
            softmax_rows(Z, out, c * per, min(m, (c + 1) * per), k)


cdef double _bce(const real* Z, const real2* y, real* dZ, bint grad, Py_ssize_t m, double* row_loss) noexcept nogil:
    cdef int nt = row_threads(m, m, GRAIN_ROWS)
    cdef Py_ssize_t per, c
    if nt <= 1:
        bce_rows(Z, y, dZ, grad, 0, m, <double>m, row_loss)
    else:
        per = (m + nt - 1) // nt
        for c in prange(nt, num_threads=nt, schedule='static'):
            if c * per < m:
                bce_rows(Z, y, dZ, grad, c * per, min(m, (c + 1) * per), <double>m, row_loss)
    return ordered_sum(row_loss, m) / m


cdef tc_void mse_blocks(const real* Yh, const real2* Y, real* dZ, bint grad, Py_ssize_t n, Py_ssize_t b0,
                        Py_ssize_t b1, double inv_m, double* partial) noexcept nogil:
    cdef Py_ssize_t b, lo
    for b in range(b0, b1):
        lo = b * BLOCK
        partial[b] = mse_block(Yh + lo, Y + lo, dZ + lo if grad else NULL, grad, min(<Py_ssize_t>BLOCK, n - lo),
                               inv_m)


cdef double _mse(const real* Yh, const real2* Y, real* dZ, bint grad, Py_ssize_t m, Py_ssize_t k,
                 double* partial) noexcept nogil:
    # fixed blocks of BLOCK elements, partial sums added in block order
    cdef Py_ssize_t n = m * k
    cdef Py_ssize_t nb = (n + BLOCK - 1) // BLOCK
    cdef int nt = nthreads(nb, GRAIN_MSE // BLOCK)
    cdef Py_ssize_t per, c
    cdef double inv_m = 1.0 / m
    if nt <= 1:
        mse_blocks(Yh, Y, dZ, grad, n, 0, nb, inv_m, partial)
    else:
        per = (nb + nt - 1) // nt
        for c in prange(nt, num_threads=nt, schedule='static'):
            if c * per < nb:
                mse_blocks(Yh, Y, dZ, grad, n, c * per, min(nb, (c + 1) * per), inv_m, partial)
    return 0.5 * ordered_sum(partial, nb) / m


# ------------------------------------------------------------------ Python entry points

cdef inline double* loss_buffer(Py_ssize_t n) except NULL:
    cdef double* p = <double*>malloc((n if n > 0 else 1) * sizeof(double))
    if p == NULL:
        raise MemoryError()
    return p


def softmax_cross_entropy(Z, y, dZ):
    """Mean of ``logsumexp(z) - z_y``; ``dZ = (softmax(Z) - onehot(y)) / m`` unless ``dZ`` is empty."""
    cdef int t = rtype(Z, 2)
    cdef Py_ssize_t m = 0, k = 0, i
    cdef bint grad
    cdef const int64_t* yp
    cdef double* buf
    cdef void* scratch = NULL
    cdef int max_nt
    cdef double loss
    if is_float(t):
        m = dim(Z, 0)
        k = dim(Z, 1)
    grad = not is_empty(dZ)
    if not (is_float(t) and m > 0 and k > 0 and is_int64(y) and dim(y, 0) == m
            and (not grad or (wtype(dZ, 2) == t and dim(dZ, 0) == m and dim(dZ, 1) == k))):
        return _ref.softmax_cross_entropy(Z, y, dZ)
    yp = <const int64_t*>data(y)
    for i in range(m):
        if yp[i] < 0 or yp[i] >= k:
            raise IndexError(f"label {yp[i]} at row {i} is out of range for {k} classes")
    max_nt = fastdl_max_threads()
    if not grad:
        scratch = malloc(max_nt * max(k, <Py_ssize_t>TILE) * (4 if t == cnp.NPY_FLOAT else 8))
        if scratch == NULL:
            raise MemoryError()
    buf = loss_buffer(m)
    with nogil:
        if t == cnp.NPY_FLOAT:
            loss = _sce(<float*>data(Z), yp, <float*>data(dZ) if grad else NULL, grad, m, k, buf,
                        <float*>scratch, max_nt)
        else:
            loss = _sce(<double*>data(Z), yp, <double*>data(dZ) if grad else NULL, grad, m, k, buf,
                        <double*>scratch, max_nt)
    free(buf)
    free(scratch)
    return loss


def softmax(Z, out):
    """Row-wise, max-shifted softmax (``out`` may alias ``Z``)."""
    cdef int t = rtype(Z, 2)
    cdef Py_ssize_t m = 0, k = 0
    if is_float(t):
        m = dim(Z, 0)
        k = dim(Z, 1)
    if not (is_float(t) and k > 0 and wtype(out, 2) == t and dim(out, 0) == m and dim(out, 1) == k):
        return _ref.softmax(Z, out)
    with nogil:
        if t == cnp.NPY_FLOAT:
            _softmax(<float*>data(Z), <float*>data(out), m, k)
        else:
            _softmax(<double*>data(Z), <double*>data(out), m, k)


def sigmoid_bce(Z, y, dZ):
    """Mean of ``max(z,0) - z*y + log1p(exp(-|z|))``; ``dZ = (sigmoid(z) - y) / m`` unless empty."""
    cdef int t = rtype(Z, 2)
    cdef int ty = rtype(y, 1)
    cdef Py_ssize_t m = 0
    cdef bint grad
    cdef double* buf
    cdef double loss
    if is_float(t):
        m = dim(Z, 0)
    grad = not is_empty(dZ)
    if not (is_float(t) and m > 0 and dim(Z, 1) == 1 and is_float(ty) and dim(y, 0) == m
            and (not grad or (wtype(dZ, 2) == t and dim(dZ, 0) == m and dim(dZ, 1) == 1))):
        return _ref.sigmoid_bce(Z, y, dZ)
    buf = loss_buffer(m)
    with nogil:
        if t == cnp.NPY_FLOAT:
            if ty == cnp.NPY_FLOAT:
                loss = _bce(<float*>data(Z), <float*>data(y), <float*>data(dZ) if grad else NULL, grad, m, buf)
            else:
                loss = _bce(<float*>data(Z), <double*>data(y), <float*>data(dZ) if grad else NULL, grad, m, buf)
        else:
            if ty == cnp.NPY_FLOAT:
                loss = _bce(<double*>data(Z), <float*>data(y), <double*>data(dZ) if grad else NULL, grad, m, buf)
            else:
                loss = _bce(<double*>data(Z), <double*>data(y), <double*>data(dZ) if grad else NULL, grad, m, buf)
    free(buf)
    return loss


def mse(Yhat, Y, dZ):
    """Mean of ``0.5 * ||yhat - y||^2`` per row; ``dZ = (Yhat - Y) / m`` unless ``dZ`` is empty."""
    cdef int t = rtype(Yhat, 2)
    cdef int ty = rtype(Y, 2)
    cdef Py_ssize_t m = 0, k = 0
    cdef bint grad
    cdef double* buf
    cdef double loss
    if is_float(t):
        m = dim(Yhat, 0)
        k = dim(Yhat, 1)
    grad = not is_empty(dZ)
    if not (is_float(t) and m > 0 and is_float(ty) and dim(Y, 0) == m and dim(Y, 1) == k
            and (not grad or (wtype(dZ, 2) == t and dim(dZ, 0) == m and dim(dZ, 1) == k))):
        return _ref.mse(Yhat, Y, dZ)
    buf = loss_buffer((m * k + BLOCK - 1) // BLOCK)
    with nogil:
        if t == cnp.NPY_FLOAT:
            if ty == cnp.NPY_FLOAT:
                loss = _mse(<float*>data(Yhat), <float*>data(Y), <float*>data(dZ) if grad else NULL, grad, m, k, buf)
            else:
                loss = _mse(<float*>data(Yhat), <double*>data(Y), <float*>data(dZ) if grad else NULL, grad, m, k, buf)
        else:
            if ty == cnp.NPY_FLOAT:
                loss = _mse(<double*>data(Yhat), <float*>data(Y), <double*>data(dZ) if grad else NULL, grad, m, k, buf)
            else:
                loss = _mse(<double*>data(Yhat), <double*>data(Y), <double*>data(dZ) if grad else NULL, grad, m, k,
                            buf)
    free(buf)
    return loss
