# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The one GEMM entry point of fastdl's compiled kernels (Cython and Numba).

``sgemm_rm`` / ``dgemm_rm`` compute the row-major ``C (M,N) = alpha *
op(A) @ op(B) + beta * C`` (``ld*`` are row strides) through a Fortran
BLAS ``?gemm`` (a row-major product is the column-major ``C^T = op(B)^T
op(A)^T``: the operands are swapped). Which BLAS is chosen at run time by
:mod:`fastdl.backends.blas`: SciPy's OpenBLAS (``scipy.linalg.cython_blas``,
always available, the default here) or MKL's, whose float32 GEMM is
10-30% faster at the training shapes on AVX-512 machines.

The Cython kernels call the wrappers through the addresses returned by
:func:`rowmajor_addresses` (read once at import); the Numba kernels call
the same addresses, registered as LLVM symbols. So both backends always run
the same BLAS, and switching it (:func:`set_fortran_gemm`) takes effect
for both at once.

``bf16gemm_rm`` is the float32 GEMM of ``precision="bf16"`` (docs/spec.md
"Mixed precision"): both operands rounded to bfloat16, products accumulated
in float32, through MKL's ``cblas_gemm_bf16bf16f32`` when it is routed here
(:func:`set_bf16_gemm`), else through fastdl's own AVX512-BF16 kernel
(kernels/fastdl_bf16gemm.h, :func:`set_bf16_kernel`) on CPUs with that
instruction, else by rounding the operands and calling ``sgemm_rm`` (the same
numbers up to float32 accumulation order). ``bf16gemm_pre_rm`` is the same
for operands already rounded (same routing, same bits).
"""
from libc.string cimport memset
from scipy.linalg cimport cython_blas

# MKL's JIT GEMM for small float32 products (MKL only): a kernel generated once
# per (transposes, sizes, strides, beta) and kept in a small table. At the shapes
# of a batch-32 MLP step it takes 0.3-0.5 us off each product (10-60%).
cdef extern from "fastdl_blas_jit.h":
    ctypedef void (*fdl_sjit_kernel_t)(void*, float*, float*, float*) noexcept nogil
    void fdl_jit_set(size_t create, size_t get) noexcept nogil
    fdl_sjit_kernel_t fdl_sjit_lookup(int ta, int tb, int M, int N, int K, int lda, int ldb, float beta, int ldc,
                                      void** jitter) noexcept nogil

cdef extern from "fastdl_bf16.h" nogil:
    ctypedef void (*fdl_gemm_bf16_t)(int, int, int, int, int, int, float, const unsigned short*, int,
                                     const unsigned short*, int, float, float*, int) noexcept nogil
    fdl_gemm_bf16_t fdl_mkl_gemm_bf16
    void fdl_bf16_set_mkl(size_t address)
    void* fdl_bf16_scratch(int which, size_t nbytes)
    void fdl_pack_bf16(const float* src, int rows, int cols, int ld, unsigned short* dst)
    void fdl_pack_rounded(const float* src, int rows, int cols, int ld, float* dst)

# fastdl's own AVX512-BF16 GEMM (vdpbf16ps), for CPUs with the unit where MKL has no native path (AMD)
cdef extern from "fastdl_bf16gemm.h" nogil:
    int fdl_bf16k_available()
    int fdl_bf16k_compiled()
    int fdl_bf16k_gemm(int ta, int tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
                       int ldb, float beta, float* C, int ldc, int nthreads)
    int fastdl_max_threads()

cdef extern from "stdlib.h" nogil:
    void abort()

ctypedef void (*sgemm_f)(char*, char*, int*, int*, int*, float*, float*, int*, float*, int*, float*, float*,
                         int*) noexcept nogil
ctypedef void (*dgemm_f)(char*, char*, int*, int*, int*, double*, double*, int*, double*, int*, double*, double*,
                         int*) noexcept nogil

ctypedef int (*set_threads_f)(int) noexcept nogil

cdef sgemm_f _sgemm = cython_blas.sgemm
cdef dgemm_f _dgemm = cython_blas.dgemm
# MKL's mkl_set_num_threads_local, or NULL. MKL would run even a 32x64x128 product on
# every thread (~200 us instead of 3 with OpenMP's passive wait); OpenBLAS keeps products
# of up to 2^18 multiply-adds on the calling thread. Products up to SERIAL_MNK run on one.
cdef set_threads_f _set_threads_local = NULL

cdef enum:
    SERIAL_MNK = 1048576
    JIT_MNK = 524288     # float32 products up to this many multiply-adds use MKL's JIT kernels
    SMALL_MNK = 262144   # OpenBLAS runs products up to 2^18 multiply-adds on the calling thread

# MKL without a JIT kernel for a small float32 product (MKL_NO_JIT: e.g. every shape on AMD CPUs,
# where MKL takes its generic code path): SciPy's OpenBLAS sgemm instead, single-threaded at these
# sizes. Measured on the 2-core AMD EPYC (Zen 4), S epoch (64-128-64-10, batch 32) interleaved in
# one process: 466k vs 377k samples/s (median of 7). The choice depends only on the shape (and on
# MKL's JIT support on the CPU), so results stay deterministic run to run.
cdef bint _small_openblas = True

# Routing of bf16gemm_rm (and bf16gemm_pre_rm) to fastdl's AVX512-BF16 kernel: 0 off, 1 products above
# BF16K_MNK multiply-adds, 2 every product (FASTDL_BF16_GEMM=avx512; tests). The threshold, measured on the
# AMD EPYC Zen 4, one thread, fastest of 7x100 calls: at 2^20 multiply-adds (128x64 @ 64x128) the kernel
# takes 15.6 us against 24.7 for the plain float32 sgemm (the pre-rounded path) and 27.7 for round + sgemm;
# at 2^18 (the S shapes, e.g. 32x64 @ 64x128) they are within +-20% either way (the kernel packs both
# operands), below it loses (8x64 @ 64x64: 4.6 vs 3.7 us). A choice by shape only: deterministic.
cdef int _bf16_kernel = 0
cdef enum:
    BF16K_MNK = 524288


cdef void sgemm_rm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                   const float* B, int ldb, float beta, float* C, int ldc) noexcept nogil:
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    cdef int i
    if M <= 0 or N <= 0:
        return
    if K <= 0:  # BLAS would reject lda = 0; the product of empty operands is 0
        if beta == 0:
            for i in range(M):
                memset(C + i * ldc, 0, N * sizeof(float))
        return
    cdef int prev
    cdef void* jitter = NULL
    cdef fdl_sjit_kernel_t kern
    if _set_threads_local != NULL and <double>M * N * K <= JIT_MNK and alpha == 1:
        kern = fdl_sjit_lookup(trans_a, trans_b, M, N, K, lda, ldb, beta, ldc, &jitter)
        if kern != NULL:
            kern(jitter, <float*>A, <float*>B, C)
            return
        if _small_openblas and <double>M * N * K <= SMALL_MNK:
            cython_blas.sgemm(&tb, &ta, &N, &M, &K, &alpha, <float*>B, &ldb, <float*>A, &lda, &beta, C, &ldc)
            return
    if _set_threads_local != NULL and <double>M * N * K <= SERIAL_MNK:
        prev = _set_threads_local(1)
        _sgemm(&tb, &ta, &N, &M, &K, &alpha, <float*>B, &ldb, <float*>A, &lda, &beta, C, &ldc)
        _set_threads_local(prev)
    else:
        _sgemm(&tb, &ta, &N, &M, &K, &alpha, <float*>B, &ldb, <float*>A, &lda, &beta, C, &ldc)


cdef void dgemm_rm(int trans_a, int trans_b, int M, int N, int K, double alpha, const double* A, int lda,
                   const double* B, int ldb, double beta, double* C, int ldc) noexcept nogil:
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    cdef int i
    if M <= 0 or N <= 0:
        return
    if K <= 0:
        if beta == 0:
            for i in range(M):
                memset(C + i * ldc, 0, N * sizeof(double))
        return
    cdef int prev
    if _set_threads_local != NULL and <double>M * N * K <= SERIAL_MNK:
        prev = _set_threads_local(1)
        _dgemm(&tb, &ta, &N, &M, &K, &alpha, <double*>B, &ldb, <double*>A, &lda, &beta, C, &ldc)
        _set_threads_local(prev)
    else:
        _dgemm(&tb, &ta, &N, &M, &K, &alpha, <double*>B, &ldb, <double*>A, &lda, &beta, C, &ldc)


cdef inline bint bf16_packing_route(int M, int N, int K) noexcept nogil:
    """True when a bf16 product of this shape goes to a kernel that packs (and rounds) its operands itself:
    MKL's bf16 GEMM (~20 us a call at least, so only above JIT_MNK) or fastdl's AVX512-BF16 kernel (above
    BF16K_MNK, or always when forced). A choice by shape only: deterministic."""
    cdef double mnk = <double>M * N * K
    return ((fdl_mkl_gemm_bf16 != NULL and mnk > JIT_MNK) or _bf16_kernel == 2
            or (_bf16_kernel == 1 and mnk > BF16K_MNK))


cdef void bf16gemm_rm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                      const float* B, int ldb, float beta, float* C, int ldc) noexcept nogil:
    """``sgemm_rm`` with both operands rounded to bfloat16 (nearest even), float32 accumulation."""
    cdef int i
    cdef int ra = K if trans_a else M     # stored rows / columns of A and B
    cdef int ca = M if trans_a else K
    cdef int rb = N if trans_b else K
    cdef int cb = K if trans_b else N
    cdef void* pa
    cdef void* pb
    cdef int prev
    if M <= 0 or N <= 0 or K <= 0:
        sgemm_rm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
        return
    # small products take the rounding fallback below, which then gets sgemm_rm's small-product path
    if not bf16_packing_route(M, N, K):
        pa = fdl_bf16_scratch(0, <size_t>ra * ca * 4)
        pb = fdl_bf16_scratch(1, <size_t>rb * cb * 4)
        if pa == NULL or pb == NULL:
            abort()
        fdl_pack_rounded(A, ra, ca, lda, <float*>pa)
        fdl_pack_rounded(B, rb, cb, ldb, <float*>pb)
        sgemm_rm(trans_a, trans_b, M, N, K, alpha, <float*>pa, ca, <float*>pb, cb, beta, C, ldc)
        return
    if fdl_mkl_gemm_bf16 != NULL and <double>M * N * K > JIT_MNK:
        pa = fdl_bf16_scratch(0, <size_t>ra * ca * 2)
        pb = fdl_bf16_scratch(1, <size_t>rb * cb * 2)
        if pa == NULL or pb == NULL:
            abort()   # a few MB of scratch could not be allocated: nothing sensible is left to do
        fdl_pack_bf16(A, ra, ca, lda, <unsigned short*>pa)
        fdl_pack_bf16(B, rb, cb, ldb, <unsigned short*>pb)
        if _set_threads_local != NULL and <double>M * N * K <= SERIAL_MNK:
            prev = _set_threads_local(1)
            fdl_mkl_gemm_bf16(101, 112 if trans_a else 111, 112 if trans_b else 111, M, N, K, alpha,
                              <unsigned short*>pa, ca, <unsigned short*>pb, cb, beta, C, ldc)
            _set_threads_local(prev)
        else:
            fdl_mkl_gemm_bf16(101, 112 if trans_a else 111, 112 if trans_b else 111, M, N, K, alpha,
                              <unsigned short*>pa, ca, <unsigned short*>pb, cb, beta, C, ldc)
        return
    # fastdl's kernel packs (and rounds) both operands itself; threads: fastdl's OpenMP count (its own
    # helper threads), results independent of it
    if fdl_bf16k_gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, fastdl_max_threads()) != 0:
        abort()   # packing buffer not allocated (set_bf16_kernel only enables an available kernel)


cdef void bf16gemm_pre_rm(int trans_a, int trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                          const float* B, int ldb, float beta, float* C, int ldc) noexcept nogil:
    """``bf16gemm_rm`` for operands that are ALREADY bfloat16 values stored as float32 (no rounding copy).

    Contract: every element of op(A) and op(B) is bf16-representable (the executors round each operand
    once per step: W once, a layer's input once for Z and dW, dZ once for dW and dX; docs/spec.md
    section 13). The numbers are those of ``bf16gemm_rm`` on the same (or the unrounded) operands: its
    rounding is the identity on such values. The fallback is then ``sgemm_rm`` directly, no copy.
    """
    if M > 0 and N > 0 and K > 0 and bf16_packing_route(M, N, K):
        bf16gemm_rm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)   # same route, same numbers
    else:
        sgemm_rm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)


def rowmajor_addresses() -> tuple:
    """Addresses of ``sgemm_rm``, ``dgemm_rm``, ``bf16gemm_rm`` and ``bf16gemm_pre_rm`` (module docstring)."""
    return <size_t>&sgemm_rm, <size_t>&dgemm_rm, <size_t>&bf16gemm_rm, <size_t>&bf16gemm_pre_rm


def set_small_gemm_openblas(bint enabled) -> bool:
    """With MKL: run small float32 products that MKL cannot JIT on SciPy's OpenBLAS (default True).

    Returns the previous setting (benchmarks and tests switch it).
    """
    global _small_openblas
    prev = _small_openblas
    _small_openblas = enabled
    return prev


def set_bf16_gemm(size_t address) -> None:
    """Route ``bf16gemm_rm`` to MKL's ``cblas_gemm_bf16bf16f32`` at ``address``; 0 = round + ``sgemm``."""
    fdl_bf16_set_mkl(address)


