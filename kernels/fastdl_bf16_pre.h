/* Rounding to bfloat16 values stored as float32, for the executors that round each GEMM operand ONCE
 * per step (docs/spec.md section 13: W once, a Dense layer's input once for Z = XW and dW = X^T dZ,
 * dZ once for dW and dX = dZ W^T), then multiply with bf16gemm_pre_rm (kernels/_blas.pyx).
 *
 * fdl_bf16r gives the same bits as fdl_bf16_round (fastdl_bf16.h: round to nearest, ties to even; a
 * NaN stays a quiet NaN with the same sign and top mantissa bits) but stays in 32-bit lanes, which GCC
 * vectorises about twice as fast (17k floats: 1.3 vs 2.6 us on AMD Zen 4, /tmp microbenchmark).
 * Built without -ffast-math (setup.py): `f != f` must stay the NaN test.
 */
#ifndef FASTDL_BF16_PRE_H
#define FASTDL_BF16_PRE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "fastdl_common.h"

static inline float fdl_bf16r(float f) {
    uint32_t u, r;
    float g;
    memcpy(&u, &f, 4);
    r = u + 0x7fffu + ((u >> 16) & 1u);
    r = (f != f) ? (u | 0x00400000u) : r;   /* NaN: quiet; the float compare vectorises best (15-20%) */
    r &= 0xffff0000u;
    memcpy(&g, &r, 4);
    return g;
}

/* d[i] = round_bf16(s[i]) for i < n (d may equal s). */
static FASTDL_TC void fdl_round_span(const float* s, float* d, size_t n) {
    for (size_t i = 0; i < n; i++) d[i] = fdl_bf16r(s[i]);
}

#endif
