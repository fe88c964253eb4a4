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
* Poisson (log link): per element in float64 (libm exp / log), per-row sums.

Per-row losses / per-block partials go to a float64 buffer summed in a fixed
order, so results do not depend on the number of threads. Rows / blocks run
in parallel above a size threshold.
"""
cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport exp, fabs, fabsf, log, log1p
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from _kernel_common cimport (data, dim, fastdl_expf, fastdl_log1pf, fastdl_max_threads, fastdl_reluf, fastdl_self,
                             is_empty, is_float, is_int64, nthreads, r_exp, real, real2, row_max, row_sum, rtype,
                             tc_double, tc_void, wtype)
from _kernel_common cimport unsupported


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
                      Py_ssize_t k, double inv_m, const double* w, double sw, double* row_loss,
                      real* scratch) noexcept nogil:
    """Rows [r0, r1): losses into row_loss, and dZ when ``grad`` (else ``scratch`` holds the exps).

    Weighted (``w`` not NULL): row i's loss times w_i, its gradient scaled by w_i/sw instead of 1/m.
    """
    cdef real zmax[TILE]
    cdef Py_ssize_t rows_per = TILE // k if k <= TILE else 1
    cdef Py_ssize_t b0, nb, r, j, yi
    cdef real* E
    cdef real* e
    cdef real c, ey
    cdef double s, f = inv_m
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
            if w != NULL:
                f = w[b0 + r] / sw
                row_loss[b0 + r] *= w[b0 + r]
            if grad:
                ey = e[yi]
                c = <real>(f / s)
                for j in range(k):
                    e[j] = e[j] * c
                e[yi] = <real>((ey / s - 1.0) * f)       # p_y - 1 formed in float64
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
                      Py_ssize_t k, double m, const double* w, double sw, double* row_loss) noexcept nogil:
    """Per-row sum over the k outputs of ``max(z,0) - z*t + log1p(exp(-|z|))`` and ``dZ = (sigmoid(z) - t) / m``.

    float32: float32 arithmetic with the vectorised exp / log1p (each element's
    loss is >= 0, so the float64 mean keeps the float32 relative accuracy);
    float64: libm in float64. Weighted (``w`` not NULL): row i's loss times w_i,
    its gradient times w_i/sw instead of divided by m.
    """
    cdef Py_ssize_t i, j, e
    cdef double zd, td, ed, acc, fd
    cdef float zf, tf, ef, mf = <float>m, one = 1, zero = 0, ff
    if real is float:
        if k == 1:
            for i in range(r0, r1):
                zf = Z[i]
                tf = <float>y[i]
                ef = fastdl_expf(-fabsf(zf))
                row_loss[i] = fastdl_reluf(zf) - zf * tf + fastdl_log1pf(ef)
        else:
            for i in range(r0, r1):
                acc = 0.0
                for j in range(k):
                    e = i * k + j
                    zf = Z[e]
                    tf = <float>y[e]
                    ef = fastdl_expf(-fabsf(zf))
                    acc += fastdl_reluf(zf) - zf * tf + fastdl_log1pf(ef)
                row_loss[i] = acc
        if grad and w == NULL:
            for e in range(r0 * k, r1 * k):
                zf = Z[e]
                ef = fastdl_expf(-fabsf(zf))
                dZ[e] = (fastdl_self(zf >= zero, one, ef) / (one + ef) - <float>y[e]) / mf
        elif grad:
            for i in range(r0, r1):
                ff = <float>(w[i] / sw)
                for e in range(i * k, i * k + k):
                    zf = Z[e]
                    ef = fastdl_expf(-fabsf(zf))
                    dZ[e] = (fastdl_self(zf >= zero, one, ef) / (one + ef) - <float>y[e]) * ff
    else:
        for i in range(r0, r1):
            acc = 0.0
            fd = w[i] / sw if w != NULL else 0.0
            for e in range(i * k, i * k + k):
                zd = Z[e]
                td = y[e]
                ed = exp(-fabs(zd))
                acc += (zd if zd > 0.0 else 0.0) - zd * td + log1p(ed)
                if grad:
                    if w == NULL:
                        dZ[e] = (((1.0 if zd >= 0.0 else ed) / (1.0 + ed)) - td) / m
                    else:
                        dZ[e] = (((1.0 if zd >= 0.0 else ed) / (1.0 + ed)) - td) * fd
            row_loss[i] = acc
    if w != NULL:
        for i in range(r0, r1):
            row_loss[i] *= w[i]


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


cdef tc_void mse_rows_w(const real* Yh, const real2* Y, real* dZ, bint grad, Py_ssize_t r0, Py_ssize_t r1,
                        Py_ssize_t k, const double* w, double sw, double* row_loss) noexcept nogil:
    """Weighted MSE rows: row_loss[i] = w_i * sum_j (yh - y)**2 (float64), dZ = (yh - y) * (w_i/sw)."""
    cdef Py_ssize_t i, j
    cdef double d, acc, f
    cdef const real* yh
    cdef const real2* yy
    for i in range(r0, r1):
        yh = Yh + i * k
        yy = Y + i * k
        f = w[i] / sw
        if grad:
            for j in range(k):
                dZ[i * k + j] = <real>((<double>yh[j] - <double>yy[j]) * f)
        acc = 0.0
        for j in range(k):
            d = <double>yh[j] - <double>yy[j]
            acc += d * d
        row_loss[i] = w[i] * acc


cdef tc_void poisson_rows(const real* Z, const real2* Y, real* dZ, bint grad, Py_ssize_t r0, Py_ssize_t r1,
                          Py_ssize_t k, double m, const double* w, double sw, double* row_loss) noexcept nogil:
    """Rows [r0, r1): per row the sum over its k outputs of the half Poisson deviance (log link)
    ``(exp(z) - y*z) + (xlogy(y, y) - y)``, and ``dZ = (exp(z) - y) / m`` (weighted: ``* w_i/sw``).

    float64 per element whatever the dtype (libm exp and log; exp overflows to inf, which the
    callers' divergence checks catch). Weighted (``w`` not NULL): row i's loss times w_i.
    """
    cdef Py_ssize_t i, e
    cdef double zd, td, mu, acc, f
    for i in range(r0, r1):
        acc = 0.0
        f = w[i] / sw if w != NULL else 0.0
        for e in range(i * k, i * k + k):
            zd = Z[e]
            td = Y[e]
            mu = exp(zd)
            acc += (mu - td * zd) + ((td * log(td) if td > 0.0 else 0.0) - td)
            if grad:
                if w == NULL:
                    dZ[e] = <real>((mu - td) / m)
                else:
                    dZ[e] = <real>((mu - td) * f)
        row_loss[i] = w[i] * acc if w != NULL else acc


# ------------------------------------------------------------------ drivers

cdef inline double ordered_sum(const double* x, Py_ssize_t n) noexcept nogil:
    """Sum of per-row / per-block partials in a fixed order (independent of threads)."""
    return row_sum(x, n)


cdef inline int row_threads(Py_ssize_t m, Py_ssize_t work, Py_ssize_t grain) noexcept nogil:
    cdef int nt = nthreads(work, grain)
    return <int>m if nt > m else nt


cdef double seq_sum(const double* w, Py_ssize_t n) noexcept nogil:
    """sum(w) added left to right from 0.0 (the weight convention of every executor: board / plan.py)."""
    cdef double s = 0.0
    cdef Py_ssize_t i
    for i in range(n):
        s += w[i]
    return s


cdef double zero_weights(real* dZ, bint grad, Py_ssize_t n) noexcept nogil:
    """A batch whose weights sum to 0 contributes nothing: loss 0, dZ 0 (the contract)."""
    if grad:
        memset(dZ, 0, n * sizeof(real))
    return 0.0


cdef Py_ssize_t loss_buffer_size(Py_ssize_t m, Py_ssize_t k) noexcept nogil:
    """float64 scratch (row losses / partial sums) the loss cores need for an (m, k) batch."""
    cdef Py_ssize_t nb = (m * k + BLOCK - 1) // BLOCK
    return nb if nb > m else m


cdef double sce_c(const real* Z, const int64_t* y, real* dZ, bint grad, Py_ssize_t m, Py_ssize_t k,
                  const double* w, double sw, double* row_loss, real* scratch, int max_nt) noexcept nogil:
    # without grad, ``scratch`` holds max_nt tiles of max(k, TILE) elements for the exponentials
    cdef int nt = row_threads(m, m * k, GRAIN_EXP)
    cdef Py_ssize_t per, c
    cdef Py_ssize_t tile = k if k > TILE else TILE
    cdef double inv_m = 1.0 / m
    if w != NULL and sw == 0.0:
        return zero_weights(dZ, grad, m * k)
    if nt > max_nt:
        nt = max_nt
    if nt <= 1:
        sce_rows(Z, y, dZ, grad, 0, m, k, inv_m, w, sw, row_loss, scratch)
    else:
        per = (m + nt - 1) // nt
        for c in prange(nt, num_threads=nt, schedule='static'):
            if c * per < m:
                sce_rows(Z, y, dZ, grad, c * per, min(m, (c + 1) * per), k, inv_m, w, sw, row_loss,
                         scratch + c * tile if scratch != NULL else NULL)
    if w != NULL:
        return ordered_sum(row_loss, m) / sw
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


cdef enum:   # the element-wise losses: one row-parallel driver, one dtype dispatch
    EW_BCE = 0
    EW_POISSON = 1
    EW_MSE = 2


cdef double rowwise_c(int kind, const real* Z, const real2* Y, real* dZ, bint grad, Py_ssize_t m, Py_ssize_t k,
                      const double* w, double sw, double* row_loss) noexcept nogil:
    # rows split in nt contiguous ranges, row losses summed in row order: the same bits for any nt
    cdef int nt = row_threads(m, m * k, GRAIN_ROWS)
    cdef Py_ssize_t per, c
    if w != NULL and sw == 0.0:
        return zero_weights(dZ, grad, m * k)
    if nt <= 1:
        ew_rows(kind, Z, Y, dZ, grad, 0, m, k, <double>m, w, sw, row_loss)
    else:
        per = (m + nt - 1) // nt
        for c in prange(nt, num_threads=nt, schedule='static'):
            if c * per < m:
                ew_rows(kind, Z, Y, dZ, grad, c * per, min(m, (c + 1) * per), k, <double>m, w, sw, row_loss)
    if w != NULL:
        return ordered_sum(row_loss, m) / sw
    return ordered_sum(row_loss, m) / m


cdef inline void ew_rows(int kind, const real* Z, const real2* Y, real* dZ, bint grad, Py_ssize_t r0, Py_ssize_t r1,
                         Py_ssize_t k, double m, const double* w, double sw, double* row_loss) noexcept nogil:
    if kind == EW_BCE:
        bce_rows(Z, Y, dZ, grad, r0, r1, k, m, w, sw, row_loss)
    else:
        poisson_rows(Z, Y, dZ, grad, r0, r1, k, m, w, sw, row_loss)


cdef double bce_c(const real* Z, const real2* y, real* dZ, bint grad, Py_ssize_t m, Py_ssize_t k,
                  const double* w, double sw, double* row_loss) noexcept nogil:
    return rowwise_c(EW_BCE, Z, y, dZ, grad, m, k, w, sw, row_loss)


cdef double poisson_c(const real* Z, const real2* Y, real* dZ, bint grad, Py_ssize_t m, Py_ssize_t k,
                      const double* w, double sw, double* row_loss) noexcept nogil:
    return rowwise_c(EW_POISSON, Z, Y, dZ, grad, m, k, w, sw, row_loss)


cdef tc_void mse_blocks(const real* Yh, const real2* Y, real* dZ, bint grad, Py_ssize_t n, Py_ssize_t b0,
                        Py_ssize_t b1, double inv_m, double* partial) noexcept nogil:
    cdef Py_ssize_t b, lo
    for b in range(b0, b1):
        lo = b * BLOCK
        partial[b] = mse_block(Yh + lo, Y + lo, dZ + lo if grad else NULL, grad, min(<Py_ssize_t>BLOCK, n - lo),
                               inv_m)


cdef double mse_c(const real* Yh, const real2* Y, real* dZ, bint grad, Py_ssize_t m, Py_ssize_t k,
                  const double* w, double sw, double* partial) noexcept nogil:
    # fixed blocks of BLOCK elements, partial sums added in block order; weighted: rows, row sums in order
    cdef Py_ssize_t n = m * k
    cdef Py_ssize_t nb = (n + BLOCK - 1) // BLOCK
    cdef int nt = nthreads(nb, GRAIN_MSE // BLOCK)
    cdef Py_ssize_t per, c
    cdef double inv_m = 1.0 / m
    if w != NULL and sw == 0.0:
        return zero_weights(dZ, grad, n)
    if w != NULL:
        nt = row_threads(m, n, GRAIN_MSE)
        if nt <= 1:
            mse_rows_w(Yh, Y, dZ, grad, 0, m, k, w, sw, partial)
        else:
            per = (m + nt - 1) // nt
            for c in prange(nt, num_threads=nt, schedule='static'):
                if c * per < m:
                    mse_rows_w(Yh, Y, dZ, grad, c * per, min(m, (c + 1) * per), k, w, sw, partial)
        return 0.5 * ordered_sum(partial, m) / sw
    if nt <= 1:
        mse_blocks(Yh, Y, dZ, grad, n, 0, nb, inv_m, partial)
    else:
        per = (nb + nt - 1) // nt
        for c in prange(nt, num_threads=nt, schedule='static'):
            if c * per < nb:
                mse_blocks(Yh, Y, dZ, grad, n, c * per, min(nb, (c + 1) * per), inv_m, partial)
    return 0.5 * ordered_sum(partial, nb) / m


cdef double elementwise_c(int kind, const real* Z, const real2* Y, real* dZ, bint grad, Py_ssize_t m, Py_ssize_t k,
                          const double* w, double sw, double* buf) noexcept nogil:
    if kind == EW_MSE:
        return mse_c(Z, Y, dZ, grad, m, k, w, sw, buf)
    return rowwise_c(kind, Z, Y, dZ, grad, m, k, w, sw, buf)


cdef double elementwise_any(int kind, int t, int ty, void* Z, void* Y, void* dZ, bint grad, Py_ssize_t m,
                            Py_ssize_t k, const double* w, double sw, double* buf) noexcept nogil:
    """``kind``'s loss on (float32 | float64) Z and dZ with (float32 | float64) targets Y."""
    if t == cnp.NPY_FLOAT:
        if ty == cnp.NPY_FLOAT:
            return elementwise_c(kind, <float*>Z, <float*>Y, <float*>dZ, grad, m, k, w, sw, buf)
        return elementwise_c(kind, <float*>Z, <double*>Y, <float*>dZ, grad, m, k, w, sw, buf)
    if ty == cnp.NPY_FLOAT:
        return elementwise_c(kind, <double*>Z, <float*>Y, <double*>dZ, grad, m, k, w, sw, buf)
    return elementwise_c(kind, <double*>Z, <double*>Y, <double*>dZ, grad, m, k, w, sw, buf)


# ------------------------------------------------------------------ Python entry points

cdef inline double* loss_buffer(Py_ssize_t n) except NULL:
    cdef double* p = <double*>malloc((n if n > 0 else 1) * sizeof(double))
    if p == NULL:
        raise MemoryError()
    return p


cdef double* weights_of(object w, Py_ssize_t m, double* sw) except? NULL:
    """The float64 weights of an m-row batch (NULL: unweighted) and their left-to-right sum."""
    cdef const double* p
    if w is None or is_empty(w):
        return NULL
    if not (rtype(w, 1) == cnp.NPY_DOUBLE and dim(w, 0) == m):
        raise ValueError(f"w must be a C-contiguous float64 array of shape ({m},) (one weight per row), "
                         f"or empty for unweighted; got {getattr(w, 'dtype', type(w))} {getattr(w, 'shape', '')}")
    p = <const double*>data(w)
    sw[0] = seq_sum(p, m)     # the weights' values are validated by the model (finite, >= 0)
    return <double*>p


def softmax_cross_entropy(Z, y, dZ, w=None):
    """Mean of ``logsumexp(z) - z_y``; ``dZ = (softmax(Z) - onehot(y)) / m`` unless ``dZ`` is empty.

    With per-example weights ``w`` (float64 (m,), empty = unweighted): ``sum(w_i L_i) / sum(w)`` and
    ``dZ_i = w_i (softmax(z_i) - onehot(y_i)) / sum(w)`` (scikit-learn's rule; ``sum(w)`` added left to
    right; a batch whose weights sum to 0 gives loss 0 and dZ 0).
    """
    cdef int t = rtype(Z, 2)
    cdef Py_ssize_t m = 0, k = 0, i
    cdef bint grad
    cdef const int64_t* yp
    cdef double* buf
    cdef void* scratch = NULL
    cdef int max_nt
    cdef double loss, sw = 0.0
    cdef double* wp
    if is_float(t):
        m = dim(Z, 0)
        k = dim(Z, 1)
    grad = not is_empty(dZ)
    if not (is_float(t) and m > 0 and k > 0 and is_int64(y) and dim(y, 0) == m
            and (not grad or (wtype(dZ, 2) == t and dim(dZ, 0) == m and dim(dZ, 1) == k))):
        raise unsupported("softmax_cross_entropy")
    wp = weights_of(w, m, &sw)
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
            loss = sce_c(<float*>data(Z), yp, <float*>data(dZ) if grad else NULL, grad, m, k, wp, sw, buf,
                         <float*>scratch, max_nt)
        else:
            loss = sce_c(<double*>data(Z), yp, <double*>data(dZ) if grad else NULL, grad, m, k, wp, sw, buf,
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
        raise unsupported("softmax")
    with nogil:
        if t == cnp.NPY_FLOAT:
            _softmax(<float*>data(Z), <float*>data(out), m, k)
        else:
            _softmax(<double*>data(Z), <double*>data(out), m, k)


def sigmoid_bce(Z, y, dZ, w=None):
    """Mean over rows of the per-row SUM over the k outputs of ``max(z,0) - z*y + log1p(exp(-|z|))``;
    ``dZ = (sigmoid(Z) - y) / m`` unless ``dZ`` is empty.

    ``Z`` (m, k), ``y`` (m, k) float 0/1 (or (m,) when k == 1). Weights ``w`` as in
    :func:`softmax_cross_entropy`.
    """
    cdef int t = rtype(Z, 2)
    cdef int ty = -1
    cdef Py_ssize_t m = 0, k = 0
    cdef bint grad, y_ok = False
    cdef double* buf
    cdef double loss, sw = 0.0
    cdef double* wp
    if is_float(t):
        m = dim(Z, 0)
        k = dim(Z, 1)
        ty = rtype(y, 1)
        if is_float(ty):
            y_ok = k == 1 and dim(y, 0) == m
        else:
            ty = rtype(y, 2)
            y_ok = is_float(ty) and dim(y, 0) == m and dim(y, 1) == k
    grad = not is_empty(dZ)
    if not (is_float(t) and m > 0 and k > 0 and y_ok
            and (not grad or (wtype(dZ, 2) == t and dim(dZ, 0) == m and dim(dZ, 1) == k))):
        raise unsupported("sigmoid_bce")
    wp = weights_of(w, m, &sw)
    buf = loss_buffer(m)
    with nogil:
        loss = elementwise_any(EW_BCE, t, ty, data(Z), data(y), data(dZ) if grad else NULL, grad, m, k,
                               wp, sw, buf)
    free(buf)
    return loss


def mse(Yhat, Y, dZ, w=None):
    """Mean of ``0.5 * ||yhat - y||^2`` per row; ``dZ = (Yhat - Y) / m`` unless ``dZ`` is empty.

    Weights ``w`` as in :func:`softmax_cross_entropy`.
    """
    return same_shape_loss(EW_MSE, "mse", Yhat, Y, dZ, w)


def poisson(Z, Y, dZ, w=None):
    """Mean over rows of the per-row SUM over the k outputs of the half Poisson deviance (log link)
    ``exp(z) - y*z + xlogy(y, y) - y``; ``dZ = (exp(Z) - Y) / m`` unless ``dZ`` is empty.

    ``Z`` (m, k), ``Y`` (m, k) finite and >= 0 (checked by the validated entry point). Weights ``w``
    as in :func:`softmax_cross_entropy`.
    """
    return same_shape_loss(EW_POISSON, "poisson", Z, Y, dZ, w)


cdef double same_shape_loss(int kind, str name, Z, Y, dZ, w) except? -1.0:
    """The element-wise loss ``kind`` on (m, k) Z and (m, k) targets Y (either float dtype); dZ empty: loss only."""
    cdef int t = rtype(Z, 2)
    cdef int ty = rtype(Y, 2)
    cdef Py_ssize_t m = 0, k = 0
    cdef bint grad
    cdef double* buf
    cdef double loss, sw = 0.0
    cdef double* wp
    if is_float(t):
        m = dim(Z, 0)
        k = dim(Z, 1)
    grad = not is_empty(dZ)
    if not (is_float(t) and m > 0 and (k > 0 or kind == EW_MSE) and is_float(ty) and dim(Y, 0) == m
            and dim(Y, 1) == k and (not grad or (wtype(dZ, 2) == t and dim(dZ, 0) == m and dim(dZ, 1) == k))):
        raise unsupported(name)
    wp = weights_of(w, m, &sw)
    buf = loss_buffer(loss_buffer_size(m, k) if kind == EW_MSE else m)
    with nogil:
        loss = elementwise_any(kind, t, ty, data(Z), data(Y), data(dZ) if grad else NULL, grad, m, k, wp, sw, buf)
    free(buf)
    return loss