def set_bf16_kernel(int mode) -> int:
    """Route ``bf16gemm_rm`` to fastdl's AVX512-BF16 kernel: 0 off, 1 above a size threshold, 2 always.

    Returns the previous mode. Raises RuntimeError for 1 or 2 when this CPU or build has no such kernel.
    """
    global _bf16_kernel
    if mode not in (0, 1, 2):
        raise ValueError(f"set_bf16_kernel: mode must be 0, 1 or 2, got {mode}")
    if mode and not fdl_bf16k_available():
        raise RuntimeError("fastdl's AVX512-BF16 GEMM needs an x86-64 CPU with AVX512_BF16 (and a build with "
                           f"GCC >= 10 or Clang >= 9; this build {'has' if fdl_bf16k_compiled() else 'lacks'} it)")
    prev = _bf16_kernel
    _bf16_kernel = mode
    return prev


def bf16_kernel_mode() -> int:
    """The current routing to fastdl's AVX512-BF16 kernel (see :func:`set_bf16_kernel`)."""
    return _bf16_kernel


def bf16_kernel_available() -> bool:
    """True when this build has fastdl's AVX512-BF16 GEMM and the CPU (CPUID) and OS (XCR0) can run it."""
    return fdl_bf16k_available() != 0


def bf16_kernel_threshold() -> int:
    """Products of more than this many multiply-adds use the AVX512-BF16 kernel in mode 1."""
    return BF16K_MNK


