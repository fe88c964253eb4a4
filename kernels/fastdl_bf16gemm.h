/* fastdl's own bfloat16 GEMM for CPUs with AVX512-BF16 (vdpbf16ps) where MKL has no native path
 * (AMD Zen 4 and later: MKL's cblas_gemm_bf16bf16f32 uses the bf16 units of Intel CPUs only).
 * docs/spec.md "Mixed precision (bfloat16)", issue 13.
 *
 *   C = alpha * round_bf16(op(A)) @ round_bf16(op(B)) + beta * C      (row-major, float32 in and out)
 *
 * - Rounding: nearest even, NaN kept quiet, bit for bit fdl_f32_to_bf16 (fastdl_bf16.h) for every
 *   input, denormals included: done with integer AVX-512 ops rather than vcvtneps2bf16, which flushes
 *   float32 denormals to zero.
 * - Products: vdpbf16ps, float32 accumulation. That instruction treats bf16 denormal inputs as zero and
 *   flushes denormal results to zero (DAZ/FTZ, independent of MXCSR): spec section 13 says what that
 *   changes (only products below ~1.2e-38).
 * - Design: the whole op(B) is packed once per call into 32-column panels of K-pairs, [K/2][32] 32-bit
 *   words each holding (B[2p][n], B[2p+1][n]); op(A) into 14-row panels [K/2][14] of pairs
 *   (A[m][2p], A[m][2p+1]), broadcast as one 32-bit word. Odd K: the last pair's second element is a
 *   zero pad. The 14x32 micro-kernel keeps 28 zmm accumulators over the full K (no K blocking: every
 *   element of C is one register's sum over k in increasing pairs, then alpha/beta once), so the
 *   summation order of an element depends only on K. Threads (OpenMP, fastdl's thread count) take
 *   whole panels to pack and whole blocks of output tiles to compute (dynamic schedule: a thread that
 *   the OS pauses on a shared machine does not hold the others up); which thread computes a tile never
 *   changes its bits, so results are identical run to run and for any number of threads.
 * - Compiled only for x86-64 with GCC >= 10 or Clang >= 9 (the functions carry a target attribute, the
 *   rest of the extension stays baseline x86-64) and used only when CPUID reports AVX512-F/BW/VL and
 *   AVX512_BF16 and the OS saves zmm state (XCR0). Elsewhere fdl_bf16k_available() is 0.
 */
#ifndef FASTDL_BF16GEMM_H
#define FASTDL_BF16GEMM_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "fastdl_common.h"

#if defined(__x86_64__) && !defined(FASTDL_NO_AVX512BF16) && !defined(_MSC_VER) && \
    (defined(__linux__) || defined(__APPLE__) || defined(__unix__)) && \
    ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#define FDL_BF16K_COMPILED 1
#else
#define FDL_BF16K_COMPILED 0
#endif

#define FDL_BF16K_MR 14
#define FDL_BF16K_NR 32

#if FDL_BF16K_COMPILED
#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>

/* Set in a fork()ed child: GNU OpenMP is not fork-safe (a child whose parent ran a parallel region hangs
   in its next multi-threaded one), so the kernel runs on the calling thread only there (as fastdl's Numba
   kernels do, fastdl/backends/numba/_chunks.py). */
static volatile int fdl_bf16k_forked = 0;
static void fdl_bf16k_atfork_child(void) { fdl_bf16k_forked = 1; }

#define FDL_BF16K_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

static int fdl_bf16k_detect(void) {
    unsigned a, b, c, d, lo, hi;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27)))   /* OSXSAVE: XGETBV usable */
        return 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0xe6u) != 0xe6u)   /* the OS saves SSE, AVX and the three AVX-512 state components */
        return 0;
    if (__get_cpuid_max(0, 0) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    if (!(b & (1u << 16)) || !(b & (1u << 30)) || !(b & (1u << 31)))   /* AVX512 F, BW, VL */
        return 0;
    __cpuid_count(7, 1, a, b, c, d);
    return (a >> 5) & 1u;   /* AVX512_BF16 */
}

