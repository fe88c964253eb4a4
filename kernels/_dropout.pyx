# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Inverted dropout with the contract's counter-based mask generator.

``bits(e) = mix64(key + (e + 1) * G) >> 32`` depends only on the flat index
``e`` (and the per-call key), so any split of the elements across threads
gives the same uint8 mask as the reference, bit for bit. uint64 arithmetic
wraps modulo 2**64 in C, as the contract requires. The hash loop vectorises
in the AVX2 / AVX-512 clones (64-bit multiplies) and computes the mask and
``out`` in the same sweep. ``out = A * mask * (1/keep_prob)``: the scale is
one float of the array dtype (within an ulp of the reference's division).
"""
cimport numpy as cnp
from cython.parallel cimport prange
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from _kernel_common cimport chunk_size, data, is_float, nthreads, real, rtype, tc_void, wtype
from _kernel_common cimport unsupported


cnp.import_array()

cdef enum:
    # elements per thread below which a pass runs serially (_kernel_common.pxd);
    # the hashing is vectorised, both passes are memory bound.
    GRAIN = 524288
    GRAIN_BWD = 524288

_MASK64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    x = x ^ (x >> 30)
    x = x * 0xBF58476D1CE4E5B9ULL
    x = x ^ (x >> 27)
    x = x * 0x94D049BB133111EBULL
    return x ^ (x >> 31)


cdef tc_void forward_chunk(uint64_t key, Py_ssize_t e0, Py_ssize_t n, uint64_t thr, const real* A,
                           uint8_t* mask, real* out, real scale) noexcept nogil:
    """Elements [e0, e0 + n): mask bits and ``out = A * mask / keep_prob``."""
    cdef uint64_t base = key + <uint64_t>(e0 + 1) * 0x9E3779B97F4A7C15ULL
    cdef uint32_t t32 = <uint32_t>thr
    cdef uint32_t k
    cdef Py_ssize_t i
    if thr > 0xFFFFFFFFULL:             # keep_prob == 1: every element kept
        for i in range(n):
            mask[i] = 1
            out[i] = A[i] * scale
        return
    for i in range(n):
        k = <uint32_t>(mix64(base + <uint64_t>i * 0x9E3779B97F4A7C15ULL) >> 32) < t32
        mask[i] = <uint8_t>k
        out[i] = A[i] * (<real><int>k * scale)


cdef tc_void backward_chunk(const real* dout, const uint8_t* mask, real* dA, Py_ssize_t n, real scale) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dA[i] = dout[i] * (<real>mask[i] * scale)


cdef void dropout_forward_c(uint64_t key, uint64_t thr, const real* A, uint8_t* mask, real* out, Py_ssize_t n,
                   real scale) noexcept nogil:
    cdef int nt = nthreads(n, GRAIN)
    cdef Py_ssize_t per, lo, c
    if nt == 1:
        forward_chunk(key, 0, n, thr, A, mask, out, scale)
        return
    per = chunk_size(n, nt)
    for c in prange(nt, num_threads=nt, schedule='static'):
        lo = c * per
        if lo < n:
            forward_chunk(key, lo, min(per, n - lo), thr, A + lo, mask + lo, out + lo, scale)


cdef void dropout_backward_c(const real* dout, const uint8_t* mask, real* dA, Py_ssize_t n, real scale) noexcept nogil:
    cdef int nt = nthreads(n, GRAIN_BWD)
    cdef Py_ssize_t per, lo, c
    if nt == 1:
        backward_chunk(dout, mask, dA, n, scale)
        return
    per = chunk_size(n, nt)
    for c in prange(nt, num_threads=nt, schedule='static'):
        lo = c * per
        if lo < n:
            backward_chunk(dout + lo, mask + lo, dA + lo, min(per, n - lo), scale)


cdef uint64_t dropout_key_c(uint64_t seed, uint64_t step, uint64_t layer) noexcept nogil:
    """The contract's key; arguments already reduced modulo 2**64 (the sum with G wraps, as there)."""
    return mix64(mix64(mix64(seed + 0x9E3779B97F4A7C15ULL) ^ step) ^ layer)


cdef uint64_t _key(seed, step, layer) except? 0:
    # Python ints reduced modulo 2**64 first, as contract.dropout_key does.
    return dropout_key_c(<uint64_t>(int(seed) & _MASK64), <uint64_t>(int(step) & _MASK64),
                         <uint64_t>(int(layer) & _MASK64))


def dropout_key(seed, step, layer):
    """The contract's per-call 64-bit key (same value as contract.dropout_key)."""
    return _key(seed, step, layer)


cdef inline bint same_shape(object a, object b):
    return cnp.PyArray_SAMESHAPE(<cnp.ndarray>a, <cnp.ndarray>b)


def dropout_forward(A, double keep_prob, seed, step, layer, mask, out):
    """``mask`` = the contract's keep bits; ``out = A * mask / keep_prob`` (``out`` may alias ``A``)."""
    cdef int t = rtype(A, 2)
    cdef uint64_t key, thr
    cdef Py_ssize_t n
    if not (is_float(t) and wtype(out, 2) == t and wtype(mask, 2) == cnp.NPY_UBYTE
            and same_shape(A, out) and same_shape(A, mask) and 0.0 < keep_prob <= 1.0):
        raise unsupported("dropout_forward")
    key = _key(seed, step, layer)
    thr = <uint64_t>(keep_prob * 4294967296.0)     # float64 product, truncated
    n = cnp.PyArray_SIZE(<cnp.ndarray>A)
    with nogil:
        if t == cnp.NPY_FLOAT:
            dropout_forward_c(key, thr, <float*>data(A), <uint8_t*>data(mask), <float*>data(out), n,
                     <float>1.0 / <float>keep_prob)
        else:
            dropout_forward_c(key, thr, <double*>data(A), <uint8_t*>data(mask), <double*>data(out), n, 1.0 / keep_prob)


def dropout_backward(dout, mask, double keep_prob, dA):
    """``dA = dout * mask / keep_prob`` (``dA`` may alias ``dout``)."""
    cdef int t = rtype(dout, 2)
    cdef Py_ssize_t n
    if not (is_float(t) and wtype(dA, 2) == t and rtype(mask, 2) == cnp.NPY_UBYTE
            and same_shape(dout, dA) and same_shape(dout, mask) and keep_prob > 0.0):
        raise unsupported("dropout_backward")
    n = cnp.PyArray_SIZE(<cnp.ndarray>dout)
    with nogil:
        if t == cnp.NPY_FLOAT:
            dropout_backward_c(<float*>data(dout), <uint8_t*>data(mask), <float*>data(dA), n, <float>1.0 / <float>keep_prob)
        else:
            dropout_backward_c(<double*>data(dout), <uint8_t*>data(mask), <double*>data(dA), n, 1.0 / keep_prob)
