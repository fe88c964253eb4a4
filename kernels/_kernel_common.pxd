# cython: language_level=3
"""Declarations shared by fastdl's Cython kernels (cimported, never imported).

* ``real``: the fused float type (float32 / float64) of every kernel.
* ``fastdl_max_threads()``: ``omp_get_max_threads()``, or 1 in a serial build.
* ``tc_void`` / ``tc_double``: return types that mark a function for
  function multiversioning. With GCC >= 12 on x86-64 Linux/glibc they expand
  to ``__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3",
  "default"))) void``: the compiler emits an AVX-512, an AVX2 and a baseline
  copy of the function and the dynamic loader picks one for the running CPU
  (wheels stay portable). Elsewhere (macOS, Windows, clang, musl) they are
  plain ``void`` / ``double``. Only leaf chunk functions use them: OpenMP
  outlines ``prange`` bodies into separate functions the clones would not
  reach, so a ``prange`` body calls a ``tc_void`` chunk function.
* Array checks on the NumPy C API (a few ns each; memoryview acquisition
  costs ~100 ns per argument, too much for kernels called ~15 times a step).
"""
cimport numpy as cnp
from libc.math cimport exp, fabs, sqrt, sqrtf, tanh
from libc.stdint cimport int32_t, int64_t

ctypedef fused real:
    float
    double

ctypedef fused real2:
    float
    double

