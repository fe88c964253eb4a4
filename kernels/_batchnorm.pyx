# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""BatchNorm over the batch axis, per feature (SPEC.md "Batch normalisation").

Every pass sweeps rows of a row-major ``(m, n)`` array contiguously: with
``OMP`` threads the features are split into one contiguous range per thread
(so results do not depend on the number of threads), each thread sweeping
its range of every row. (Blocks of columns walked down the rows would stride
by ``n`` elements: with ``n`` a power of two all the rows of a block map to
the same cache sets and thrash.) Statistics are accumulated in float64:

* forward (train): on data shifted by the first row (removes a common
  offset, so tile means carry no ``eps * |offset|`` rounding into the
  merge), rows in tiles of about ``TILE_BYTES``; per tile the mean and the
  centred sum of squares (two passes over the tile, from cache), merged into
  the running mean / M2 with Chan's formula: one read of ``Z`` from memory,
  as stable as the two-pass formula. Then
  ``out = (z - mean) * (gamma * inv_std) + beta`` in float64 arithmetic;
* backward: pass 1 ``dbeta = sum(dout)``, ``dgamma = sum(dout * x_hat)``;
  pass 2 ``dZ = k1*dout - k2 - k3*(z - mean)`` per element, which reads each
  element of ``dout`` before writing the same element of ``dZ`` (may alias);
