# The nogil cores of fastdl._kernels._dense (kernels/_dense.pyx), cimported by the epoch executor
# (kernels/_epoch.pyx). This file sits at kernels/fastdl/_kernels/ so that Cython's qualified lookup
# (`from fastdl._kernels._dense cimport ...`, include path kernels/) finds it.
from _kernel_common cimport real

cdef void activation_forward_c(const real* z, real* out, Py_ssize_t n, int act) noexcept nogil
cdef void activation_backward_c(const real* a, const real* d, real* o, Py_ssize_t n, int act) noexcept nogil
cdef void dense_forward_c(const real* A, const real* W, const real* b, bint has_b, int act, real* out,
                          int m, int n_in, int n_out, int precision) noexcept nogil
cdef void dense_backward_c(const real* A, const real* W, const real* out, const real* dout, int act,
                           double l2, real* dZ, real* dW, real* db, bint has_db, real* dA, bint has_dA,
                           int m, int n_in, int n_out, int precision) noexcept nogil
# precision 1 with each operand rounded once per step (docs/spec.md section 13): float32 only
cdef void round_bf16_c(const float* src, float* dst, Py_ssize_t n) noexcept nogil
cdef void dense_forward_bf16_c(const float* A, float* Ar, bint round_in, const float* Wr, const float* b,
                               bint has_b, int act, float* out, float* outr, int m, int n_in,
                               int n_out) noexcept nogil
cdef void dense_backward_bf16_c(const float* Ar, const float* W, const float* Wr, const float* out,
                                float* dout, int act, double l2, float* dZr, float* dW, float* db, bint has_db,
                                float* dA, bint has_dA, int m, int n_in, int n_out) noexcept nogil
