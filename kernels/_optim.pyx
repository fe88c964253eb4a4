# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: extra_compile_args = -fno-math-errno
"""Optimiser steps over flat 1-D arrays (one fused pass each) and sum_squares.

The signatures are fastdl.plan's: the step's scalars ``c1`` / ``c2`` (learning
rate and bias corrections, :func:`fastdl.plan.step_coefficients`) come from
the caller; every scalar is cast once to the array dtype, so a float32 loop
stays float32. ``opt_step_c`` (exported through ``_optim.pxd``) is the one
nogil entry of every kind, called by these functions and by the epoch
executor alike.
Steps are memory bound (SGD and momentum purely so; RMSprop and Adam add a
square root and a division per element); above a per-kernel number of
elements per thread the arrays are cut into one contiguous chunk per thread.

``sum_squares`` accumulates in float64 over fixed blocks of ``BLOCK``
elements (blocks in parallel, partial sums added in block order): the result
is the same whatever the number of threads.
"""
cimport numpy as cnp
from libc.stdint cimport int64_t
from cython.parallel cimport prange
from libc.stdlib cimport free, malloc

from _kernel_common cimport chunk_size, data, dim, is_float, nthreads, r_sqrt, real, row_sumsq, rtype, tc_void, wtype
from _kernel_common cimport unsupported

import numpy as np


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


cdef tc_void nesterov_chunk(real* p, const real* g, real* v, Py_ssize_t n, real mu, real c1,
                            bint nesterov) noexcept nogil:
    # scikit-learn's SGD momentum: v = mu*v - c1*g; p += mu*v - c1*g (Nesterov) or p += v
    cdef Py_ssize_t i
    cdef real vi, gi
    if nesterov:
        for i in range(n):
            gi = g[i]
            vi = mu * v[i] - c1 * gi
            v[i] = vi
            p[i] = p[i] + (mu * vi - c1 * gi)
    else:
        for i in range(n):
            vi = mu * v[i] - c1 * g[i]
            v[i] = vi
            p[i] = p[i] + vi


cdef tc_void sumsq_blocks(const real* x, Py_ssize_t n, Py_ssize_t b0, Py_ssize_t b1, double* partial) noexcept nogil:
    cdef Py_ssize_t b, lo
    for b in range(b0, b1):
        lo = b * BLOCK
        partial[b] = row_sumsq(x + lo, min(<Py_ssize_t>BLOCK, n - lo))


# ------------------------------------------------------------------ drivers
# One contiguous chunk per thread; ``kind`` is fastdl.plan's OPT_* code.

cdef enum:
    OPT_SGD = 0
    OPT_MOMENTUM = 1
    OPT_RMSPROP = 2
    OPT_ADAM = 3
    OPT_CLASSICAL_MOMENTUM = 4
    OPT_NESTEROV = 5


cdef inline void run_chunk(int kind, real* p, const real* g, real* v, real* s, Py_ssize_t lo, Py_ssize_t n,
                           real beta1, real omb1, real beta2, real omb2, real eps, real c1,
                           real c2) noexcept nogil:
    if kind == OPT_SGD:
        sgd_chunk(p + lo, g + lo, n, c1)
    elif kind == OPT_MOMENTUM:
        momentum_chunk(p + lo, g + lo, v + lo, n, beta1, omb1, c1)
    elif kind == OPT_RMSPROP:
        rmsprop_chunk(p + lo, g + lo, s + lo, n, c1, beta2, omb2, eps)
    elif kind == OPT_ADAM:
        adam_chunk(p + lo, g + lo, v + lo, s + lo, n, beta1, omb1, beta2, omb2, c1, c2, eps)
    else:
        nesterov_chunk(p + lo, g + lo, v + lo, n, beta1, c1, kind == OPT_NESTEROV)


cdef void opt_step_c(int kind, real* p, const real* g, real* v, real* s, Py_ssize_t n, double beta1,
                     double beta2, double eps, double c1, double c2) noexcept nogil:
    """One optimiser step of kind ``kind`` (plan.OPT_*); c1/c2 from plan.step_coefficients.

    The scalars are formed in float64 and cast once to the array dtype (a float32 loop stays float32).
    """
    cdef int nt = nthreads(n, GRAIN_SQRT if (kind == OPT_RMSPROP or kind == OPT_ADAM) else GRAIN_STREAM)
    cdef Py_ssize_t per, lo, k
    cdef real b1 = <real>beta1, o1 = <real>(1.0 - beta1), b2 = <real>beta2, o2 = <real>(1.0 - beta2)
    cdef real e = <real>eps, k1 = <real>c1, k2 = <real>c2
    if nt == 1:
        run_chunk(kind, p, g, v, s, 0, n, b1, o1, b2, o2, e, k1, k2)
        return
    per = chunk_size(n, nt)
    for k in prange(nt, num_threads=nt, schedule='static'):
        lo = k * per
        if lo < n:
            run_chunk(kind, p, g, v, s, lo, min(per, n - lo), b1, o1, b2, o2, e, k1, k2)


