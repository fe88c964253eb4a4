/* The all-finite check (kernels/_optim.pyx): needs FASTDL_TC from fastdl_common.h. */
#include "fastdl_common.h"
#ifndef FASTDL_FINITE_H
#define FASTDL_FINITE_H
#include <stdint.h>
/* 1 if some element is NaN or inf: all exponent bits set. Integer tests and an OR
   reduction, so GCC vectorises them without any fast-math flag (FASTDL_TC: AVX-512 / AVX2
   clones, see _kernel_common.pxd). */
static FASTDL_TC int fdl_any_nonfinite_f32(const float* x, Py_ssize_t n) {
    const uint32_t* u = (const uint32_t*)x;
    uint32_t bad = 0;
    Py_ssize_t i;
    for (i = 0; i < n; i++) bad |= (uint32_t)((u[i] & 0x7f800000u) == 0x7f800000u);
    return bad != 0;
}
static FASTDL_TC int fdl_any_nonfinite_f64(const double* x, Py_ssize_t n) {
    const uint64_t* u = (const uint64_t*)x;
    uint64_t bad = 0;
    Py_ssize_t i;
    for (i = 0; i < n; i++) bad |= (uint64_t)((u[i] & 0x7ff0000000000000ull) == 0x7ff0000000000000ull);
    return bad != 0;
}

#endif /* FASTDL_FINITE_H */