/* float32 -> bf16 bits in the low half of each 32-bit lane (high half 0): fdl_f32_to_bf16 vectorised. */
FDL_BF16K_TARGET static inline __m512i fdl_bf16k_round(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), _mm512_and_si512(hi, _mm512_set1_epi32(1))),
        16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
}

static inline __mmask16 fdl_bf16k_mask(int n) {   /* the first n (clamped to 0..16) lanes */
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

/* Panel of width W (columns of op(B), or rows of op(A)) whose K-pairs come from two consecutive source
   rows: src = element (k=0, column 0), ld = source row stride; w <= W valid columns (the rest zero). */
FDL_BF16K_TARGET static void fdl_bf16k_pack_cols(const float* src, size_t ld, int K, int w, int W, uint32_t* dst) {
    const int kp = (K + 1) / 2;
    for (int p = 0; p < kp; p++) {
        const float* s0 = src + (size_t)(2 * p) * ld;
        const int odd = 2 * p + 1 < K;
        for (int c = 0; c < W; c += 16) {
            const __mmask16 ml = fdl_bf16k_mask(w - c), ms = fdl_bf16k_mask(W - c);
            const __m512i r0 = fdl_bf16k_round(_mm512_maskz_loadu_ps(ml, s0 + c));
            const __m512i r1 = odd ? fdl_bf16k_round(_mm512_maskz_loadu_ps(ml, s0 + ld + c)) : _mm512_setzero_si512();
            _mm512_mask_storeu_epi32(dst + (size_t)p * W + c, ms, _mm512_or_si512(r0, _mm512_slli_epi32(r1, 16)));
        }
    }
}

/* Panel of width W whose K runs along each (contiguous) source row: src = row 0, ld = row stride; h <= W
   valid rows. 16 rows x 16 pairs are converted, transposed in registers, and stored as 16 pair-rows. */
FDL_BF16K_TARGET static void fdl_bf16k_pack_rows(const float* src, size_t ld, int K, int h, int W, uint32_t* dst) {
    const int kp = (K + 1) / 2;
    for (int r0 = 0; r0 < W; r0 += 16) {
        const int nr = W - r0 < 16 ? W - r0 : 16;   /* rows of this group in the panel (14 or 16) */
        for (int p0 = 0; p0 < kp; p0 += 16) {
            __m512i t[16];
            const int np = kp - p0 < 16 ? kp - p0 : 16;
            const __mmask16 m0 = fdl_bf16k_mask(K - 2 * p0), m1 = fdl_bf16k_mask(K - 2 * p0 - 16);
            for (int r = 0; r < 16; r++) {
                if (r0 + r < h && r < nr) {
                    const float* s = src + (size_t)(r0 + r) * ld + 2 * p0;
                    const __m256i lo = _mm512_cvtepi32_epi16(fdl_bf16k_round(_mm512_maskz_loadu_ps(m0, s)));
                    const __m256i hi = _mm512_cvtepi32_epi16(fdl_bf16k_round(_mm512_maskz_loadu_ps(m1, s + 16)));
                    t[r] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);   /* words: pairs p0..p0+15 */
                } else {
                    t[r] = _mm512_setzero_si512();
                }
            }
            /* 16x16 transpose of 32-bit words: t[r][q] -> u[q][r] */
            __m512i a[16], b[16];
            for (int i = 0; i < 16; i += 2) {
                a[i] = _mm512_unpacklo_epi32(t[i], t[i + 1]);
                a[i + 1] = _mm512_unpackhi_epi32(t[i], t[i + 1]);
            }
            for (int i = 0; i < 16; i += 4) {
                b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
                b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
                b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
                b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
            }
            /* b[4g + j], g = row group of 4, j = word-in-lane order (0,1,2,3) within each 128-bit lane L:
               lane L of b[4g+j] holds rows 4g..4g+3 at pair 4L+j. */
            for (int g = 0; g < 4; g += 2) {
                for (int j = 0; j < 4; j++) {
                    a[4 * g + j] = _mm512_shuffle_i32x4(b[4 * g + j], b[4 * (g + 1) + j], 0x88);      /* lanes 0,2 | 0,2 */
                    a[4 * g + 4 + j] = _mm512_shuffle_i32x4(b[4 * g + j], b[4 * (g + 1) + j], 0xdd);  /* lanes 1,3 | 1,3 */
                }
            }
            /* a[0..3]: rows 0-7, lanes (0,2 of g0),(0,2 of g1) -> lane pattern [r0-3 L0, r0-3 L2, r4-7 L0, r4-7 L2];
               a[4..7]: [r0-3 L1, r0-3 L3, r4-7 L1, r4-7 L3]; a[8..15]: the same for rows 8-15. */
            for (int j = 0; j < 4; j++) {
                const __m512i x0 = _mm512_shuffle_i32x4(a[j], a[8 + j], 0x88);       /* L0 rows 0-7, 8-15 */
                const __m512i x2 = _mm512_shuffle_i32x4(a[j], a[8 + j], 0xdd);       /* L2 */
                const __m512i x1 = _mm512_shuffle_i32x4(a[4 + j], a[12 + j], 0x88);  /* L1 */
                const __m512i x3 = _mm512_shuffle_i32x4(a[4 + j], a[12 + j], 0xdd);  /* L3 */
                /* pair q = 4L + j */
                const __m512i xs[4] = {x0, x1, x2, x3};
                for (int L = 0; L < 4; L++) {
                    const int q = 4 * L + j;
                    if (q < np)
                        _mm512_mask_storeu_epi32(dst + (size_t)(p0 + q) * W + r0, fdl_bf16k_mask(nr), xs[L]);
                }
            }
        }
    }
}