cdef inline void update_task(int kind, real* p, const real* g, real* v, real* s, const int64_t* task, real b1,
                             real o1, real b2, real o2, real e, real k1, real k2, double* partial) noexcept nogil:
    cdef Py_ssize_t lo = task[0], ln = task[1]
    run_chunk(kind, p, g, v, s, lo, ln, b1, o1, b2, o2, e, k1, k2)
    if task[2] >= 0:
        if task[3]:
            sumsq_blocks(p + lo, ln, 0, 1, partial + task[2])
        else:
            partial[task[2]] = row_sumsq(p + lo, ln)


cdef void opt_step_ssq_c(int kind, real* p, const real* g, real* v, real* s, Py_ssize_t n, double beta1,
                         double beta2, double eps, double c1, double c2, const int64_t* tasks, Py_ssize_t n_tasks,
                         const int64_t* dense, int n_dense, double* partial, double* ss) noexcept nogil:
    """``opt_step_c`` that also returns ``ss`` = sum over the Dense weights of sum_squares(W) AFTER the update.

    The L2 term of the next step, without another pass over W from memory: each block of a W is
    updated and then summed (``row_sumsq``) while it is still in cache. The sum is bit-identical
    to ``((0.0 + sum_squares_c(W_0)) + sum_squares_c(W_1)) + ...`` (the per-layer executor's):
    the same BLOCK-element blocks, the same ``row_sumsq``, partials added in block order.
    ``tasks`` (n_tasks, 4): [start, length, block index into ``partial`` or -1, 1 if the block's W
    has several blocks] covering params, made by :func:`update_tasks`; ``dense`` (n_dense, 2):
    [start, stop) of each W. Each block is summed by the very function ``sum_squares_c`` uses for
    it (the cloned ``sumsq_blocks`` for multi-block arrays, the inline ``row_sumsq`` otherwise), so
    the same instructions (FMA or not) produce it.
    """
    cdef int nt = nthreads(n, GRAIN_SQRT if (kind == OPT_RMSPROP or kind == OPT_ADAM) else GRAIN_STREAM)
    cdef Py_ssize_t t, lo, ln, bi, d, b, nb, k = 0
    cdef real b1 = <real>beta1, o1 = <real>(1.0 - beta1), b2 = <real>beta2, o2 = <real>(1.0 - beta2)
    cdef real e = <real>eps, k1 = <real>c1, k2 = <real>c2
    cdef double total, acc = 0.0
    if nt == 1:
        for t in range(n_tasks):
            update_task(kind, p, g, v, s, tasks + 4 * t, b1, o1, b2, o2, e, k1, k2, partial)
    else:
        for t in prange(n_tasks, num_threads=nt, schedule='dynamic'):
            update_task(kind, p, g, v, s, tasks + 4 * t, b1, o1, b2, o2, e, k1, k2, partial)
    for d in range(n_dense):
        nb = (dense[2 * d + 1] - dense[2 * d] + BLOCK - 1) // BLOCK
        total = 0.0
        for b in range(nb):
            total += partial[k + b]
        k += nb
        acc = acc + total
    ss[0] = acc


def update_tasks(n_params: int, dense) -> np.ndarray:
    """The (start, length, block, multi) tasks of :func:`opt_step_ssq_c` for params of ``n_params`` elements.

    ``dense``: (k, 2) [start, stop) of the Dense weights, ascending and disjoint. Each W is cut into
    BLOCK-element blocks (numbered in order: the partials' index); the gaps (biases, BatchNorm
    parameters) are split into pieces of at most BLOCK elements too (load balance).
    """
    rows, pos, blk = [], 0, 0
    for a, b in np.asarray(dense, np.int64).reshape(-1, 2).tolist():
        if a < pos or b < a or b > n_params:
            raise ValueError(f"Dense weight range [{a}, {b}) is not ascending/disjoint within {n_params} params")
        for lo in range(pos, a, BLOCK):
            rows.append((lo, min(BLOCK, a - lo), -1, 0))
        for lo in range(a, b, BLOCK):
            rows.append((lo, min(BLOCK, b - lo), blk, int(b - a > BLOCK)))
            blk += 1
        pos = b
    for lo in range(pos, n_params, BLOCK):
        rows.append((lo, min(BLOCK, n_params - lo), -1, 0))
    return np.array(rows, np.int64).reshape(-1, 4)


cdef Py_ssize_t ssq_partials(Py_ssize_t n) noexcept nogil:
    """float64 partial sums sum_squares_c needs for n elements."""
    return (n + BLOCK - 1) // BLOCK


