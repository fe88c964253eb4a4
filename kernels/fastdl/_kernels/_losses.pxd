# The nogil cores of fastdl._kernels._losses (kernels/_losses.pyx); see _dense.pxd for the location.
from libc.stdint cimport int64_t

from _kernel_common cimport real, real2

cdef double seq_sum(const double* w, Py_ssize_t n) noexcept nogil
cdef Py_ssize_t loss_buffer_size(Py_ssize_t m, Py_ssize_t k) noexcept nogil
cdef double sce_c(const real* Z, const int64_t* y, real* dZ, bint grad, Py_ssize_t m, Py_ssize_t k,
                  const double* w, double sw, double* row_loss, real* scratch, int max_nt) noexcept nogil
cdef double bce_c(const real* Z, const real2* y, real* dZ, bint grad, Py_ssize_t m, Py_ssize_t k,
                  const double* w, double sw, double* row_loss) noexcept nogil
cdef double mse_c(const real* Yh, const real2* Y, real* dZ, bint grad, Py_ssize_t m, Py_ssize_t k,
                  const double* w, double sw, double* partial) noexcept nogil
cdef double poisson_c(const real* Z, const real2* Y, real* dZ, bint grad, Py_ssize_t m, Py_ssize_t k,
                      const double* w, double sw, double* row_loss) noexcept nogil
