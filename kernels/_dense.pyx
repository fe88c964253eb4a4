# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Dense layers and standalone activations.

GEMMs go through ``fastdl._kernels._blas`` (row-major wrappers over the
BLAS chosen by :mod:`fastdl.backends.blas`: SciPy's OpenBLAS or MKL),
always called outside any OpenMP region. The
elementwise work around them is fused into one pass:

* forward: ``out`` is pre-filled with the bias rows and the GEMM accumulates
  onto it (``beta = 1``; with ``beta = 0`` BLAS would spend a pass zeroing
  ``out``), then one activation pass;
* backward: one pass writes ``dZ = dout * g'(out)`` and the column sums
  ``db`` (float64 accumulators); ``dW`` is pre-filled with ``l2_over_m * W``
  and the GEMM accumulates onto it.

The passes of the Dense kernels are serial: they cost a few percent of the
GEMMs (whose BLAS threads do the parallel work), and an OpenMP region next
to a BLAS call is harmful: with libgomp's default active wait its idle
workers spin for milliseconds on the cores OpenBLAS's threads need for the
next GEMM (measured on 2 cores: 128x784->512 forward+backward 2.4 ms with
serial passes, tens of ms with parallel ones), and with a passive wait each
region costs a wake-up. The standalone activation kernels run in parallel
above a size threshold.

Signatures and semantics: :mod:`fastdl.backends.contract`. Arguments outside
the fast path (other dtypes, non-contiguous arrays, mismatched shapes) are
handed to the reference kernel, which handles or rejects them.
"""
cimport numpy as cnp
from cython.parallel cimport prange
from libc.string cimport memcpy

from _kernel_common cimport (FASTDL_CLONES, FASTDL_HAVE_OPENMP, IDENTITY, RELU, SIGMOID, TANH, chunk_size, data, dim,
                             fastdl_max_threads, is_empty, is_float,
                             nthreads, r_relu, r_sigmoid, r_step, r_tanh, real, rtype, tc_void, wtype)
from _kernel_common cimport unsupported

from fastdl._kernels import _blas

cnp.import_array()

ctypedef void (*sgemm_rm_t)(int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                            int) noexcept nogil
ctypedef void (*dgemm_rm_t)(int, int, int, int, int, double, const double*, int, const double*, int, double,
                            double*, int) noexcept nogil

cdef sgemm_rm_t _sgemm_rm = <sgemm_rm_t><size_t>_blas.rowmajor_addresses()[0]
cdef dgemm_rm_t _dgemm_rm = <dgemm_rm_t><size_t>_blas.rowmajor_addresses()[1]
# precision=1: both operands rounded to bfloat16, float32 accumulation (MKL's bf16 GEMM or round + sgemm)
cdef sgemm_rm_t _bf16gemm_rm = <sgemm_rm_t><size_t>_blas.rowmajor_addresses()[2]
# the same GEMM on operands the caller has already rounded (the *_bf16_c cores below): no rounding copy
cdef sgemm_rm_t _bf16gemm_pre_rm = <sgemm_rm_t><size_t>_blas.rowmajor_addresses()[3]

cdef extern from "fastdl_bf16_pre.h" nogil:
    float fdl_bf16r(float f)
    void fdl_round_span(const float* s, float* d, size_t n)


def build_info():
    """How the Cython kernels were compiled: OpenMP, threads they may use, SIMD dispatch."""
    return {
        "openmp": bool(FASTDL_HAVE_OPENMP),
        "max_threads": fastdl_max_threads(),
        "simd_dispatch": bool(FASTDL_CLONES),   # AVX2 / AVX-512 clones chosen at load time
    }


cdef enum:
    CB = 2048           # column block of the dZ/db pass (float64 accumulators on the stack, 16 KB)
    # Elements per thread below which a standalone activation runs serially
    # (see _kernel_common.pxd, "Parallel thresholds").
    GRAIN_CHEAP = 524288  # memory-bound passes (ReLU, identity, every derivative)
    GRAIN_EXP = 262144    # tanh / sigmoid forward (vectorised exp)
    INT_MAX = 2147483647  # BLAS dimensions are C ints


cdef inline Py_ssize_t grain(int act) noexcept nogil:
    return GRAIN_EXP if (act == TANH or act == SIGMOID) else GRAIN_CHEAP


# ------------------------------------------------------------------ BLAS

cdef inline void gemm(bint trans_a, bint trans_b, int M, int N, int K, real alpha, const real* A, int lda,
                      const real* B, int ldb, real beta, real* C, int ldc, int precision) noexcept nogil:
    """Row-major ``C (M,N) = alpha * op(A) @ op(B) + beta * C``; ``ld*`` are row strides.

    ``precision`` 1 (float32 only; the entry points reject float64): bfloat16 operands.
    """
    if real is float:
        if precision == 1:
            _bf16gemm_rm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
        else:
            _sgemm_rm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
    else:
        _dgemm_rm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)


# ------------------------------------------------------------------ elementwise chunks

cdef inline void act_span(const real* z, real* out, Py_ssize_t n, int act) noexcept nogil:
    cdef Py_ssize_t i
    if act == RELU:
        for i in range(n):
            out[i] = r_relu(z[i])
    elif act == TANH:
        for i in range(n):
            out[i] = r_tanh(z[i])
    elif act == SIGMOID:
        for i in range(n):
            out[i] = r_sigmoid(z[i])
    elif out != z:
        memcpy(out, z, n * sizeof(real))


cdef inline void grad_span(const real* a, const real* d, real* o, Py_ssize_t n, int act) noexcept nogil:
    """``o = d * g'(a)``, the derivative taken from the activation output ``a``."""
    cdef Py_ssize_t i
    cdef real zero = 0, one = 1
    if act == RELU:
        for i in range(n):
            o[i] = d[i] * r_step(a[i])
    elif act == TANH:
        for i in range(n):
            o[i] = d[i] * (one - a[i] * a[i])
    elif act == SIGMOID:
        for i in range(n):
            o[i] = d[i] * (a[i] * (one - a[i]))
    elif o != d:
        memcpy(o, d, n * sizeof(real))


cdef tc_void act_chunk(const real* z, real* out, Py_ssize_t n, int act) noexcept nogil:
    act_span(z, out, n, act)


cdef tc_void grad_chunk(const real* a, const real* d, real* o, Py_ssize_t n, int act) noexcept nogil:
    grad_span(a, d, o, n, act)


cdef tc_void scale_chunk(const real* x, real* out, Py_ssize_t n, real s) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = s * x[i]


cdef tc_void axpy_chunk(const real* x, real* out, Py_ssize_t n, real s) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = out[i] + s * x[i]


cdef tc_void fill_rows_chunk(real* out, const real* b, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(r0, r1):
        memcpy(out + i * n, b, n * sizeof(real))


cdef tc_void grad_colsum_chunk(const real* A, const real* dA, real* dZ, real* db, Py_ssize_t m,
                               Py_ssize_t n, Py_ssize_t c0, Py_ssize_t c1, int act) noexcept nogil:
    """Columns [c0, c1) of ``dZ = dA * g'(A)`` and ``db = dZ.sum(0)`` (float64 sums)."""
    cdef double acc[CB]
    cdef Py_ssize_t i, j, b0, w, off
    cdef const real* z
    b0 = c0
    while b0 < c1:
        w = c1 - b0 if c1 - b0 < CB else CB
        for j in range(w):
            acc[j] = 0.0
        for i in range(m):
            off = i * n + b0
            grad_span(A + off, dA + off, dZ + off, w, act)
            z = dZ + off
            for j in range(w):
                acc[j] += z[j]
        for j in range(w):
            db[b0 + j] = <real>acc[j]
        b0 += w


# ------------------------------------------------------------------ parallel drivers

cdef void activation_forward_c(const real* z, real* out, Py_ssize_t n, int act) noexcept nogil:
    cdef int nt = nthreads(n, grain(act))
    cdef Py_ssize_t per, lo, c
    if nt == 1:
        act_chunk(z, out, n, act)
        return
    per = chunk_size(n, nt)
    for c in prange(nt, num_threads=nt, schedule='static'):
        lo = c * per
        if lo < n:
            act_chunk(z + lo, out + lo, min(per, n - lo), act)


cdef void activation_backward_c(const real* a, const real* d, real* o, Py_ssize_t n, int act) noexcept nogil:
    cdef int nt = nthreads(n, grain(act))
    cdef Py_ssize_t per, lo, c
    if nt == 1:
        grad_chunk(a, d, o, n, act)
        return
    per = chunk_size(n, nt)
    for c in prange(nt, num_threads=nt, schedule='static'):
        lo = c * per
        if lo < n:
            grad_chunk(a + lo, d + lo, o + lo, min(per, n - lo), act)


# ------------------------------------------------------------------ fused-type bodies

cdef void dense_forward_c(const real* A, const real* W, const real* b, bint has_b, int act, real* out,
                          int m, int n_in, int n_out, int precision) noexcept nogil:
    cdef real one = 1, zero = 0
    if has_b:
        fill_rows_chunk(out, b, 0, m, n_out)
        gemm(False, False, m, n_out, n_in, one, A, n_in, W, n_out, one, out, n_out, precision)
    else:
        gemm(False, False, m, n_out, n_in, one, A, n_in, W, n_out, zero, out, n_out, precision)
    if act != IDENTITY:
        act_chunk(out, out, <Py_ssize_t>m * n_out, act)


cdef void dense_backward_c(const real* A, const real* W, const real* out, const real* dout, int act,
                           double l2, real* dZ, real* dW, real* db, bint has_db, real* dA, bint has_dA,
                           int m, int n_in, int n_out, int precision) noexcept nogil:
    cdef real one = 1, zero = 0
    if has_db:
        grad_colsum_chunk(out, dout, dZ, db, m, n_out, 0, n_out, act)
    elif act != IDENTITY or dZ != dout:
        grad_chunk(out, dout, dZ, <Py_ssize_t>m * n_out, act)
    if l2 != 0.0 and precision == 0:
        scale_chunk(W, dW, <Py_ssize_t>n_in * n_out, <real>l2)
        gemm(True, False, n_in, n_out, m, one, A, n_in, dZ, n_out, one, dW, n_out, precision)
    else:
        gemm(True, False, n_in, n_out, m, one, A, n_in, dZ, n_out, zero, dW, n_out, precision)
        if l2 != 0.0:   # bf16: the product first, then the float32 weight-decay term (as the reference)
            axpy_chunk(W, dW, <Py_ssize_t>n_in * n_out, <real>l2)
    if has_dA:
        gemm(False, True, m, n_in, n_out, one, dZ, n_out, W, n_out, zero, dA, n_in, precision)


# ------------------------------------------------------------------ bf16 with operands rounded once

cdef enum:
    RB = 4096           # elements per block of the fused activation + rounding pass (L1-resident)


cdef void round_bf16_c(const float* src, float* dst, Py_ssize_t n) noexcept nogil:
    """``dst = round_bf16(src)`` (nearest even, as float32; ``dst`` may equal ``src``)."""
    fdl_round_span(src, dst, <size_t>n)


cdef tc_void grad_colsum_round(const float* A, const float* dA, float* dZr, float* db, Py_ssize_t m,
                               Py_ssize_t n, int act) noexcept nogil:
    """``grad_colsum_chunk`` (all columns) writing ``round_bf16(dZ)``: ``db`` sums the UNROUNDED dZ.

    ``dZr`` may equal ``dA`` (each element is read before it is overwritten)."""
    cdef double acc[CB]
    cdef float row[CB]
    cdef Py_ssize_t i, j, b0, w, off
    b0 = 0
    while b0 < n:
        w = n - b0 if n - b0 < CB else CB
        for j in range(w):
            acc[j] = 0.0
        for i in range(m):
            off = i * n + b0
            grad_span(A + off, dA + off, row, w, act)
            for j in range(w):
                acc[j] += row[j]
            fdl_round_span(row, dZr + off, <size_t>w)
        for j in range(w):
            db[b0 + j] = <float>acc[j]
        b0 += w


cdef void dense_forward_bf16_c(const float* A, float* Ar, bint round_in, const float* Wr, const float* b,
                               bint has_b, int act, float* out, float* outr, int m, int n_in,
                               int n_out) noexcept nogil:
    """``dense_forward_c`` with precision 1, each operand rounded once (docs/spec.md section 13).

    ``Wr``: ``round_bf16(W)`` (rounded by the caller once per step). ``Ar``: ``round_bf16(A)``, written
    here when ``round_in`` (else the producer wrote it: ``outr`` of the previous Dense) and kept for dW.
    ``outr`` (or NULL): where ``round_bf16(out)`` goes (the next Dense's ``Ar``), in the activation pass.
    The numbers are those of ``dense_forward_c(..., precision=1)``.
    """
    cdef float one = 1, zero = 0
    cdef Py_ssize_t n = <Py_ssize_t>m * n_out, lo, w
    if round_in:
        fdl_round_span(A, Ar, <size_t>m * n_in)
    if has_b:
        fill_rows_chunk(out, b, 0, m, n_out)
        _bf16gemm_pre_rm(False, False, m, n_out, n_in, one, Ar, n_in, Wr, n_out, one, out, n_out)
    else:
        _bf16gemm_pre_rm(False, False, m, n_out, n_in, one, Ar, n_in, Wr, n_out, zero, out, n_out)
    if outr == NULL:
        if act != IDENTITY:
            act_chunk(out, out, n, act)
        return
    lo = 0
    while lo < n:     # the activation and the rounding of each block while it is in L1
        w = n - lo if n - lo < RB else RB
        if act != IDENTITY:   # the tc_void chunk (SIMD clone) as in dense_forward_c: the same bits
            act_chunk(out + lo, out + lo, w, act)
        fdl_round_span(out + lo, outr + lo, <size_t>w)
        lo += w


cdef void dense_backward_bf16_c(const float* Ar, const float* W, const float* Wr, const float* out,
                                float* dout, int act, double l2, float* dZr, float* dW, float* db, bint has_db,
                                float* dA, bint has_dA, int m, int n_in, int n_out) noexcept nogil:
    """``dense_backward_c`` with precision 1, each operand rounded once (docs/spec.md section 13).

    ``Ar`` / ``Wr``: the rounded input and weights of the forward. ``dZr`` receives ``round_bf16(dZ)``
    (``db`` is the sum of the unrounded dZ), the one operand of both GEMMs; it may equal ``dout``. The
    weight-decay term ``l2 * W`` (float32 ``W``) is added to the product afterwards. The numbers are
    those of ``dense_backward_c(..., precision=1)``.
    """
    cdef float one = 1, zero = 0
    cdef Py_ssize_t n = <Py_ssize_t>m * n_out, lo, w
    cdef float row[RB]
    if has_db:
        grad_colsum_round(out, dout, dZr, db, m, n_out, act)
    else:
        lo = 0
        while lo < n:
            w = n - lo if n - lo < RB else RB
            grad_chunk(out + lo, dout + lo, row, w, act)   # tc_void, as dense_backward_c: the same bits
            fdl_round_span(row, dZr + lo, <size_t>w)
            lo += w
    _bf16gemm_pre_rm(True, False, n_in, n_out, m, one, Ar, n_in, dZr, n_out, zero, dW, n_out)
    if l2 != 0.0:
        axpy_chunk(W, dW, <Py_ssize_t>n_in * n_out, <float>l2)
    if has_dA:
        _bf16gemm_pre_rm(False, True, m, n_in, n_out, one, dZr, n_out, Wr, n_out, zero, dA, n_in)


# ------------------------------------------------------------------ Python entry points

cdef int check_precision(int precision, int t) except -1:
    if precision == 0:
        return 0
    if precision == 1:
        if t == cnp.NPY_DOUBLE:
            raise ValueError("precision=1 (bfloat16 GEMMs) needs float32 arrays; float64 models train in fp32")
        return 0
    raise ValueError(f"precision must be 0 (float32 GEMMs) or 1 (bfloat16 GEMMs), got {precision}")


def dense_forward(A_prev, W, b, int act, out, int precision=0):
    """``out = g(A_prev @ W + b)`` (see fastdl.backends.contract).

    ``precision`` 1 (float32 only): the GEMM takes bfloat16-rounded operands, float32 accumulation.
    """
    cdef int t = rtype(A_prev, 2)
    cdef Py_ssize_t m, n_in, n_out
    cdef bint has_b
    check_precision(precision, t)
    if not (is_float(t) and rtype(W, 2) == t and wtype(out, 2) == t and 0 <= act <= 3):
        raise unsupported("dense_forward")
    m = dim(A_prev, 0)
    n_in = dim(A_prev, 1)
    n_out = dim(W, 1)
    has_b = not is_empty(b)
    if (dim(W, 0) != n_in or dim(out, 0) != m or dim(out, 1) != n_out
            or (has_b and not (rtype(b, 1) == t and dim(b, 0) == n_out))
            or m > INT_MAX or n_in > INT_MAX or n_out > INT_MAX):
        raise unsupported("dense_forward")
    with nogil:
        if t == cnp.NPY_FLOAT:
            dense_forward_c(<float*>data(A_prev), <float*>data(W), <float*>data(b) if has_b else NULL, has_b,
                           act, <float*>data(out), <int>m, <int>n_in, <int>n_out, precision)
        else:
            dense_forward_c(<double*>data(A_prev), <double*>data(W), <double*>data(b) if has_b else NULL, has_b,
                           act, <double*>data(out), <int>m, <int>n_in, <int>n_out, 0)


def dense_backward(A_prev, W, out, dout, int act, double l2_over_m, dZ, dW, db, dA_prev, int precision=0):
    """``dZ = dout*g'(out)``, ``dW = A_prev.T@dZ + l2_over_m*W``, ``db``, ``dA_prev = dZ@W.T``.

    ``precision`` 1 (float32 only): both GEMMs take bfloat16-rounded operands (float32 accumulation);
    the weight-decay term is added to the product afterwards, in float32.
    """
    cdef int t = rtype(A_prev, 2)
    cdef Py_ssize_t m, n_in, n_out
    cdef bint has_db, has_dA
    check_precision(precision, t)
    if not (is_float(t) and rtype(W, 2) == t and rtype(out, 2) == t and rtype(dout, 2) == t
            and wtype(dZ, 2) == t and wtype(dW, 2) == t and 0 <= act <= 3):
        raise unsupported("dense_backward")
    m = dim(A_prev, 0)
    n_in = dim(A_prev, 1)
    n_out = dim(W, 1)
    has_db = not is_empty(db)
    has_dA = not is_empty(dA_prev)
    if (dim(W, 0) != n_in or dim(out, 0) != m or dim(out, 1) != n_out or dim(dout, 0) != m
            or dim(dout, 1) != n_out or dim(dZ, 0) != m or dim(dZ, 1) != n_out
            or dim(dW, 0) != n_in or dim(dW, 1) != n_out
            or (has_db and not (wtype(db, 1) == t and dim(db, 0) == n_out))
            or (has_dA and not (wtype(dA_prev, 2) == t and dim(dA_prev, 0) == m and dim(dA_prev, 1) == n_in))
            or m > INT_MAX or n_in > INT_MAX or n_out > INT_MAX):
        raise unsupported("dense_backward")
    with nogil:
        if t == cnp.NPY_FLOAT:
            dense_backward_c(<float*>data(A_prev), <float*>data(W), <float*>data(out), <float*>data(dout), act,
                            l2_over_m, <float*>data(dZ), <float*>data(dW),
                            <float*>data(db) if has_db else NULL, has_db,
                            <float*>data(dA_prev) if has_dA else NULL, has_dA, <int>m, <int>n_in, <int>n_out,
                             precision)
        else:
            dense_backward_c(<double*>data(A_prev), <double*>data(W), <double*>data(out), <double*>data(dout), act,
                            l2_over_m, <double*>data(dZ), <double*>data(dW),
                            <double*>data(db) if has_db else NULL, has_db,
                            <double*>data(dA_prev) if has_dA else NULL, has_dA, <int>m, <int>n_in, <int>n_out,
                             0)


def _f32(a, str name, Py_ssize_t rows, Py_ssize_t cols, bint writeable):
    if not (wtype(a, 2) if writeable else rtype(a, 2)) == cnp.NPY_FLOAT or dim(a, 0) != rows or dim(a, 1) != cols:
        raise ValueError(f"{name} must be a C-contiguous{' writeable' if writeable else ''} float32 array of "
                         f"shape ({rows}, {cols})")


def round_bf16(src, dst):
    """``dst = round_bf16(src)`` (nearest even, as float32) on C-contiguous float32 arrays of one size."""
    cdef Py_ssize_t n
    if not (rtype(src, 1) == cnp.NPY_FLOAT or rtype(src, 2) == cnp.NPY_FLOAT) or not (
            wtype(dst, 1) == cnp.NPY_FLOAT or wtype(dst, 2) == cnp.NPY_FLOAT) or src.size != dst.size:
        raise ValueError("round_bf16: src and dst must be C-contiguous float32 arrays of one size "
                         "(dst writeable)")
    n = src.size
    with nogil:
        fdl_round_span(<float*>data(src), <float*>data(dst), <size_t>n)


def dense_forward_bf16(A, Ar, bint round_in, Wr, b, int act, out, outr=None):
    """The bf16 forward core with operands rounded once (tests; the epoch executors call it in C).

    ``Ar``: round_bf16(A), written here when ``round_in``; ``Wr``: round_bf16(W); ``outr`` (or None)
    receives round_bf16(out). Same numbers as ``dense_forward(A, W, b, act, out, 1)``.
    """
    cdef Py_ssize_t m = dim(A, 0), n_in = dim(A, 1), n_out = dim(Wr, 1)
    cdef bint has_b = not is_empty(b)
    _f32(A, "A", m, n_in, False)
    _f32(Ar, "Ar", m, n_in, True)
    _f32(Wr, "Wr", n_in, n_out, False)
    _f32(out, "out", m, n_out, True)
    if outr is not None:
        _f32(outr, "outr", m, n_out, True)
    if has_b and not (rtype(b, 1) == cnp.NPY_FLOAT and dim(b, 0) == n_out):
        raise ValueError(f"b must be float32 ({n_out},) or empty")
    if not 0 <= act <= 3 or m > INT_MAX or n_in > INT_MAX or n_out > INT_MAX:
        raise ValueError("bad activation code or size")
    with nogil:
        dense_forward_bf16_c(<float*>data(A), <float*>data(Ar), round_in, <float*>data(Wr),
                             <float*>data(b) if has_b else NULL, has_b, act, <float*>data(out),
                             <float*>data(outr) if outr is not None else NULL, <int>m, <int>n_in, <int>n_out)


def dense_backward_bf16(Ar, W, Wr, out, dout, int act, double l2_over_m, dZr, dW, db, dA):
    """The bf16 backward core with operands rounded once (tests; the epoch executors call it in C).

    ``dZr`` receives round_bf16(dZ) and may be ``dout``; ``db`` / ``dA`` may be empty. Same numbers as
    ``dense_backward(A, W, out, dout, act, l2_over_m, dZ, dW, db, dA, 1)`` (except dZ, stored rounded).
    """
    cdef Py_ssize_t m = dim(Ar, 0), n_in = dim(Ar, 1), n_out = dim(W, 1)
    cdef bint has_db = not is_empty(db), has_dA = not is_empty(dA)
    _f32(Ar, "Ar", m, n_in, False)
    _f32(W, "W", n_in, n_out, False)
    _f32(Wr, "Wr", n_in, n_out, False)
    _f32(out, "out", m, n_out, False)
    _f32(dout, "dout", m, n_out, False)
    _f32(dZr, "dZr", m, n_out, True)
    _f32(dW, "dW", n_in, n_out, True)
    if has_db and not (wtype(db, 1) == cnp.NPY_FLOAT and dim(db, 0) == n_out):
        raise ValueError(f"db must be float32 ({n_out},) or empty")
    if has_dA:
        _f32(dA, "dA", m, n_in, True)
    if not 0 <= act <= 3 or m > INT_MAX or n_in > INT_MAX or n_out > INT_MAX:
        raise ValueError("bad activation code or size")
    with nogil:
        dense_backward_bf16_c(<float*>data(Ar), <float*>data(W), <float*>data(Wr), <float*>data(out),
                              <float*>data(dout), act, l2_over_m, <float*>data(dZr), <float*>data(dW),
                              <float*>data(db) if has_db else NULL, has_db,
                              <float*>data(dA) if has_dA else NULL, has_dA, <int>m, <int>n_in, <int>n_out)


def activation_forward(Z, int act, out):
    """``out = g(Z)`` elementwise; ``out`` may alias ``Z``."""
    cdef int t = rtype(Z, 2)
    cdef Py_ssize_t n
    if not (is_float(t) and wtype(out, 2) == t and 0 <= act <= 3
            and cnp.PyArray_SAMESHAPE(<cnp.ndarray>Z, <cnp.ndarray>out)):
        raise unsupported("activation_forward")
    n = cnp.PyArray_SIZE(<cnp.ndarray>Z)
    with nogil:
        if t == cnp.NPY_FLOAT:
            activation_forward_c(<float*>data(Z), <float*>data(out), n, act)
        else:
            activation_forward_c(<double*>data(Z), <double*>data(out), n, act)


def activation_backward(out, dout, int act, dZ):
    """``dZ = dout * g'(out)``; ``dZ`` may alias ``dout``."""
    cdef int t = rtype(out, 2)
    cdef Py_ssize_t n
    if not (is_float(t) and rtype(dout, 2) == t and wtype(dZ, 2) == t and 0 <= act <= 3
            and cnp.PyArray_SAMESHAPE(<cnp.ndarray>out, <cnp.ndarray>dout)
            and cnp.PyArray_SAMESHAPE(<cnp.ndarray>out, <cnp.ndarray>dZ)):
        raise unsupported("activation_backward")
    n = cnp.PyArray_SIZE(<cnp.ndarray>out)
    with nogil:
        if t == cnp.NPY_FLOAT:
            activation_backward_c(<float*>data(out), <float*>data(dout), <float*>data(dZ), n, act)
        else:
            activation_backward_c(<double*>data(out), <double*>data(dout), <double*>data(dZ), n, act)