cdef extern from *:
    """
    #if defined(_OPENMP)
    #include <omp.h>
    #define FASTDL_HAVE_OPENMP 1
    static int fastdl_max_threads(void) { return omp_get_max_threads(); }
    #else
    #define FASTDL_HAVE_OPENMP 0
    static int fastdl_max_threads(void) { return 1; }
    #endif

    #if defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 12) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && !defined(FASTDL_NO_CLONES)
    #define FASTDL_TC __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
    #define FASTDL_CLONES 1
    #else
    #define FASTDL_TC
    #define FASTDL_CLONES 0
    #endif

    /* Branch-free float32 exp, tanh and logistic. Written without control
       flow (bit selects instead of ?:) so that GCC vectorises the loops that
       call them even at baseline ISA (a float ?: is if-converted only with
       AVX-512 masks). exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2,
       Cephes degree-6 polynomial, 2^n applied as two normal factors so that
       n = 128 overflows to inf and subnormal results (x < -87.3) are rounded
       once; max error 1 ulp against exp in float64. NaN propagates. */
    #include <stdint.h>
    #if defined(_MSC_VER) && !defined(__cplusplus)
    #define FASTDL_INLINE __inline
    #else
    #define FASTDL_INLINE inline
    #endif
    typedef union { float f; int32_t i; } fastdl_fi32;

    static FASTDL_INLINE float fastdl_self(int c, float a, float b) {  /* c ? a : b */
        fastdl_fi32 ua, ub;
        int32_t m = -(int32_t)(c != 0);
        ua.f = a; ub.f = b;
        ua.i = (ua.i & m) | (ub.i & ~m);
        return ua.f;
    }

    static FASTDL_INLINE float fastdl_expf(float x) {
        fastdl_fi32 s1, s2;
        float xx = fastdl_self(x < -105.0f, -105.0f, x);
        float n, r, p;
        int32_t ni, n1;
        xx = fastdl_self(xx > 89.0f, 89.0f, xx);
        n = (xx * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   /* round to nearest */
        r = xx - n * 0.693359375f;
        r = r + n * 2.12194440e-4f;
        p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * r * r + r + 1.0f;
        ni = (int32_t)n;
        n1 = ni >> 1;
        s1.i = (n1 + 127) << 23;
        s2.i = (ni - n1 + 127) << 23;
        return p * s1.f * s2.f;
    }

    static FASTDL_INLINE float fastdl_tanhf(float x) {
        /* |x| < 0.625: Cephes odd polynomial; else (1 - e)/(1 + e), e = exp(-2|x|) <= 0.29 */
        float ax = fabsf(x), s = x * x, small, e, big;
        small = ((((-5.70498872745e-3f * s + 2.06390887954e-2f) * s - 5.37397155531e-2f) * s
                  + 1.33314422036e-1f) * s - 3.33332819422e-1f) * s * x + x;
        e = fastdl_expf(-2.0f * ax);
        big = copysignf((1.0f - e) / (1.0f + e), x);
        return fastdl_self(ax < 0.625f, small, big);
    }

    static FASTDL_INLINE float fastdl_sigmoidf(float z) {
        float e = fastdl_expf(-fabsf(z));
        return fastdl_self(z >= 0.0f, 1.0f, e) / (1.0f + e);
    }

    static FASTDL_INLINE float fastdl_reluf(float z) { return fastdl_self(z <= 0.0f, 0.0f, z); }

    static FASTDL_INLINE float fastdl_log1pf(float x) {
        /* log(1 + x) for 0 <= x <= 1 (NaN propagates): u = 1 + x rounded, its
           rounding corrected by (x - (u - 1)) / u; log(u) by Cephes' logf
           polynomial on [sqrt(1/2), sqrt(2)) after halving u >= sqrt(2). */
        float u = 1.0f + x;
        float c = (x - (u - 1.0f)) / u;
        int big = u > 1.41421356f;
        float f = fastdl_self(big, 0.5f * u, u) - 1.0f;
        float e = fastdl_self(big, 1.0f, 0.0f);
        float z = f * f, p, y;
        p = 7.0376836292e-2f;
        p = p * f - 1.1514610310e-1f;
        p = p * f + 1.1676998740e-1f;
        p = p * f - 1.2420140846e-1f;
        p = p * f + 1.4249322787e-1f;
        p = p * f - 1.6668057665e-1f;
        p = p * f + 2.0000714765e-1f;
        p = p * f - 2.4999993993e-1f;
        p = p * f + 3.3333331174e-1f;
        y = f * z * p + e * -2.12194440e-4f - 0.5f * z;
        return (f + y) + e * 0.693359375f + c;
    }

    typedef union { double f; int64_t i; } fastdl_fi64;
    static FASTDL_INLINE double fastdl_seld(int c, double a, double b) {  /* c ? a : b */
        fastdl_fi64 ua, ub;
        int64_t m = -(int64_t)(c != 0);
        ua.f = a; ub.f = b;
        ua.i = (ua.i & m) | (ub.i & ~m);
        return ua.f;
    }
    /* Order-preserving integer keys of floats: key(a) < key(b) iff a < b for
       non-NaN a, b (-0.0 sorts below +0.0). Integer max reductions vectorise
       without -ffast-math; float ones do not. The map is its own inverse. */
    static FASTDL_INLINE int32_t fastdl_fkey(float x) {
        fastdl_fi32 u; u.f = x;
        return u.i ^ ((u.i >> 31) & 0x7FFFFFFF);
    }
    static FASTDL_INLINE float fastdl_funkey(int32_t k) {
        fastdl_fi32 u; u.i = k ^ ((k >> 31) & 0x7FFFFFFF);
        return u.f;
    }
    static FASTDL_INLINE int64_t fastdl_dkey(double x) {
        fastdl_fi64 u; u.f = x;
        return u.i ^ ((u.i >> 63) & 0x7FFFFFFFFFFFFFFFLL);
    }
    static FASTDL_INLINE double fastdl_dunkey(int64_t k) {
        fastdl_fi64 u; u.i = k ^ ((k >> 63) & 0x7FFFFFFFFFFFFFFFLL);
        return u.f;
    }
    static FASTDL_INLINE double fastdl_relud(double z) {
        fastdl_fi64 u;
        u.f = z;
        u.i &= -(int64_t)(!(z <= 0.0));
        return u.f;
    }
    """
    int fastdl_max_threads() noexcept nogil
    float fastdl_expf(float) noexcept nogil
    float fastdl_tanhf(float) noexcept nogil
    float fastdl_sigmoidf(float) noexcept nogil
    float fastdl_reluf(float) noexcept nogil
    float fastdl_log1pf(float) noexcept nogil
    double fastdl_relud(double) noexcept nogil
    float fastdl_self(bint, float, float) noexcept nogil
    double fastdl_seld(bint, double, double) noexcept nogil
    int32_t fastdl_fkey(float) noexcept nogil
    float fastdl_funkey(int32_t) noexcept nogil
    int64_t fastdl_dkey(double) noexcept nogil
    double fastdl_dunkey(int64_t) noexcept nogil
    const int FASTDL_CLONES
    const int FASTDL_HAVE_OPENMP
    ctypedef void tc_void "FASTDL_TC void"
    ctypedef double tc_double "FASTDL_TC double"

