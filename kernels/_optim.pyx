# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: extra_compile_args = -fno-math-errno
"""Optimiser steps over flat 1-D arrays (one fused pass each) and sum_squares.

Scalars (learning rate, betas, bias corrections) are computed once per call
in float64 and cast to the array dtype, so a float32 loop stays float32.
Steps are memory bound (SGD and momentum purely so; RMSprop and Adam add a
square root and a division per element); above a per-kernel number of
elements per thread the arrays are cut into one contiguous chunk per thread.

``sum_squares`` accumulates in float64 over fixed blocks of ``BLOCK``
elements (blocks in parallel, partial sums added in block order): the result
is the same whatever the number of threads.
"""
cimport numpy as cnp
from cython.parallel cimport prange
from libc.stdlib cimport free, malloc

from _kernel_common cimport chunk_size, data, dim, is_float, nthreads, r_sqrt, real, row_sumsq, rtype, tc_void, wtype

from fastdl.backends import reference as _ref

cnp.import_array()

cdef enum:
    # elements per thread below which a kernel runs serially (_kernel_common.pxd)
    GRAIN_STREAM = 524288  # SGD, momentum, sum_squares
    GRAIN_SQRT = 262144    # RMSprop, Adam
    BLOCK = 65536          # sum_squares block


# ------------------------------------------------------------------ chunk bodies

cdef tc_void sgd_chunk(real* p, const real* g, Py_ssize_t n, real lr) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        p[i] = p[i] - lr * g[i]


cdef tc_void momentum_chunk(real* p, const real* g, real* v, Py_ssize_t n, real beta, real omb,
                            real scale) noexcept nogil:
    cdef Py_ssize_t i
    cdef real vi
    for i in range(n):
        vi = beta * v[i] + omb * g[i]
        v[i] = vi
        p[i] = p[i] - scale * vi


cdef tc_void rmsprop_chunk(real* p, const real* g, real* s, Py_ssize_t n, real lr, real beta2, real omb2,
                           real eps) noexcept nogil:
    cdef Py_ssize_t i
    cdef real gi, si
    for i in range(n):
        gi = g[i]
        si = beta2 * s[i] + omb2 * gi * gi
        s[i] = si
        p[i] = p[i] - lr * gi / (r_sqrt(si) + eps)


cdef tc_void adam_chunk(real* p, const real* g, real* v, real* s, Py_ssize_t n, real beta1, real omb1,
                        real beta2, real omb2, real step, real inv_bc2, real eps) noexcept nogil:
    # p -= lr * v_hat / (sqrt(s_hat) + eps) with v_hat = v/bc1, s_hat = s/bc2 and step = lr/bc1
    cdef Py_ssize_t i
    cdef real gi, vi, si
    for i in range(n):
        gi = g[i]
        vi = beta1 * v[i] + omb1 * gi
        si = beta2 * s[i] + omb2 * gi * gi
        v[i] = vi
        s[i] = si
        p[i] = p[i] - step * vi / (r_sqrt(si * inv_bc2) + eps)


cdef tc_void sumsq_blocks(const real* x, Py_ssize_t n, Py_ssize_t b0, Py_ssize_t b1, double* partial) noexcept nogil:
    cdef Py_ssize_t b, lo
    for b in range(b0, b1):
        lo = b * BLOCK
        partial[b] = row_sumsq(x + lo, min(<Py_ssize_t>BLOCK, n - lo))


# ------------------------------------------------------------------ drivers
# One contiguous chunk per thread; ``which`` selects the update.

cdef enum:
    SGD = 0
    MOMENTUM = 1
    RMSPROP = 2
    ADAM = 3


cdef inline void run_chunk(int which, real* p, const real* g, real* v, real* s, Py_ssize_t lo, Py_ssize_t n,
                           real a, real b, real c, real d, real e, real f, real h) noexcept nogil:
    if which == SGD:
        sgd_chunk(p + lo, g + lo, n, a)
    elif which == MOMENTUM:
        momentum_chunk(p + lo, g + lo, v + lo, n, a, b, c)
    elif which == RMSPROP:
        rmsprop_chunk(p + lo, g + lo, s + lo, n, a, b, c, d)
    else:
        adam_chunk(p + lo, g + lo, v + lo, s + lo, n, a, b, c, d, e, f, h)


