# The nogil cores of fastdl._kernels._dropout (kernels/_dropout.pyx); see _dense.pxd for the location.
from libc.stdint cimport uint8_t, uint64_t

from _kernel_common cimport real

cdef uint64_t dropout_key_c(uint64_t seed, uint64_t step, uint64_t layer) noexcept nogil
cdef void dropout_forward_c(uint64_t key, uint64_t thr, const real* A, uint8_t* mask, real* out, Py_ssize_t n,
                            real scale) noexcept nogil
cdef void dropout_backward_c(const real* dout, const uint8_t* mask, real* dA, Py_ssize_t n,
                             real scale) noexcept nogil