def bf16_gemm_routed() -> bool:
    """True when ``bf16gemm_rm`` calls a native bfloat16 GEMM (MKL), False for the rounding fallback."""
    return fdl_mkl_gemm_bf16 != NULL


def bf16_round(x) -> None:
    """Round a C-contiguous float32 array to bfloat16 values in place (nearest even; for tests)."""
    cdef float[::1] v = x.reshape(-1)
    if v.shape[0] == 0:
        return
    with nogil:
        fdl_pack_rounded(&v[0], 1, <int>v.shape[0], <int>v.shape[0], &v[0])


def _row_stride(str name, v) -> int:
    """The row stride (in floats) of a 2-D float32 array with contiguous rows, for gemm_bf16's ``ld``."""
    if v.ndim != 2:
        raise ValueError(f"gemm_bf16: {name} must be 2-D, got shape {v.shape}")
    if v.size == 0:
        return max(v.shape[1], 1)
    if v.shape[1] > 1 and v.strides[1] != 4:
        raise ValueError(f"gemm_bf16: {name} must have contiguous rows, got strides {v.strides}")
    if v.shape[0] == 1:
        return max(v.shape[1], 1)   # one row: its stride is never used
    if v.strides[0] % 4 or v.strides[0] < 4 * v.shape[1]:
        raise ValueError(f"gemm_bf16: {name} must have contiguous rows (row stride >= row length), "
                         f"got shape {v.shape}, strides {v.strides}")
    return v.strides[0] // 4