cdef void _step(int which, real* p, const real* g, real* v, real* s, Py_ssize_t n,
                real a, real b, real c, real d, real e, real f, real h) noexcept nogil:
    cdef int nt = nthreads(n, GRAIN_SQRT if which >= RMSPROP else GRAIN_STREAM)
    cdef Py_ssize_t per, lo, k
    if nt == 1:
        run_chunk(which, p, g, v, s, 0, n, a, b, c, d, e, f, h)
        return
    per = chunk_size(n, nt)
    for k in prange(nt, num_threads=nt, schedule='static'):
        lo = k * per
        if lo < n:
            run_chunk(which, p, g, v, s, lo, min(per, n - lo), a, b, c, d, e, f, h)


cdef int _sum_squares(const real* x, Py_ssize_t n, double* out) noexcept nogil:
    cdef Py_ssize_t nb = (n + BLOCK - 1) // BLOCK
    cdef int nt = nthreads(nb, GRAIN_STREAM // BLOCK)
    cdef double* partial
    cdef double total = 0.0
    cdef Py_ssize_t b, per, k
    if nb <= 1:
        out[0] = row_sumsq(x, n)
        return 0
    partial = <double*>malloc(nb * sizeof(double))
    if partial == NULL:
        return -1
    if nt == 1:
        sumsq_blocks(x, n, 0, nb, partial)
    else:
        per = (nb + nt - 1) // nt
        for k in prange(nt, num_threads=nt, schedule='static'):
            if k * per < nb:
                sumsq_blocks(x, n, k * per, min(nb, (k + 1) * per), partial)
    for b in range(nb):
        total += partial[b]
    free(partial)
    out[0] = total
    return 0


# ------------------------------------------------------------------ Python entry points

cdef inline int flat_type(params, grads, Py_ssize_t* n):
    """dtype of params/grads when both are writeable/readable 1-D arrays of one float dtype and length."""
    cdef int t = wtype(params, 1)
    if not (is_float(t) and rtype(grads, 1) == t and dim(grads, 0) == dim(params, 0)):
        return -1
    n[0] = dim(params, 0)
    return t


cdef inline bint state_ok(object a, int t, Py_ssize_t n):
    return wtype(a, 1) == t and dim(a, 0) == n


def sgd_step(params, grads, double lr):
    """``params -= lr * grads``."""
    cdef Py_ssize_t n = 0
    cdef int t = flat_type(params, grads, &n)
    if t < 0:
        return _ref.sgd_step(params, grads, lr)
    with nogil:
        if t == cnp.NPY_FLOAT:
            _step(SGD, <float*>data(params), <float*>data(grads), NULL, NULL, n, <float>lr, 0, 0, 0, 0, 0, 0)
        else:
            _step(SGD, <double*>data(params), <double*>data(grads), NULL, NULL, n, lr, 0, 0, 0, 0, 0, 0)


def momentum_step(params, grads, v, double lr, double beta, t, bias_correction):
    """``v = beta*v + (1-beta)*grads``; ``params -= lr/(1-beta**t) * v`` (or ``lr * v``)."""
    cdef Py_ssize_t n = 0
    cdef int ty = flat_type(params, grads, &n)
    cdef double scale
    if ty < 0 or not state_ok(v, ty, n):
        return _ref.momentum_step(params, grads, v, lr, beta, t, bias_correction)
    scale = lr / (1.0 - beta ** t) if bias_correction else lr
    with nogil:
        if ty == cnp.NPY_FLOAT:
            _step(MOMENTUM, <float*>data(params), <float*>data(grads), <float*>data(v), NULL, n,
                  <float>beta, <float>(1.0 - beta), <float>scale, 0, 0, 0, 0)
        else:
            _step(MOMENTUM, <double*>data(params), <double*>data(grads), <double*>data(v), NULL, n,
                  beta, 1.0 - beta, scale, 0, 0, 0, 0)


def rmsprop_step(params, grads, s, double lr, double beta2, double eps):
    """``s = beta2*s + (1-beta2)*grads**2``; ``params -= lr * grads / (sqrt(s) + eps)``."""
    cdef Py_ssize_t n = 0
    cdef int t = flat_type(params, grads, &n)
    if t < 0 or not state_ok(s, t, n):
        return _ref.rmsprop_step(params, grads, s, lr, beta2, eps)
    with nogil:
        if t == cnp.NPY_FLOAT:
            _step(RMSPROP, <float*>data(params), <float*>data(grads), NULL, <float*>data(s), n,
                  <float>lr, <float>beta2, <float>(1.0 - beta2), <float>eps, 0, 0, 0)
        else:
            _step(RMSPROP, <double*>data(params), <double*>data(grads), NULL, <double*>data(s), n,
                  lr, beta2, 1.0 - beta2, eps, 0, 0, 0)


def adam_step(params, grads, v, s, double lr, double beta1, double beta2, double eps, t):
    """Adam with bias correction (``t`` counts updates from 1)."""
    cdef Py_ssize_t n = 0
    cdef int ty = flat_type(params, grads, &n)
    cdef double step, inv_bc2
    if ty < 0 or not state_ok(v, ty, n) or not state_ok(s, ty, n):
        return _ref.adam_step(params, grads, v, s, lr, beta1, beta2, eps, t)
    step = lr / (1.0 - beta1 ** t)          # bias corrections, once per step
    inv_bc2 = 1.0 / (1.0 - beta2 ** t)
    with nogil:
        if ty == cnp.NPY_FLOAT:
            _step(ADAM, <float*>data(params), <float*>data(grads), <float*>data(v), <float*>data(s), n,
                  <float>beta1, <float>(1.0 - beta1), <float>beta2, <float>(1.0 - beta2), <float>step,
                  <float>inv_bc2, <float>eps)
        else:
            _step(ADAM, <double*>data(params), <double*>data(grads), <double*>data(v), <double*>data(s), n,
                  beta1, 1.0 - beta1, beta2, 1.0 - beta2, step, inv_bc2, eps)


cdef extern from "fastdl_finite.h":
    int fdl_any_nonfinite_f32(const float* x, Py_ssize_t n) noexcept nogil
    int fdl_any_nonfinite_f64(const double* x, Py_ssize_t n) noexcept nogil


cdef int _any_nonfinite(const real* x, Py_ssize_t n) noexcept nogil:
    # one contiguous part per thread above the streaming grain, like sum_squares
    cdef int nt = nthreads(n, GRAIN_STREAM)
    cdef Py_ssize_t per, k
    cdef int bad = 0
    if nt == 1:
        return fdl_any_nonfinite_f32(<float*>x, n) if real is float else fdl_any_nonfinite_f64(<double*>x, n)
    per = chunk_size(n, nt)
    for k in prange(nt, num_threads=nt, schedule='static'):
        if k * per < n:
            if real is float:
                bad |= fdl_any_nonfinite_f32(<float*>x + k * per, min(per, n - k * per))
            else:
                bad |= fdl_any_nonfinite_f64(<double*>x + k * per, min(per, n - k * per))
    return bad


def all_finite(x):
    """True if no element of the 1-D array is NaN or infinite."""
    cdef int t = rtype(x, 1)
    cdef int bad
    if not is_float(t):
        return _ref.all_finite(x)
    with nogil:
        if t == cnp.NPY_FLOAT:
            bad = _any_nonfinite(<float*>data(x), dim(x, 0))
        else:
            bad = _any_nonfinite(<double*>data(x), dim(x, 0))
    return not bad


def sum_squares(x):
    """``sum(x**2)`` accumulated in float64 (the L2 cost)."""
    cdef int t = rtype(x, 1)
    cdef double out = 0.0
    cdef int rc
    if not is_float(t):
        return _ref.sum_squares(x)
    with nogil:
        if t == cnp.NPY_FLOAT:
            rc = _sum_squares(<float*>data(x), dim(x, 0), &out)
        else:
            rc = _sum_squares(<double*>data(x), dim(x, 0), &out)
    if rc != 0:
        raise MemoryError()
    return out
