# The nogil cores of fastdl._kernels._batchnorm (kernels/_batchnorm.pyx); see _dense.pxd for the location.
from _kernel_common cimport real

cdef Py_ssize_t bn_work_size(Py_ssize_t n) noexcept nogil
cdef int bn_forward_train_c(const real* Z, const real* gamma, const real* beta, double eps, double mom,
                            real* run_mean, real* run_var, real* mean, real* inv_std, real* out,
                            Py_ssize_t m, Py_ssize_t n, double* scratch) noexcept nogil
cdef int bn_backward_c(const real* Z, const real* gamma, const real* mean, const real* inv_std,
                       const real* dout, real* dZ, real* dgamma, real* dbeta, Py_ssize_t m, Py_ssize_t n,
                       double* scratch) noexcept nogil
