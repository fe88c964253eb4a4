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

cdef extern from "fastdl_common.h":
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


# ----------------------------------------------------------------- rejected arguments

cdef inline object unsupported(str name):
    """The error of a raw (unchecked) kernel given arguments off its compiled fast path.

    No silent conversion or slow fallback: the raw kernels are the executors' entry points and get
    exactly what they need; fastdl.get_backend(...).<kernel> is the validated public entry point.
    """
    return ValueError(f"{name}: arguments outside the compiled kernel's contract (one float32/float64 dtype, "
                      f"C-contiguous aligned native-order arrays of matching shapes); call "
                      f"fastdl.get_backend('cython').{name}(...) for a checked call that names the wrong argument")
