# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""BatchNorm over the batch axis, per feature (docs/spec.md "Batch normalisation").

Every pass sweeps rows of a row-major ``(m, n)`` array contiguously: with
``OMP`` threads the features are split into one contiguous range per thread
(so results do not depend on the number of threads), each thread sweeping
its range of every row. (Blocks of columns walked down the rows would stride
by ``n`` elements: with ``n`` a power of two all the rows of a block map to
the same cache sets and thrash.) Each sweep handles several rows at once
(8 for the statistics, 4 for the other passes) so that per-feature
accumulators and parameters are loaded and stored once per group of rows,
not once per row; the inner loops are C (below) so that GCC vectorises them
(512-bit in the AVX-512 clones) without runtime alias checks (``dZ`` may
alias ``dout``). The float64 sums cost one float32 -> float64 conversion
per element, which bounds the L2-resident case; large arrays are bound by
memory bandwidth (the passes below read ``Z`` twice per call, and ``dout``
twice in backward).

* forward (train), one read of ``Z`` for the statistics: per block of 8
  rows and per feature, the sum and sum of squares of the 7 differences to
  the block's first row (float64: exact differences of float32 data, and
  the cancellation in ``S2 - S1**2/8`` is bounded by a factor 9 whatever the
  offset), giving the block's mean and centred sum of squares; blocks are
  merged into the running mean / M2 with Chan's formula, means kept relative
  to the first row of ``Z`` (no ``eps * |offset|`` rounding in the merge).
  As stable as the two-pass formula. Then
  ``out = ((z - mean_hi) - mean_lo) * (gamma * inv_std) + beta`` in the
  array's dtype: the float64 mean split into two float32 numbers keeps
  ``z - mean`` accurate to rounding (float64 data: ``mean_lo = 0``);
* backward: pass 1 ``dbeta = sum(dout)``, ``dgamma = inv_std * sum(dout * (z - mean))``
  (float64 sums of exact float64 products); pass 2
  ``dZ = k1*dout - k2 - k3*(z - mean)`` in the array's dtype, per element,
  reading each element of ``dout`` before writing the same element of
  ``dZ`` (may alias);