/* The 14x32 micro-kernel over kp pairs; stores the mr x 32 tile (column masks c0m, c1m). */
#define FDL_BF16K_ROW(r)                                                                     \
    {                                                                                        \
        const __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[r]);                          \
        c##r##a = _mm512_dpbf16_ps(c##r##a, av, b0);                                         \
        c##r##b = _mm512_dpbf16_ps(c##r##b, av, b1);                                         \
    }
#define FDL_BF16K_STORE(r)                                                                   \
    if (r < mr) {                                                                            \
        fdl_bf16k_store(c + (size_t)(r) * ldc, c##r##a, c0m, alpha, beta);                    \
        fdl_bf16k_store(c + (size_t)(r) * ldc + 16, c##r##b, c1m, alpha, beta);               \
    }

FDL_BF16K_TARGET static inline void fdl_bf16k_store(float* c, __m512 acc, __mmask16 m, float alpha, float beta) {
    if (!m) return;
    __m512 v = alpha == 1.0f ? acc : _mm512_mul_ps(acc, _mm512_set1_ps(alpha));
    if (beta != 0.0f)   /* beta == 0: C is not read (BLAS semantics: NaN there does not propagate) */
        v = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(m, c), v);
    _mm512_mask_storeu_ps(c, m, v);
}

FDL_BF16K_TARGET static void fdl_bf16k_micro(int kp, const uint32_t* a, const uint32_t* b, float* c, size_t ldc,
                                            int mr, __mmask16 c0m, __mmask16 c1m, float alpha, float beta) {
    __m512 c0a = _mm512_setzero_ps(), c0b = c0a, c1a = c0a, c1b = c0a, c2a = c0a, c2b = c0a, c3a = c0a, c3b = c0a,
           c4a = c0a, c4b = c0a, c5a = c0a, c5b = c0a, c6a = c0a, c6b = c0a, c7a = c0a, c7b = c0a, c8a = c0a,
           c8b = c0a, c9a = c0a, c9b = c0a, c10a = c0a, c10b = c0a, c11a = c0a, c11b = c0a, c12a = c0a,
           c12b = c0a, c13a = c0a, c13b = c0a;
    for (int p = 0; p < kp; p++) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + 16);
        FDL_BF16K_ROW(0) FDL_BF16K_ROW(1) FDL_BF16K_ROW(2) FDL_BF16K_ROW(3) FDL_BF16K_ROW(4)
        FDL_BF16K_ROW(5) FDL_BF16K_ROW(6) FDL_BF16K_ROW(7) FDL_BF16K_ROW(8) FDL_BF16K_ROW(9)
        FDL_BF16K_ROW(10) FDL_BF16K_ROW(11) FDL_BF16K_ROW(12) FDL_BF16K_ROW(13)
        a += FDL_BF16K_MR;
        b += FDL_BF16K_NR;
    }
    FDL_BF16K_STORE(0) FDL_BF16K_STORE(1) FDL_BF16K_STORE(2) FDL_BF16K_STORE(3) FDL_BF16K_STORE(4)
    FDL_BF16K_STORE(5) FDL_BF16K_STORE(6) FDL_BF16K_STORE(7) FDL_BF16K_STORE(8) FDL_BF16K_STORE(9)
    FDL_BF16K_STORE(10) FDL_BF16K_STORE(11) FDL_BF16K_STORE(12) FDL_BF16K_STORE(13)
}