def gemm_bf16(A, B, C, bint trans_a=False, bint trans_b=False, float alpha=1.0, float beta=0.0,
              bint pre_rounded=False) -> None:
    """``C = alpha * round_bf16(op(A)) @ round_bf16(op(B)) + beta * C`` through ``bf16gemm_rm`` (tests, benchmarks),
    or through ``bf16gemm_pre_rm`` when ``pre_rounded`` (A and B must then hold bfloat16 values already).

    float32 2-D arrays whose rows are contiguous (a row stride larger than the row, e.g. a column slice, is
    passed to the kernel as ``ld``).
    """
    cdef int lda = _row_stride("A", A)
    cdef int ldb = _row_stride("B", B)
    cdef int ldc = _row_stride("C", C)
    cdef float[:, :] a = A
    cdef float[:, :] b = B
    cdef float[:, :] c = C
    cdef int M = c.shape[0]
    cdef int N = c.shape[1]
    cdef int K = a.shape[0] if trans_a else a.shape[1]
    if (a.shape[1] if trans_a else a.shape[0]) != M or (b.shape[1] if trans_b else b.shape[0]) != K \
            or (b.shape[0] if trans_b else b.shape[1]) != N:
        raise ValueError(f"gemm_bf16: shapes {A.shape} x {B.shape} -> {C.shape} do not match")
    if M == 0 or N == 0:
        return
    if K == 0:   # the empty product: C = beta * C (C not read when beta is 0)
        if beta == 0:
            C[...] = 0
        else:
            C *= beta
        return
    with nogil:
        if pre_rounded:
            bf16gemm_pre_rm(trans_a, trans_b, M, N, K, alpha, &a[0, 0], lda, &b[0, 0], ldb, beta, &c[0, 0], ldc)
        else:
            bf16gemm_rm(trans_a, trans_b, M, N, K, alpha, &a[0, 0], lda, &b[0, 0], ldb, beta, &c[0, 0], ldc)


