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