# Activation codes (fastdl.backends.contract).
cdef enum:
    IDENTITY = 0
    RELU = 1
    TANH = 2
    SIGMOID = 3


# Parallel thresholds ("grains": work units per thread below which a kernel
# does not add a thread) are set per kernel from measurements on 2 cores
# (KVM guest, ~20 GB/s shared memory bandwidth) with the passive OpenMP wait
# policy fastdl sets (see fastdl/backends/cython_backend.py): a region costs
# a futex wake-up of an idle vCPU, 50-100 us there, so a thread is only added
# for ~250 us of work or more. Memory-bound kernels (SGD, ReLU, BatchNorm,
# dropout) barely gain from a second thread on that machine; exp/tanh-heavy
# ones gain 1.5-1.7x on large inputs.

cdef inline int nthreads(Py_ssize_t work, Py_ssize_t grain) noexcept nogil:
    """Threads for ``work`` units when each thread should get >= ``grain`` units."""
    cdef Py_ssize_t nt
    if work < 2 * grain:
        return 1
    nt = fastdl_max_threads()
    if work // grain < nt:
        nt = work // grain
    return <int>nt if nt > 1 else 1


cdef inline Py_ssize_t chunk_size(Py_ssize_t n, int nt) noexcept nogil:
    """Per-thread chunk of ``n`` elements, rounded up to 16 (no false sharing)."""
    cdef Py_ssize_t per = (n + nt - 1) // nt
    return (per + 15) & ~(<Py_ssize_t>15)


# float32: the vectorisable functions above; float64: libm (full accuracy for
# gradient checking).

cdef inline real r_exp(real x) noexcept nogil:
    if real is float:
        return fastdl_expf(x)
    else:
        return exp(x)


cdef inline real r_tanh(real x) noexcept nogil:
    if real is float:
        return fastdl_tanhf(x)
    else:
        return tanh(x)


cdef inline real r_sigmoid(real z) noexcept nogil:
    """Stable logistic: exp of a non-positive number only (as the reference)."""
    cdef double e
    if real is float:
        return fastdl_sigmoidf(z)
    else:
        e = exp(-fabs(z))
        return (1.0 if z >= 0 else e) / (1.0 + e)


cdef inline real r_step(real a) noexcept nogil:
    """1 if a > 0 else 0 (the ReLU derivative), as a bit select: a float
    comparison converted to a number is if-converted (vectorised) by GCC only
    with AVX-512 masks; multiplying by it keeps NaN * 0 = NaN as NumPy does."""
    if real is float:
        return fastdl_self(a > 0, 1.0, 0.0)
    else:
        return fastdl_seld(a > 0, 1.0, 0.0)


cdef inline real r_relu(real z) noexcept nogil:
    """max(z, 0); NaN propagates like np.maximum."""
    if real is float:
        return fastdl_reluf(z)
    else:
        return fastdl_relud(z)


# ----------------------------------------------------------------- array checks
# Each returns the NumPy type number of ``a`` when it is an ndarray that is
# C-contiguous, aligned, in native byte order (and writeable for ``wtype``)
# with ``ndim`` dimensions; -1 otherwise.

