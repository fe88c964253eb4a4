/* bfloat16 GEMMs for fastdl's compiled kernels (docs/spec.md "Mixed precision").
 *
 * Semantics: C = alpha * round_bf16(op(A)) @ round_bf16(op(B)) + beta * C, accumulated in float32,
 * with round_bf16 = round to nearest, ties to even (NaN stays NaN). Two implementations:
 *   - MKL's cblas_gemm_bf16bf16f32 (AMX / AVX512-BF16 when the CPU has them): the operands are
 *     converted to packed bf16 in per-thread scratch buffers first;
 *   - the fallback: the operands are rounded to bf16 values stored as float32 in the same scratch,
 *     then multiplied by the float32 GEMM. A product of two bf16 values is exact in float32, so
 *     both agree to float32 accumulation rounding.
 * The scratch buffers grow to the largest operand seen and are reused (no allocation per step).
 */
#ifndef FASTDL_BF16_H
#define FASTDL_BF16_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "fastdl_common.h"   /* FASTDL_TC: AVX-512 / AVX2 clones of the packing loops */

typedef void (*fdl_gemm_bf16_t)(int layout, int transa, int transb, int m, int n, int k, float alpha,
                                const uint16_t* A, int lda, const uint16_t* B, int ldb, float beta,
                                float* C, int ldc);

static fdl_gemm_bf16_t fdl_mkl_gemm_bf16 = 0;

static void fdl_bf16_set_mkl(size_t address) { fdl_mkl_gemm_bf16 = (fdl_gemm_bf16_t)address; }
static int fdl_bf16_has_mkl(void) { return fdl_mkl_gemm_bf16 != 0; }

/* Round to nearest even; a NaN stays a (quiet) NaN. Branch-free (a bit select) so that the
   packing loops vectorise. */
static inline uint16_t fdl_f32_to_bf16(float f) {
    uint32_t u, rounded, quiet, nan;
    memcpy(&u, &f, 4);
    rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    quiet = (u >> 16) | 0x0040u;
    nan = 0u - (uint32_t)((u & 0x7fffffffu) > 0x7f800000u);
    return (uint16_t)((quiet & nan) | (rounded & ~nan));
}

static inline float fdl_bf16_round(float f) {
    uint32_t u = (uint32_t)fdl_f32_to_bf16(f) << 16;
    float r;
    memcpy(&r, &u, 4);
    return r;
}

/* Per-thread scratch: [0] and [1] for the two operands. On POSIX it hangs off a pthread key whose
   destructor frees it when the thread exits, so threads that come and go (a thread pool that
   recycles its workers, one thread per request) leave nothing behind; elsewhere thread-local. */
static int fdl_bf16_grow(void** buf, size_t* cap, size_t bytes) {
    if (bytes > *cap) {
        void* p = realloc(*buf, bytes);
        if (!p) return 0;
        *buf = p;
        *cap = bytes;
    }
    return 1;
}

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
typedef struct { void* buf[2]; size_t cap[2]; } fdl_bf16_tls_t;
static pthread_key_t fdl_bf16_key;
static pthread_once_t fdl_bf16_once = PTHREAD_ONCE_INIT;
static int fdl_bf16_key_ok = 0;
static void fdl_bf16_tls_free(void* p) {
    fdl_bf16_tls_t* t = (fdl_bf16_tls_t*)p;
    free(t->buf[0]);
    free(t->buf[1]);
    free(t);
}
static void fdl_bf16_key_make(void) { fdl_bf16_key_ok = pthread_key_create(&fdl_bf16_key, fdl_bf16_tls_free) == 0; }

static void* fdl_bf16_scratch(int which, size_t bytes) {
    fdl_bf16_tls_t* t;
    pthread_once(&fdl_bf16_once, fdl_bf16_key_make);
    if (!fdl_bf16_key_ok) return 0;
    t = (fdl_bf16_tls_t*)pthread_getspecific(fdl_bf16_key);
    if (!t) {
        t = (fdl_bf16_tls_t*)calloc(1, sizeof(fdl_bf16_tls_t));
        if (!t) return 0;
        if (pthread_setspecific(fdl_bf16_key, t) != 0) { free(t); return 0; }
    }
    return fdl_bf16_grow(&t->buf[which], &t->cap[which], bytes) ? t->buf[which] : 0;
}
#else
#if defined(_MSC_VER)
#define FDL_TLS __declspec(thread)
#else
#define FDL_TLS __thread
#endif
static FDL_TLS void* fdl_bf16_buf[2] = {0, 0};
static FDL_TLS size_t fdl_bf16_cap[2] = {0, 0};

static void* fdl_bf16_scratch(int which, size_t bytes) {
    return fdl_bf16_grow(&fdl_bf16_buf[which], &fdl_bf16_cap[which], bytes) ? fdl_bf16_buf[which] : 0;
}
#endif

/* Copy the rows x cols row-major matrix at src (row stride ld) into a packed buffer, rounded. */
static FASTDL_TC void fdl_pack_bf16(const float* src, int rows, int cols, int ld, uint16_t* dst) {
    for (int i = 0; i < rows; i++) {
        const float* s = src + (size_t)i * ld;
        uint16_t* d = dst + (size_t)i * cols;
        for (int j = 0; j < cols; j++) d[j] = fdl_f32_to_bf16(s[j]);
    }
}

static FASTDL_TC void fdl_pack_rounded(const float* src, int rows, int cols, int ld, float* dst) {
    for (int i = 0; i < rows; i++) {
        const float* s = src + (size_t)i * ld;
        float* d = dst + (size_t)i * cols;
        for (int j = 0; j < cols; j++) d[j] = fdl_bf16_round(s[j]);
    }
}

#endif