* inference: per-feature scale computed once, rows in parallel.
"""
cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

from _kernel_common cimport chunk_size, data, dim, is_float, nthreads, real, rtype, tc_void, wtype

from fastdl.backends import reference as _ref

cnp.import_array()

cdef enum:
    TILE_BYTES = 131072  # rows per statistics tile: about this many bytes of one thread's columns
    GRAIN = 524288       # elements per thread below which training passes run serially
    GRAIN_INFER = 524288  # same for inference (one memory-bound pass)
    MIN_COLS = 64        # columns per thread at least


# ------------------------------------------------------------------ column-range bodies
# Each handles columns [c0, c1) of every row; ``work`` holds float64 scratch.

cdef tc_void fwd_train_cols(const real* Z, const real* gamma, const real* beta, double eps, double mom,
                            real* run_mean, real* run_var, real* mean, real* inv_std, real* out,
                            Py_ssize_t m, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t c1, double* work) noexcept nogil:
    cdef Py_ssize_t w = c1 - c0
    cdef double* mu = work             # running mean, then the mean
    cdef double* m2 = work + w         # running centred sum of squares
    cdef double* tm = work + 2 * w     # tile mean, then gamma * inv_std
    cdef double* tq = work + 3 * w     # tile centred sum of squares, then beta
    cdef double* k = work + 4 * w      # the shift: the first row
    cdef Py_ssize_t tile = TILE_BYTES // (w * sizeof(real))
    cdef Py_ssize_t i, j, r0, r1, cnt = 0
    cdef double d, f, inv_nb, var, istd
    cdef const real* z
    cdef real* o
    if tile < 1:
        tile = 1
    for j in range(w):
        mu[j] = 0.0
        m2[j] = 0.0
        k[j] = Z[c0 + j]
    r0 = 0
    while r0 < m:
        r1 = r0 + tile if r0 + tile < m else m
        for j in range(w):
            tm[j] = 0.0
            tq[j] = 0.0
        for i in range(r0, r1):
            z = Z + i * n + c0
            for j in range(w):
                tm[j] += z[j] - k[j]
        inv_nb = 1.0 / (r1 - r0)
        for j in range(w):
            tm[j] *= inv_nb
        for i in range(r0, r1):
            z = Z + i * n + c0
            for j in range(w):
                d = (z[j] - k[j]) - tm[j]
                tq[j] += d * d
        # Chan et al.: merge (cnt, mu, m2) with the tile (r1 - r0, tm, tq)
        f = (r1 - r0) / <double>(cnt + r1 - r0)
        for j in range(w):
            d = tm[j] - mu[j]
            mu[j] += d * f
            m2[j] += tq[j] + d * d * cnt * f
        cnt += r1 - r0
        r0 = r1
    for j in range(w):
        mu[j] += k[j]
        var = m2[j] / m
        istd = 1.0 / sqrt(var + eps)
        mean[c0 + j] = <real>mu[j]
        inv_std[c0 + j] = <real>istd
        run_mean[c0 + j] = <real>(mom * run_mean[c0 + j] + (1.0 - mom) * mu[j])
        run_var[c0 + j] = <real>(mom * run_var[c0 + j] + (1.0 - mom) * var)
        tm[j] = gamma[c0 + j] * istd
        tq[j] = beta[c0 + j]
    for i in range(m):
        z = Z + i * n + c0
        o = out + i * n + c0
        for j in range(w):
            o[j] = <real>((z[j] - mu[j]) * tm[j] + tq[j])


cdef tc_void backward_cols(const real* Z, const real* gamma, const real* mean, const real* inv_std,
                           const real* dout, real* dZ, real* dgamma, real* dbeta,
                           Py_ssize_t m, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t c1, double* work) noexcept nogil:
    cdef Py_ssize_t w = c1 - c0
    cdef double* sb = work
    cdef double* sg = work + w
    cdef double* mu = work + 2 * w
    cdef double* istd = work + 3 * w
    cdef double* k1 = work + 4 * w
    cdef double* k2 = work + 5 * w
    cdef double* k3 = work + 6 * w
    cdef double dy, inv_m = 1.0 / m
    cdef Py_ssize_t i, j
    cdef const real* z
    cdef const real* g
    cdef real* o
    for j in range(w):
        sb[j] = 0.0
        sg[j] = 0.0
        mu[j] = mean[c0 + j]
        istd[j] = inv_std[c0 + j]
    for i in range(m):
        z = Z + i * n + c0
        g = dout + i * n + c0
        for j in range(w):
            dy = g[j]
            sb[j] += dy
            sg[j] += dy * ((z[j] - mu[j]) * istd[j])
    for j in range(w):
        dgamma[c0 + j] = <real>sg[j]
        dbeta[c0 + j] = <real>sb[j]
        # dZ = gamma*istd/m * (m*dy - dbeta - x_hat*dgamma), x_hat = (z - mu)*istd
        k1[j] = gamma[c0 + j] * istd[j]
        k2[j] = k1[j] * sb[j] * inv_m
        k3[j] = k1[j] * sg[j] * istd[j] * inv_m
    for i in range(m):
        z = Z + i * n + c0
        g = dout + i * n + c0
        o = dZ + i * n + c0
        for j in range(w):
            o[j] = <real>(k1[j] * g[j] - k2[j] - k3[j] * (z[j] - mu[j]))


cdef tc_void infer_rows(const real* Z, const real* shift, const real* scale, const real* beta, real* out,
                        Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef const real* z
    cdef real* o
    for i in range(r0, r1):
        z = Z + i * n
        o = out + i * n
        for j in range(n):
            o[j] = (z[j] - shift[j]) * scale[j] + beta[j]


# ------------------------------------------------------------------ drivers

cdef inline int col_threads(Py_ssize_t m, Py_ssize_t n) noexcept nogil:
    cdef int nt = nthreads(m * n, GRAIN)
    if nt > n // MIN_COLS:
        nt = <int>(n // MIN_COLS)
    return nt if nt > 1 else 1


cdef int _forward_train(const real* Z, const real* gamma, const real* beta, double eps, double mom,
                        real* run_mean, real* run_var, real* mean, real* inv_std, real* out,
                        Py_ssize_t m, Py_ssize_t n) noexcept nogil:
    cdef int nt = col_threads(m, n)
    cdef Py_ssize_t per = chunk_size(n, nt), c, c0
    cdef double* work = <double*>malloc(5 * (n + 16 * nt) * sizeof(double))
    if work == NULL:
        return -1
    if nt == 1:
        fwd_train_cols(Z, gamma, beta, eps, mom, run_mean, run_var, mean, inv_std, out, m, n, 0, n, work)
    else:
        for c in prange(nt, num_threads=nt, schedule='static'):
            c0 = c * per
            if c0 < n:
                fwd_train_cols(Z, gamma, beta, eps, mom, run_mean, run_var, mean, inv_std, out, m, n,
                               c0, min(n, c0 + per), work + 5 * (c0 + 16 * c))
    free(work)
    return 0


cdef int _backward(const real* Z, const real* gamma, const real* mean, const real* inv_std, const real* dout,
                   real* dZ, real* dgamma, real* dbeta, Py_ssize_t m, Py_ssize_t n) noexcept nogil:
    cdef int nt = col_threads(m, n)
    cdef Py_ssize_t per = chunk_size(n, nt), c, c0
    cdef double* work = <double*>malloc(7 * (n + 16 * nt) * sizeof(double))
    if work == NULL:
        return -1
    if nt == 1:
        backward_cols(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta, m, n, 0, n, work)
    else:
        for c in prange(nt, num_threads=nt, schedule='static'):
            c0 = c * per
            if c0 < n:
                backward_cols(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta, m, n, c0, min(n, c0 + per),
                              work + 7 * (c0 + 16 * c))
    free(work)
    return 0


cdef int _forward_infer(const real* Z, const real* gamma, const real* beta, const real* run_mean,
                        const real* run_var, double eps, real* out, Py_ssize_t m, Py_ssize_t n) noexcept nogil:
    cdef real* scale = <real*>malloc((n if n > 0 else 1) * sizeof(real))
    cdef int nt = nthreads(m * n, GRAIN_INFER)
    cdef Py_ssize_t j, per, c
    if scale == NULL:
        return -1
    for j in range(n):
        scale[j] = <real>(gamma[j] / sqrt(<double>run_var[j] + eps))
    if nt > m:
        nt = <int>m
    if nt <= 1:
        infer_rows(Z, run_mean, scale, beta, out, 0, m, n)
    else:
        per = (m + nt - 1) // nt
        for c in prange(nt, num_threads=nt, schedule='static'):
            if c * per < m:
                infer_rows(Z, run_mean, scale, beta, out, c * per, min(m, (c + 1) * per), n)
    free(scale)
    return 0


# ------------------------------------------------------------------ Python entry points

cdef inline bint vec(object a, int t, Py_ssize_t n, bint writeable):
    return (wtype(a, 1) if writeable else rtype(a, 1)) == t and dim(a, 0) == n


def batchnorm_forward_train(Z, gamma, beta, double eps, double momentum, running_mean, running_var, mean,
                            inv_std, out):
    """Batch statistics, normalised output and running-average update (see the contract)."""
    cdef int t = rtype(Z, 2)
    cdef int rc
    cdef Py_ssize_t m = 0, n = 0
    if is_float(t) and wtype(out, 2) == t:
        m = dim(Z, 0)
        n = dim(Z, 1)
    if not (is_float(t) and wtype(out, 2) == t and m > 0 and dim(out, 0) == m and dim(out, 1) == n
            and vec(gamma, t, n, False) and vec(beta, t, n, False) and vec(running_mean, t, n, True)
            and vec(running_var, t, n, True) and vec(mean, t, n, True) and vec(inv_std, t, n, True)):
        return _ref.batchnorm_forward_train(Z, gamma, beta, eps, momentum, running_mean, running_var, mean,
                                            inv_std, out)
    with nogil:
        if t == cnp.NPY_FLOAT:
            rc = _forward_train(<float*>data(Z), <float*>data(gamma), <float*>data(beta), eps, momentum,
                                <float*>data(running_mean), <float*>data(running_var), <float*>data(mean),
                                <float*>data(inv_std), <float*>data(out), m, n)
        else:
            rc = _forward_train(<double*>data(Z), <double*>data(gamma), <double*>data(beta), eps, momentum,
                                <double*>data(running_mean), <double*>data(running_var), <double*>data(mean),
                                <double*>data(inv_std), <double*>data(out), m, n)
    if rc != 0:
        raise MemoryError()


def batchnorm_forward_infer(Z, gamma, beta, running_mean, running_var, double eps, out):
    """``out = gamma * (Z - running_mean) / sqrt(running_var + eps) + beta``."""
    cdef int t = rtype(Z, 2)
    cdef int rc
    cdef Py_ssize_t m = 0, n = 0
    if is_float(t) and wtype(out, 2) == t:
        m = dim(Z, 0)
        n = dim(Z, 1)
    if not (is_float(t) and wtype(out, 2) == t and dim(out, 0) == m and dim(out, 1) == n
            and vec(gamma, t, n, False) and vec(beta, t, n, False) and vec(running_mean, t, n, False)
            and vec(running_var, t, n, False)):
        return _ref.batchnorm_forward_infer(Z, gamma, beta, running_mean, running_var, eps, out)
    with nogil:
        if t == cnp.NPY_FLOAT:
            rc = _forward_infer(<float*>data(Z), <float*>data(gamma), <float*>data(beta),
                                <float*>data(running_mean), <float*>data(running_var), eps,
                                <float*>data(out), m, n)
        else:
            rc = _forward_infer(<double*>data(Z), <double*>data(gamma), <double*>data(beta),
                                <double*>data(running_mean), <double*>data(running_var), eps,
                                <double*>data(out), m, n)
    if rc != 0:
        raise MemoryError()


def batchnorm_backward(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta):
    """``dgamma``, ``dbeta`` and ``dZ`` (``dZ`` may alias ``dout``)."""
    cdef int t = rtype(Z, 2)
    cdef int rc
    cdef Py_ssize_t m = 0, n = 0
    if is_float(t) and wtype(dZ, 2) == t:
        m = dim(Z, 0)
        n = dim(Z, 1)
    if not (is_float(t) and wtype(dZ, 2) == t and m > 0 and dim(dZ, 0) == m and dim(dZ, 1) == n
            and rtype(dout, 2) == t and dim(dout, 0) == m and dim(dout, 1) == n
            and vec(gamma, t, n, False) and vec(mean, t, n, False) and vec(inv_std, t, n, False)
            and vec(dgamma, t, n, True) and vec(dbeta, t, n, True)):
        return _ref.batchnorm_backward(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta)
    with nogil:
        if t == cnp.NPY_FLOAT:
            rc = _backward(<float*>data(Z), <float*>data(gamma), <float*>data(mean), <float*>data(inv_std),
                           <float*>data(dout), <float*>data(dZ), <float*>data(dgamma), <float*>data(dbeta), m, n)
        else:
            rc = _backward(<double*>data(Z), <double*>data(gamma), <double*>data(mean), <double*>data(inv_std),
                           <double*>data(dout), <double*>data(dZ), <double*>data(dgamma), <double*>data(dbeta),
                           m, n)
    if rc != 0:
        raise MemoryError()