* inference: per-feature scale computed once, rows in parallel.
"""
cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

from _kernel_common cimport (chunk_size, data, dim, fastdl_max_threads, is_float, nthreads, real, rtype, tc_void,
                             wtype)
from _kernel_common cimport unsupported


cnp.import_array()

cdef enum:
    GRAIN = 524288       # elements per thread below which training passes run serially
    GRAIN_INFER = 524288  # same for inference (one memory-bound pass)
    MIN_COLS = 64        # columns per thread at least
    NWORK = 7            # float64 scratch per column: three float64 arrays + four of per-feature parameters


# Row-group kernels on columns [0, w) of rows z, z + n, ...: static inline C,
# inlined into (and vectorised for) each clone of the tc_void callers below.
# BN_IVDEP: the rows of one group never overlap each other and the
# per-feature arrays, and dZ aliases dout element for element at most (each
# element read before it is written), so no loop-carried dependence.
cdef extern from "fastdl_batchnorm.h":
    void bn_stats8_f(const float*, Py_ssize_t, Py_ssize_t, const float*, double*, double*, double, double) noexcept nogil
    void bn_stats8_d(const double*, Py_ssize_t, Py_ssize_t, const double*, double*, double*, double, double) noexcept nogil
    void bn_stats1_f(const float*, Py_ssize_t, const float*, double*, double*, double, double) noexcept nogil
    void bn_stats1_d(const double*, Py_ssize_t, const double*, double*, double*, double, double) noexcept nogil
    void bn_norm4_f(const float*, float*, Py_ssize_t, Py_ssize_t, const float*, const float*, const float*,
                    const float*) noexcept nogil
    void bn_norm4_d(const double*, double*, Py_ssize_t, Py_ssize_t, const double*, const double*,
                    const double*, const double*) noexcept nogil
    void bn_norm1_f(const float*, float*, Py_ssize_t, const float*, const float*, const float*,
                    const float*) noexcept nogil
    void bn_norm1_d(const double*, double*, Py_ssize_t, const double*, const double*, const double*,
                    const double*) noexcept nogil
    void bn_bsums4_f(const float*, const float*, Py_ssize_t, Py_ssize_t, const float*, double*,
                     double*) noexcept nogil
    void bn_bsums4_d(const double*, const double*, Py_ssize_t, Py_ssize_t, const double*, double*,
                     double*) noexcept nogil
    void bn_bsums1_f(const float*, const float*, Py_ssize_t, const float*, double*, double*) noexcept nogil
    void bn_bsums1_d(const double*, const double*, Py_ssize_t, const double*, double*, double*) noexcept nogil
    void bn_dz4_f(const float*, const float*, float*, Py_ssize_t, Py_ssize_t, const float*, const float*,
                  const float*, const float*) noexcept nogil
    void bn_dz4_d(const double*, const double*, double*, Py_ssize_t, Py_ssize_t, const double*,
                  const double*, const double*, const double*) noexcept nogil
    void bn_dz1_f(const float*, const float*, float*, Py_ssize_t, const float*, const float*, const float*,
                  const float*) noexcept nogil
    void bn_dz1_d(const double*, const double*, double*, Py_ssize_t, const double*, const double*,
                  const double*, const double*) noexcept nogil
    void bn_fwd_finish_f(Py_ssize_t, Py_ssize_t, double, double, const float*, const double*, double*, double*,
                         const float*, const float*, float*, float*, float*, float*, float*, float*, float*,
                         float*) noexcept nogil
    void bn_fwd_finish_d(Py_ssize_t, Py_ssize_t, double, double, const double*, const double*, double*, double*,
                         const double*, const double*, double*, double*, double*, double*, double*, double*,
                         double*, double*) noexcept nogil
    void bn_bwd_finish_f(Py_ssize_t, Py_ssize_t, const float*, const float*, const double*, const double*,
                         float*, float*, float*, float*, float*) noexcept nogil
    void bn_bwd_finish_d(Py_ssize_t, Py_ssize_t, const double*, const double*, const double*, const double*,
                         double*, double*, double*, double*, double*) noexcept nogil


# ------------------------------------------------------------------ column-range bodies
# Each handles columns [c0, c1) of every row; ``work`` holds NWORK * (c1 - c0)
# float64 of scratch: float64 accumulators, then arrays of ``real``.

cdef tc_void fwd_train_cols(const real* Z, const real* gamma, const real* beta, double eps, double mom,
                            real* run_mean, real* run_var, real* mean, real* inv_std, real* out,
                            Py_ssize_t m, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t c1, double* work) noexcept nogil:
    cdef Py_ssize_t w = c1 - c0
    cdef double* mu = work             # running mean, relative to the first row k
    cdef double* m2 = work + w         # running centred sum of squares
    cdef double* sd = work + 2 * w     # sqrt(var + eps)
    cdef real* mh = <real*>(work + 3 * w)   # mean = mh + ml (ml = 0 for float64)
    cdef real* ml = mh + w
    cdef real* s = mh + 2 * w          # gamma * inv_std
    cdef real* b = mh + 3 * w          # beta
    cdef const real* k = Z + c0
    cdef Py_ssize_t i = 0, j, cnt = 0
    cdef double f
    for j in range(w):
        mu[j] = 0.0
        m2[j] = 0.0
    while i + 8 <= m:
        f = 8.0 / (cnt + 8)
        if real is float:
            bn_stats8_f(Z + i * n + c0, n, w, k, mu, m2, f, cnt * f)
        else:
            bn_stats8_d(Z + i * n + c0, n, w, k, mu, m2, f, cnt * f)
        cnt += 8
        i += 8
    while i < m:
        f = 1.0 / (cnt + 1)
        if real is float:
            bn_stats1_f(Z + i * n + c0, w, k, mu, m2, f, cnt * f)
        else:
            bn_stats1_d(Z + i * n + c0, w, k, mu, m2, f, cnt * f)
        cnt += 1
        i += 1
    if real is float:
        bn_fwd_finish_f(w, m, eps, mom, k, mu, m2, sd, gamma + c0, beta + c0, mean + c0, inv_std + c0,
                        run_mean + c0, run_var + c0, mh, ml, s, b)
    else:
        bn_fwd_finish_d(w, m, eps, mom, k, mu, m2, sd, gamma + c0, beta + c0, mean + c0, inv_std + c0,
                        run_mean + c0, run_var + c0, mh, ml, s, b)
    i = 0
    while i + 4 <= m:
        if real is float:
            bn_norm4_f(Z + i * n + c0, out + i * n + c0, n, w, mh, ml, s, b)
        else:
            bn_norm4_d(Z + i * n + c0, out + i * n + c0, n, w, mh, ml, s, b)
        i += 4
    while i < m:
        if real is float:
            bn_norm1_f(Z + i * n + c0, out + i * n + c0, w, mh, ml, s, b)
        else:
            bn_norm1_d(Z + i * n + c0, out + i * n + c0, w, mh, ml, s, b)
        i += 1


cdef tc_void backward_cols(const real* Z, const real* gamma, const real* mean, const real* inv_std,
                           const real* dout, real* dZ, real* dgamma, real* dbeta,
                           Py_ssize_t m, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t c1, double* work) noexcept nogil:
    cdef Py_ssize_t w = c1 - c0
    cdef double* sb = work             # sum(dout)
    cdef double* sg = work + w         # sum(dout * (z - mean))
    cdef real* k1 = <real*>(work + 2 * w)
    cdef real* k2 = k1 + w
    cdef real* k3 = k1 + 2 * w
    cdef const real* mu = mean + c0
    cdef Py_ssize_t i = 0, j
    for j in range(w):
        sb[j] = 0.0
        sg[j] = 0.0
    while i + 4 <= m:
        if real is float:
            bn_bsums4_f(Z + i * n + c0, dout + i * n + c0, n, w, mu, sb, sg)
        else:
            bn_bsums4_d(Z + i * n + c0, dout + i * n + c0, n, w, mu, sb, sg)
        i += 4
    while i < m:
        if real is float:
            bn_bsums1_f(Z + i * n + c0, dout + i * n + c0, w, mu, sb, sg)
        else:
            bn_bsums1_d(Z + i * n + c0, dout + i * n + c0, w, mu, sb, sg)
        i += 1
    if real is float:
        bn_bwd_finish_f(w, m, gamma + c0, inv_std + c0, sb, sg, dgamma + c0, dbeta + c0, k1, k2, k3)
    else:
        bn_bwd_finish_d(w, m, gamma + c0, inv_std + c0, sb, sg, dgamma + c0, dbeta + c0, k1, k2, k3)
    i = 0
    while i + 4 <= m:
        if real is float:
            bn_dz4_f(Z + i * n + c0, dout + i * n + c0, dZ + i * n + c0, n, w, mu, k1, k2, k3)
        else:
            bn_dz4_d(Z + i * n + c0, dout + i * n + c0, dZ + i * n + c0, n, w, mu, k1, k2, k3)
        i += 4
    while i < m:
        if real is float:
            bn_dz1_f(Z + i * n + c0, dout + i * n + c0, dZ + i * n + c0, w, mu, k1, k2, k3)
        else:
            bn_dz1_d(Z + i * n + c0, dout + i * n + c0, dZ + i * n + c0, w, mu, k1, k2, k3)
        i += 1


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


cdef Py_ssize_t bn_work_size(Py_ssize_t n) noexcept nogil:
    """float64 scratch the training passes need for n features, whatever the batch (at most all threads)."""
    return NWORK * (n + 16 * fastdl_max_threads())


cdef int bn_forward_train_c(const real* Z, const real* gamma, const real* beta, double eps, double mom,
                            real* run_mean, real* run_var, real* mean, real* inv_std, real* out,
                            Py_ssize_t m, Py_ssize_t n, double* scratch) noexcept nogil:
    # scratch: bn_work_size(n) float64 from the caller (the epoch executor), or NULL: allocated here
    cdef int nt = col_threads(m, n)
    cdef Py_ssize_t per = chunk_size(n, nt), c, c0
    cdef double* work = scratch
    if work == NULL:
        work = <double*>malloc(NWORK * (n + 16 * nt) * sizeof(double))
        if work == NULL:
            return -1
    if nt == 1:
        fwd_train_cols(Z, gamma, beta, eps, mom, run_mean, run_var, mean, inv_std, out, m, n, 0, n, work)
    else:
        for c in prange(nt, num_threads=nt, schedule='static'):
            c0 = c * per
            if c0 < n:
                fwd_train_cols(Z, gamma, beta, eps, mom, run_mean, run_var, mean, inv_std, out, m, n,
                               c0, min(n, c0 + per), work + NWORK * (c0 + 16 * c))
    if scratch == NULL:
        free(work)
    return 0


cdef int bn_backward_c(const real* Z, const real* gamma, const real* mean, const real* inv_std,
                       const real* dout, real* dZ, real* dgamma, real* dbeta, Py_ssize_t m, Py_ssize_t n,
                       double* scratch) noexcept nogil:
    cdef int nt = col_threads(m, n)
    cdef Py_ssize_t per = chunk_size(n, nt), c, c0
    cdef double* work = scratch
    if work == NULL:
        work = <double*>malloc(NWORK * (n + 16 * nt) * sizeof(double))
        if work == NULL:
            return -1
    if nt == 1:
        backward_cols(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta, m, n, 0, n, work)
    else:
        for c in prange(nt, num_threads=nt, schedule='static'):
            c0 = c * per
            if c0 < n:
                backward_cols(Z, gamma, mean, inv_std, dout, dZ, dgamma, dbeta, m, n, c0, min(n, c0 + per),
                              work + NWORK * (c0 + 16 * c))
    if scratch == NULL:
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
        raise unsupported("batchnorm_forward_train")
    with nogil:
        if t == cnp.NPY_FLOAT:
            rc = bn_forward_train_c(<float*>data(Z), <float*>data(gamma), <float*>data(beta), eps, momentum,
                                <float*>data(running_mean), <float*>data(running_var), <float*>data(mean),
                                <float*>data(inv_std), <float*>data(out), m, n, NULL)
        else:
            rc = bn_forward_train_c(<double*>data(Z), <double*>data(gamma), <double*>data(beta), eps, momentum,
                                <double*>data(running_mean), <double*>data(running_var), <double*>data(mean),
                                <double*>data(inv_std), <double*>data(out), m, n, NULL)
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
        raise unsupported("batchnorm_forward_infer")
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
        raise unsupported("batchnorm_backward")
    with nogil:
        if t == cnp.NPY_FLOAT:
            rc = bn_backward_c(<float*>data(Z), <float*>data(gamma), <float*>data(mean), <float*>data(inv_std),
                           <float*>data(dout), <float*>data(dZ), <float*>data(dgamma), <float*>data(dbeta), m, n, NULL)
        else:
            rc = bn_backward_c(<double*>data(Z), <double*>data(gamma), <double*>data(mean), <double*>data(inv_std),
                           <double*>data(dout), <double*>data(dZ), <double*>data(dgamma), <double*>data(dbeta),
                           m, n, NULL)
    if rc != 0:
        raise MemoryError()