def bf16_gemm_packs(int M, int N, int K) -> bool:
    """True when a bf16 product of this shape goes to a kernel that packs (and rounds) its operands itself
    (MKL's bf16 GEMM, fastdl's AVX512-BF16 kernel), False for the float32 GEMM on rounded operands.

    The executors round each operand once per step only for the latter: for the packing routes the
    rounded copies would be extra work (the numbers are the same either way)."""
    return bool(bf16_packing_route(M, N, K))


def gemm_bf16_pre(A, B, C, bint trans_a=False, bint trans_b=False) -> None:
    """``C = op(A) @ op(B)`` through ``bf16gemm_pre_rm`` on float32 arrays whose values are already bfloat16
    (tests: equals :func:`gemm_bf16` bit for bit on such operands)."""
    gemm_bf16(A, B, C, trans_a, trans_b, pre_rounded=True)


def set_fortran_gemm(size_t sgemm_address, size_t dgemm_address, size_t set_threads_local_address=0,
                     size_t sjit_create_address=0, size_t jit_get_address=0) -> None:
    """Route every GEMM to these Fortran-interface (LP64) ``sgemm_`` / ``dgemm_``; 0, 0 = SciPy's.

    MKL only: ``set_threads_local_address`` is ``MKL_Set_Num_Threads_Local``
    (small products then run on the calling thread); the last two are
    ``mkl_cblas_jit_create_sgemm`` and ``mkl_jit_get_sgemm_ptr`` (JIT kernels
    for small float32 products), or 0.
    """
    global _sgemm, _dgemm, _set_threads_local
    if (sgemm_address == 0) != (dgemm_address == 0):
        raise ValueError("set_fortran_gemm: give both addresses, or neither (0, 0) for SciPy's BLAS")
    if sgemm_address == 0:
        _sgemm = cython_blas.sgemm
        _dgemm = cython_blas.dgemm
        _set_threads_local = NULL
        fdl_jit_set(0, 0)
    else:
        _sgemm = <sgemm_f>sgemm_address
        _dgemm = <dgemm_f>dgemm_address
        _set_threads_local = <set_threads_f>set_threads_local_address
        fdl_jit_set(sjit_create_address if set_threads_local_address else 0, jit_get_address)