cdef inline int rtype(object a, int ndim):
    cdef cnp.ndarray x
    if not cnp.PyArray_Check(a):
        return -1
    x = <cnp.ndarray>a
    if cnp.PyArray_NDIM(x) != ndim or not cnp.PyArray_ISCARRAY_RO(x):
        return -1
    return cnp.PyArray_TYPE(x)


cdef inline int wtype(object a, int ndim):
    cdef cnp.ndarray x
    if not cnp.PyArray_Check(a):
        return -1
    x = <cnp.ndarray>a
    if cnp.PyArray_NDIM(x) != ndim or not cnp.PyArray_ISCARRAY(x):
        return -1
    return cnp.PyArray_TYPE(x)


cdef inline bint is_float(int t) noexcept:
    return t == cnp.NPY_FLOAT or t == cnp.NPY_DOUBLE


cdef inline bint is_int64(object a):
    """1-D C-contiguous native int64 array (NPY_LONG or NPY_LONGLONG)."""
    cdef int t = rtype(a, 1)
    return ((t == cnp.NPY_LONG or t == cnp.NPY_LONGLONG)
            and cnp.PyArray_ITEMSIZE(<cnp.ndarray>a) == 8)


cdef inline bint is_empty(object a):
    """An ndarray with no elements (the contract's "do not compute" slot)."""
    return cnp.PyArray_Check(a) and cnp.PyArray_SIZE(<cnp.ndarray>a) == 0


cdef inline Py_ssize_t dim(object a, int i) noexcept nogil:
    return cnp.PyArray_DIM(<cnp.ndarray>a, i)


cdef inline void* data(object a) noexcept nogil:
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline real r_sqrt(real x) noexcept nogil:
    if real is float:
        return sqrtf(x)
    else:
        return sqrt(x)


# ----------------------------------------------------------------- row reductions
# Sums: eight independent lanes, combined in a fixed order: GCC vectorises them
# without reassociating (no -ffast-math), and the summation order is fixed
# (independent of the number of threads; only FMA contraction in the AVX2 /
# AVX-512 clones can change the last bit of a float64 sum of squares).

cdef inline real row_max(const real* z, Py_ssize_t k) noexcept nogil:
    """max of z[0:k], k >= 1, as an integer max over order-preserving keys (vectorises).

    A NaN does not propagate into the max, but it makes its row NaN anyway
    (exp(NaN - max) is NaN), as in the reference.
    """
    cdef Py_ssize_t j
    cdef int32_t kf, mf
    cdef int64_t kd, md
    if real is float:
        mf = fastdl_fkey(z[0])
        for j in range(1, k):
            kf = fastdl_fkey(z[j])
            if kf > mf:
                mf = kf
        return fastdl_funkey(mf)
    else:
        md = fastdl_dkey(z[0])
        for j in range(1, k):
            kd = fastdl_dkey(z[j])
            if kd > md:
                md = kd
        return fastdl_dunkey(md)


cdef inline double row_sum(const real* x, Py_ssize_t k) noexcept nogil:
    """sum of x[0:k] accumulated in float64."""
    cdef double acc[8]
    cdef double s
    cdef Py_ssize_t j, l, k8 = k & ~(<Py_ssize_t>7)
    for l in range(8):
        acc[l] = 0.0
    for j in range(0, k8, 8):
        for l in range(8):
            acc[l] += x[j + l]
    s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    for j in range(k8, k):
        s += x[j]
    return s


cdef inline double row_sumsq(const real* x, Py_ssize_t k) noexcept nogil:
    """sum of x[0:k]**2 accumulated in float64 (32 lanes: several independent FMA chains)."""
    cdef double acc[32]
    cdef double s, v
    cdef Py_ssize_t j, l, k32 = k & ~(<Py_ssize_t>31)
    for l in range(32):
        acc[l] = 0.0
    for j in range(0, k32, 32):
        for l in range(32):
            v = x[j + l]
            acc[l] += v * v
    for l in range(16):
        acc[l] += acc[l + 16]
    for l in range(8):
        acc[l] += acc[l + 8]
    s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    for j in range(k32, k):
        v = x[j]
        s += v * v
    return s