/* Per-calling-thread packing buffer (64-byte aligned), grown to the largest call and reused. */
#if defined(_MSC_VER)
#define FDL_BF16K_TLS __declspec(thread)
#else
#define FDL_BF16K_TLS __thread
#endif
static FDL_BF16K_TLS void* fdl_bf16k_buf = 0;
static FDL_BF16K_TLS size_t fdl_bf16k_cap = 0;

static void* fdl_bf16k_scratch(size_t bytes) {
    if (bytes > fdl_bf16k_cap) {
        void* p = 0;
        if (posix_memalign(&p, 64, bytes) != 0) return 0;
        free(fdl_bf16k_buf);
        fdl_bf16k_buf = p;
        fdl_bf16k_cap = bytes;
    }
    return fdl_bf16k_buf;
}

/* Block sizes (in panels) of the tile loop: a block's A panels (MB x 14 rows) and B panels (NB x 32
   columns) stay in L2 while its tiles are computed. Performance only: results do not depend on them. */
#define FDL_BF16K_L2_A 196608
#define FDL_BF16K_L2_B 262144

FDL_BF16K_TARGET static int fdl_bf16k_gemm_impl(int ta, int tb, int M, int N, int K, float alpha, const float* A,
                                               int lda, const float* B, int ldb, float beta, float* C, int ldc,
                                               int nthreads) {
    const int kp = (K + 1) / 2;
    const int nmp = (M + FDL_BF16K_MR - 1) / FDL_BF16K_MR, nnp = (N + FDL_BF16K_NR - 1) / FDL_BF16K_NR;
    const size_t a_words = (size_t)kp * FDL_BF16K_MR, b_words = (size_t)kp * FDL_BF16K_NR;   /* per panel */
    uint32_t* pa;
    uint32_t* pb = (uint32_t*)fdl_bf16k_scratch(4 * (a_words * nmp + b_words * nnp));
    if (!pb) return -1;
    pa = pb + b_words * nnp;
    int mb = (int)(FDL_BF16K_L2_A / (4 * a_words)), nb = (int)(FDL_BF16K_L2_B / (4 * b_words));
    if (mb < 1) mb = 1;
    if (nb < 1) nb = 1;
    if (mb > nmp) mb = nmp;
    if (nb > nnp) nb = nnp;
    int nt = nthreads < 1 ? 1 : nthreads;
    /* Below ~2^21 multiply-adds a second thread costs more (fork/join, packing split) than it saves. */
    if ((double)M * N * K < 2097152.0) nt = 1;
    /* at least ~4 blocks per thread, so that the last blocks (and a paused thread) do not leave others idle */
    while (nt > 1 && ((nmp + mb - 1) / mb) * ((nnp + nb - 1) / nb) < 4 * nt && (mb > 1 || nb > 1)) {
        if (mb >= nb) mb = (mb + 1) / 2; else nb = (nb + 1) / 2;
        if (mb == 1 && nb == 1) break;
    }
    const int gm = (nmp + mb - 1) / mb, gn = (nnp + nb - 1) / nb;
    const int nblocks = gm * gn;
    if (nt > nblocks + nmp) nt = nblocks + nmp;
    if (fdl_bf16k_forked) nt = 1;
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int t = 0; t < nnp + nmp; t++) {   /* pack B's panels, then A's */
            if (t < nnp) {
                const int j = t, n0 = j * FDL_BF16K_NR, w = N - n0 < FDL_BF16K_NR ? N - n0 : FDL_BF16K_NR;
                if (tb)
                    fdl_bf16k_pack_rows(B + (size_t)n0 * ldb, (size_t)ldb, K, w, FDL_BF16K_NR, pb + b_words * j);
                else
                    fdl_bf16k_pack_cols(B + n0, (size_t)ldb, K, w, FDL_BF16K_NR, pb + b_words * j);
            } else {
                const int i = t - nnp, m0 = i * FDL_BF16K_MR, h = M - m0 < FDL_BF16K_MR ? M - m0 : FDL_BF16K_MR;
                if (ta)
                    fdl_bf16k_pack_cols(A + m0, (size_t)lda, K, h, FDL_BF16K_MR, pa + a_words * i);
                else
                    fdl_bf16k_pack_rows(A + (size_t)m0 * lda, (size_t)lda, K, h, FDL_BF16K_MR, pa + a_words * i);
            }
        }
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int blk = 0; blk < nblocks; blk++) {
            const int bi = blk % gm, bj = blk / gm;
            const int i1 = (bi + 1) * mb < nmp ? (bi + 1) * mb : nmp, j1 = (bj + 1) * nb < nnp ? (bj + 1) * nb : nnp;
            for (int j = bj * nb; j < j1; j++) {
                const int n0 = j * FDL_BF16K_NR;
                const __mmask16 c0m = fdl_bf16k_mask(N - n0), c1m = fdl_bf16k_mask(N - n0 - 16);
                for (int i = bi * mb; i < i1; i++) {
                    const int m0 = i * FDL_BF16K_MR, mr = M - m0 < FDL_BF16K_MR ? M - m0 : FDL_BF16K_MR;
                    fdl_bf16k_micro(kp, pa + a_words * i, pb + b_words * j, C + (size_t)m0 * ldc + n0, (size_t)ldc,
                                    mr, c0m, c1m, alpha, beta);
                }
            }
        }
    }
    return 0;
}
#endif /* FDL_BF16K_COMPILED */

