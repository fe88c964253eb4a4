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


def rowmajor_addresses() -> tuple:
    """Addresses of the C functions ``sgemm_rm`` and ``dgemm_rm`` (see the module docstring)."""
    return <size_t>&sgemm_rm, <size_t>&dgemm_rm


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
