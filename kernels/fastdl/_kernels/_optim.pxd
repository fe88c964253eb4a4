# The nogil cores of fastdl._kernels._optim (kernels/_optim.pyx); see _dense.pxd for the location.
from libc.stdint cimport int64_t

from _kernel_common cimport real

cdef void opt_step_c(int kind, real* p, const real* g, real* v, real* s, Py_ssize_t n, double beta1,
                     double beta2, double eps, double c1, double c2) noexcept nogil
cdef Py_ssize_t ssq_partials(Py_ssize_t n) noexcept nogil
cdef int sum_squares_c(const real* x, Py_ssize_t n, double* out, double* scratch) noexcept nogil
cdef int any_nonfinite_c(const real* x, Py_ssize_t n) noexcept nogil
cdef void opt_step_ssq_c(int kind, real* p, const real* g, real* v, real* s, Py_ssize_t n, double beta1,
                         double beta2, double eps, double c1, double c2, const int64_t* tasks, Py_ssize_t n_tasks,
                         const int64_t* dense, int n_dense, double* partial, double* ss) noexcept nogil