cdef int sum_squares_c(const real* x, Py_ssize_t n, double* out, double* scratch) noexcept nogil:
    # scratch: ssq_partials(n) float64 from the caller, or NULL (allocated here)
    cdef Py_ssize_t nb = (n + BLOCK - 1) // BLOCK
    cdef int nt = nthreads(nb, GRAIN_STREAM // BLOCK)
    cdef double* partial = scratch
    cdef double total = 0.0
    cdef Py_ssize_t b, per, k
    if nb <= 1:
        out[0] = row_sumsq(x, n)
        return 0
    if partial == NULL:
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
    if scratch == NULL:
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


cdef void step_any(int t, int kind, params, grads, v, s, Py_ssize_t n, double beta1, double beta2, double eps,
                   double c1, double c2) noexcept:
    cdef void* pv = data(v) if v is not None else NULL
    cdef void* ps = data(s) if s is not None else NULL
    with nogil:
        if t == cnp.NPY_FLOAT:
            opt_step_c(kind, <float*>data(params), <float*>data(grads), <float*>pv, <float*>ps, n, beta1, beta2,
                       eps, c1, c2)
        else:
            opt_step_c(kind, <double*>data(params), <double*>data(grads), <double*>pv, <double*>ps, n, beta1,
                       beta2, eps, c1, c2)


def sgd_step(params, grads, double lr):
    """``params -= lr * grads``."""
    cdef Py_ssize_t n = 0
    cdef int t = flat_type(params, grads, &n)
    if t < 0:
        raise unsupported("sgd_step")
    step_any(t, OPT_SGD, params, grads, None, None, n, 0.0, 0.0, 0.0, lr, 0.0)


def momentum_step(params, grads, v, double beta, double c1):
    """``v = beta*v + (1-beta)*grads``; ``params -= c1 * v`` (c1 = lr, or lr/(1-beta**t) with bias correction)."""
    cdef Py_ssize_t n = 0
    cdef int t = flat_type(params, grads, &n)
    if t < 0 or not state_ok(v, t, n):
        raise unsupported("momentum_step")
    step_any(t, OPT_MOMENTUM, params, grads, v, None, n, beta, 0.0, 0.0, c1, 0.0)


def rmsprop_step(params, grads, s, double lr, double beta2, double eps):
    """``s = beta2*s + (1-beta2)*grads**2``; ``params -= lr * grads / (sqrt(s) + eps)``."""
    cdef Py_ssize_t n = 0
    cdef int t = flat_type(params, grads, &n)
    if t < 0 or not state_ok(s, t, n):
        raise unsupported("rmsprop_step")
    step_any(t, OPT_RMSPROP, params, grads, None, s, n, 0.0, beta2, eps, lr, 0.0)


def adam_step(params, grads, v, s, double beta1, double beta2, double eps, double c1, double c2):
    """Adam: ``v``, ``s`` updated; ``params -= c1 * v / (sqrt(c2 * s) + eps)`` (c1 = lr/(1-beta1**t), c2 = 1/(1-beta2**t))."""
    cdef Py_ssize_t n = 0
    cdef int t = flat_type(params, grads, &n)
    if t < 0 or not state_ok(v, t, n) or not state_ok(s, t, n):
        raise unsupported("adam_step")
    step_any(t, OPT_ADAM, params, grads, v, s, n, beta1, beta2, eps, c1, c2)


def nesterov_step(params, grads, v, double mu, double c1, bint nesterov):
    """scikit-learn's momentum: ``v = mu*v - c1*grads``; ``params += mu*v - c1*grads`` (Nesterov) or ``+= v``."""
    cdef Py_ssize_t n = 0
    cdef int t = flat_type(params, grads, &n)
    if t < 0 or not state_ok(v, t, n):
        raise unsupported("nesterov_step")
    step_any(t, OPT_NESTEROV if nesterov else OPT_CLASSICAL_MOMENTUM, params, grads, v, None, n, mu, 0.0, 0.0,
             c1, 0.0)


cdef extern from "fastdl_finite.h":
    int fdl_any_nonfinite_f32(const float* x, Py_ssize_t n) noexcept nogil
    int fdl_any_nonfinite_f64(const double* x, Py_ssize_t n) noexcept nogil


cdef int any_nonfinite_c(const real* x, Py_ssize_t n) noexcept nogil:
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
        raise unsupported("all_finite")
    with nogil:
        if t == cnp.NPY_FLOAT:
            bad = any_nonfinite_c(<float*>data(x), dim(x, 0))
        else:
            bad = any_nonfinite_c(<double*>data(x), dim(x, 0))
    return not bad


def sum_squares(x):
    """``sum(x**2)`` accumulated in float64 (the L2 cost)."""
    cdef int t = rtype(x, 1)
    cdef double out = 0.0
    cdef int rc
    if not is_float(t):
        raise unsupported("sum_squares")
    with nogil:
        if t == cnp.NPY_FLOAT:
            rc = sum_squares_c(<float*>data(x), dim(x, 0), &out, NULL)
        else:
            rc = sum_squares_c(<double*>data(x), dim(x, 0), &out, NULL)
    if rc != 0:
        raise MemoryError()
    return out