/* 1 when this build has the kernel and this CPU (and OS) can run it. */
static int fdl_bf16k_available(void) {
#if FDL_BF16K_COMPILED
    static int fdl_bf16k_cpu = -1;   /* -1 = not yet probed */
    if (fdl_bf16k_cpu < 0) {
        const int ok = fdl_bf16k_detect();
        if (ok) pthread_atfork(0, 0, fdl_bf16k_atfork_child);
        fdl_bf16k_cpu = ok;
    }
    return fdl_bf16k_cpu;
#else
    return 0;
#endif
}

static int fdl_bf16k_compiled(void) { return FDL_BF16K_COMPILED; }

/* Row-major C = alpha * bf16(op(A)) @ bf16(op(B)) + beta * C with M, N, K >= 1. Returns 0, -1 when the
   packing buffer cannot be allocated, -2 when the kernel is not available (check fdl_bf16k_available()). */
static int fdl_bf16k_gemm(int ta, int tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
                          int ldb, float beta, float* C, int ldc, int nthreads) {
#if FDL_BF16K_COMPILED
    if (!fdl_bf16k_available()) return -2;
    return fdl_bf16k_gemm_impl(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, nthreads);
#else
    (void)ta; (void)tb; (void)M; (void)N; (void)K; (void)alpha; (void)A; (void)lda; (void)B; (void)ldb;
    (void)beta; (void)C; (void)ldc; (void)nthreads;
    return -2;
#endif
}

#endif
