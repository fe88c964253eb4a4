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
 *   summation order of an element depends only on K. Threads (fastdl's thread count, the OpenMP one
 *   the caller passes) take whole panels to pack and whole blocks of output tiles to compute from an
 *   atomic ticket: the calling thread works from the start and helper threads join when the OS runs
 *   them (on shared cores an OpenMP barrier waiting for every thread measured slower than one thread).
 *   Which thread computes a tile never changes its bits: results are identical run to run and for any
 *   number of threads.
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
#include <sched.h>

/* Set in a fork()ed child: the helper threads of the parent do not exist there, so the kernel runs on the
   calling thread only (as fastdl's Numba kernels do, fastdl/backends/numba/_chunks.py). */
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

/* Pairs [p0, p1) of every panel of width W (columns of op(B), or rows of op(A)) of an operand whose K-pairs
   come from two consecutive source rows: src = element (k=0, column 0), ld = source row stride, N columns
   (the last panel's columns past N are zero), panel j at dst + j * panel_words. The two source rows are
   read contiguously: going down K rows of one panel at a time (rows often a page or more apart) packed at
   half the speed. */
#define FDL_BF16K_PAIRS_PER_TASK 16
FDL_BF16K_TARGET static void fdl_bf16k_pack_cols_range(const float* src, size_t ld, int K, int N, int W, int p0, int p1,
                                                      uint32_t* dst, size_t panel_words) {
    const int np = (N + W - 1) / W;
    for (int p = p0; p < p1; p++) {
        const float* s0 = src + (size_t)(2 * p) * ld;
        const int odd = 2 * p + 1 < K;
        for (int j = 0; j < np; j++) {
            const int w = N - j * W;
            for (int c = 0; c < W; c += 16) {
                const __mmask16 ml = fdl_bf16k_mask(w - c), ms = fdl_bf16k_mask(W - c);
                const __m512i r0 = fdl_bf16k_round(_mm512_maskz_loadu_ps(ml, s0 + (size_t)j * W + c));
                const __m512i r1 = odd ? fdl_bf16k_round(_mm512_maskz_loadu_ps(ml, s0 + ld + (size_t)j * W + c))
                                       : _mm512_setzero_si512();
                _mm512_mask_storeu_epi32(dst + panel_words * j + (size_t)p * W + c, ms,
                                         _mm512_or_si512(r0, _mm512_slli_epi32(r1, 16)));
            }
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

/* Per-calling-thread packing buffer (64-byte aligned), grown to the largest call and reused; freed when
   the thread exits (a pthread key's destructor), so threads that come and go leave nothing behind. */
typedef struct { void* p; size_t cap; } fdl_bf16k_buf_t;
static pthread_key_t fdl_bf16k_key;
static pthread_once_t fdl_bf16k_key_once = PTHREAD_ONCE_INIT;
static int fdl_bf16k_key_ok = 0;

static void fdl_bf16k_buf_free(void* b) {
    if (b) {
        free(((fdl_bf16k_buf_t*)b)->p);
        free(b);
    }
}

static void fdl_bf16k_key_make(void) { fdl_bf16k_key_ok = pthread_key_create(&fdl_bf16k_key, fdl_bf16k_buf_free) == 0; }

static void* fdl_bf16k_scratch(size_t bytes) {
    fdl_bf16k_buf_t* b;
    pthread_once(&fdl_bf16k_key_once, fdl_bf16k_key_make);
    if (!fdl_bf16k_key_ok) return 0;
    b = (fdl_bf16k_buf_t*)pthread_getspecific(fdl_bf16k_key);
    if (!b) {
        b = (fdl_bf16k_buf_t*)calloc(1, sizeof(*b));
        if (!b || pthread_setspecific(fdl_bf16k_key, b) != 0) {
            free(b);
            return 0;
        }
    }
    if (bytes > b->cap) {
        void* p = 0;
        if (posix_memalign(&p, 64, bytes) != 0) return 0;
        free(b->p);
        b->p = p;
        b->cap = bytes;
    }
    return b->p;
}

/* Block sizes (in panels) of the tile loop: a block's A panels (MB x 14 rows) and B panels (NB x 32
   columns) stay in L2 while its tiles are computed. Performance only: results do not depend on them. */
#define FDL_BF16K_L2_A 196608
#define FDL_BF16K_L2_B 262144

/* One GEMM call as a list of tasks: [0, nbt) pack B (a panel, or with B not transposed a range of
   FDL_BF16K_PAIRS_PER_TASK K-pairs of every panel), [nbt, npack) pack A (likewise: a panel, or with A
   transposed a range of pairs), then the output blocks (each needs every panel packed). Any thread may run
   any task: a task's bits do not depend on which thread runs it. */
typedef struct {
    int ta, tb, M, N, K, lda, ldb, ldc, kp, nmp, nnp, mb, nb, gm, nbt, npack, ntasks, helpers;
    float alpha, beta;
    const float* A;
    const float* B;
    float* C;
    uint32_t* pa;
    uint32_t* pb;
    size_t a_words, b_words;
} fdl_bf16k_job;

FDL_BF16K_TARGET static void fdl_bf16k_task(const fdl_bf16k_job* j, int t) {
    if (t < j->nbt) {
        if (j->tb) {
            const int n0 = t * FDL_BF16K_NR, w = j->N - n0 < FDL_BF16K_NR ? j->N - n0 : FDL_BF16K_NR;
            fdl_bf16k_pack_rows(j->B + (size_t)n0 * j->ldb, (size_t)j->ldb, j->K, w, FDL_BF16K_NR, j->pb + j->b_words * t);
        } else {
            const int p0 = t * FDL_BF16K_PAIRS_PER_TASK;
            const int p1 = p0 + FDL_BF16K_PAIRS_PER_TASK < j->kp ? p0 + FDL_BF16K_PAIRS_PER_TASK : j->kp;
            fdl_bf16k_pack_cols_range(j->B, (size_t)j->ldb, j->K, j->N, FDL_BF16K_NR, p0, p1, j->pb, j->b_words);
        }
    } else if (t < j->npack) {
        const int i = t - j->nbt;
        if (j->ta) {
            const int p0 = i * FDL_BF16K_PAIRS_PER_TASK;
            const int p1 = p0 + FDL_BF16K_PAIRS_PER_TASK < j->kp ? p0 + FDL_BF16K_PAIRS_PER_TASK : j->kp;
            fdl_bf16k_pack_cols_range(j->A, (size_t)j->lda, j->K, j->M, FDL_BF16K_MR, p0, p1, j->pa, j->a_words);
        } else {
            const int m0 = i * FDL_BF16K_MR, h = j->M - m0 < FDL_BF16K_MR ? j->M - m0 : FDL_BF16K_MR;
            fdl_bf16k_pack_rows(j->A + (size_t)m0 * j->lda, (size_t)j->lda, j->K, h, FDL_BF16K_MR, j->pa + j->a_words * i);
        }
    } else {
        const int blk = t - j->npack, bi = blk % j->gm, bj = blk / j->gm;
        const int i1 = (bi + 1) * j->mb < j->nmp ? (bi + 1) * j->mb : j->nmp;
        const int j1 = (bj + 1) * j->nb < j->nnp ? (bj + 1) * j->nb : j->nnp;
        for (int jj = bj * j->nb; jj < j1; jj++) {
            const int n0 = jj * FDL_BF16K_NR;
            const __mmask16 c0m = fdl_bf16k_mask(j->N - n0), c1m = fdl_bf16k_mask(j->N - n0 - 16);
            for (int i = bi * j->mb; i < i1; i++) {
                const int m0 = i * FDL_BF16K_MR, mr = j->M - m0 < FDL_BF16K_MR ? j->M - m0 : FDL_BF16K_MR;
                fdl_bf16k_micro(j->kp, j->pa + j->a_words * i, j->pb + j->b_words * jj, j->C + (size_t)m0 * j->ldc + n0,
                                (size_t)j->ldc, mr, c0m, c1m, j->alpha, j->beta);
            }
        }
    }
}

/* A small pool of helper threads that JOIN a call late rather than being waited for. On a machine whose
   cores are shared (or oversubscribed), an OpenMP team's end-of-region barrier waits until every thread
   has been scheduled, which measured 1.5x slower here than one thread; here the calling thread claims tasks
   itself (an atomic ticket: generation << 32 | next task) and only waits for tasks a helper has already
   claimed. Helpers spin briefly for the next call (the GEMMs of a step come back to back), then sleep. */
#define FDL_BF16K_MAX_HELPERS 63
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_mutex_t caller;   /* one multi-threaded call at a time; a concurrent caller runs serially */
    int nhelpers;
    uint32_t gen;             /* job generation (never 0), written under mu */
    fdl_bf16k_job job;        /* the job of generation gen, written under mu */
    uint64_t ticket;          /* atomic: gen << 32 | next unclaimed task */
    int packed, done;         /* atomic: packing tasks done, tasks done (of the current generation) */
} fdl_bf16k_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, 0, 0, {0}, 0, 0, 0};

static inline void fdl_bf16k_relax(int* spins) {
    if (++*spins < 2000) _mm_pause(); else sched_yield();
}

/* Claim and run tasks of generation gen until none is left (or a newer generation was published). */
FDL_BF16K_TARGET static void fdl_bf16k_run(const fdl_bf16k_job* j, uint32_t gen) {
    for (;;) {
        uint64_t t = __atomic_load_n(&fdl_bf16k_pool.ticket, __ATOMIC_ACQUIRE);
        for (;;) {
            if ((uint32_t)(t >> 32) != gen || (int)(uint32_t)t >= j->ntasks) return;
            if (__atomic_compare_exchange_n(&fdl_bf16k_pool.ticket, &t, t + 1, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                break;
        }
        const int task = (int)(uint32_t)t;
        if (task >= j->npack) {   /* an output block: every panel must be packed (claimed ones are in progress) */
            int spins = 0;
            while (__atomic_load_n(&fdl_bf16k_pool.packed, __ATOMIC_ACQUIRE) < j->npack) fdl_bf16k_relax(&spins);
        }
        fdl_bf16k_task(j, task);
        if (task < j->npack) __atomic_fetch_add(&fdl_bf16k_pool.packed, 1, __ATOMIC_RELEASE);
        __atomic_fetch_add(&fdl_bf16k_pool.done, 1, __ATOMIC_RELEASE);
    }
}

FDL_BF16K_TARGET static void* fdl_bf16k_helper(void* arg) {
    const int index = (int)(intptr_t)arg;
    uint32_t seen = 0;
    for (;;) {
        fdl_bf16k_job j;
        uint32_t g;
        for (int s = 0; s < 4000 && __atomic_load_n(&fdl_bf16k_pool.gen, __ATOMIC_ACQUIRE) == seen; s++) _mm_pause();
        pthread_mutex_lock(&fdl_bf16k_pool.mu);
        while (fdl_bf16k_pool.gen == seen) pthread_cond_wait(&fdl_bf16k_pool.cv, &fdl_bf16k_pool.mu);
        g = fdl_bf16k_pool.gen;
        j = fdl_bf16k_pool.job;
        pthread_mutex_unlock(&fdl_bf16k_pool.mu);
        seen = g;
        if (index < j.helpers) fdl_bf16k_run(&j, g);   /* the call's thread count: helpers beyond it stay out */
    }
    return 0;
}

FDL_BF16K_TARGET static void fdl_bf16k_execute(fdl_bf16k_job* jb, int nt) {
    if (nt > 1 && !fdl_bf16k_forked && pthread_mutex_trylock(&fdl_bf16k_pool.caller) == 0) {
        uint32_t g;
        if (nt - 1 > FDL_BF16K_MAX_HELPERS) nt = FDL_BF16K_MAX_HELPERS + 1;
        while (fdl_bf16k_pool.nhelpers < nt - 1) {
            pthread_t th;
            pthread_attr_t at;
            int ok;
            pthread_attr_init(&at);
            pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
            ok = pthread_create(&th, &at, fdl_bf16k_helper, (void*)(intptr_t)fdl_bf16k_pool.nhelpers) == 0;
            pthread_attr_destroy(&at);
            if (!ok) break;   /* fewer helpers: the same results, later */
            fdl_bf16k_pool.nhelpers++;
        }
        jb->helpers = nt - 1 < fdl_bf16k_pool.nhelpers ? nt - 1 : fdl_bf16k_pool.nhelpers;
        pthread_mutex_lock(&fdl_bf16k_pool.mu);
        g = fdl_bf16k_pool.gen + 1 == 0 ? 1 : fdl_bf16k_pool.gen + 1;
        fdl_bf16k_pool.job = *jb;
        __atomic_store_n(&fdl_bf16k_pool.packed, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&fdl_bf16k_pool.done, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&fdl_bf16k_pool.ticket, (uint64_t)g << 32, __ATOMIC_RELEASE);
        __atomic_store_n(&fdl_bf16k_pool.gen, g, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&fdl_bf16k_pool.cv);
        pthread_mutex_unlock(&fdl_bf16k_pool.mu);
        fdl_bf16k_run(jb, g);
        {   /* every task is claimed; wait only for those a helper is still running */
            int spins = 0;
            while (__atomic_load_n(&fdl_bf16k_pool.done, __ATOMIC_ACQUIRE) < jb->ntasks) fdl_bf16k_relax(&spins);
        }
        pthread_mutex_unlock(&fdl_bf16k_pool.caller);
        return;
    }
    for (int t = 0; t < jb->ntasks; t++) fdl_bf16k_task(jb, t);
}

FDL_BF16K_TARGET static int fdl_bf16k_gemm_impl(int ta, int tb, int M, int N, int K, float alpha, const float* A,
                                               int lda, const float* B, int ldb, float beta, float* C, int ldc,
                                               int nthreads) {
    fdl_bf16k_job j;
    j.ta = ta; j.tb = tb; j.M = M; j.N = N; j.K = K; j.lda = lda; j.ldb = ldb; j.ldc = ldc;
    j.alpha = alpha; j.beta = beta; j.A = A; j.B = B; j.C = C;
    j.kp = (K + 1) / 2;
    j.nmp = (M + FDL_BF16K_MR - 1) / FDL_BF16K_MR;
    j.nnp = (N + FDL_BF16K_NR - 1) / FDL_BF16K_NR;
    j.a_words = (size_t)j.kp * FDL_BF16K_MR;   /* per panel */
    j.b_words = (size_t)j.kp * FDL_BF16K_NR;
    j.pb = (uint32_t*)fdl_bf16k_scratch(4 * (j.a_words * j.nmp + j.b_words * j.nnp));
    if (!j.pb) return -1;
    j.pa = j.pb + j.b_words * j.nnp;
    int mb = (int)(FDL_BF16K_L2_A / (4 * j.a_words)), nb = (int)(FDL_BF16K_L2_B / (4 * j.b_words));
    if (mb < 1) mb = 1;
    if (nb < 1) nb = 1;
    if (mb > j.nmp) mb = j.nmp;
    if (nb > j.nnp) nb = j.nnp;
    int nt = nthreads < 1 ? 1 : nthreads;
    /* Below ~2^21 multiply-adds a second thread costs more (wake-up, packing split) than it saves. */
    if ((double)M * N * K < 2097152.0) nt = 1;
    /* at least ~4 blocks per thread, so that the last blocks (and a paused thread) do not leave others idle */
    while (nt > 1 && ((j.nmp + mb - 1) / mb) * ((j.nnp + nb - 1) / nb) < 4 * nt && (mb > 1 || nb > 1)) {
        if (mb >= nb) mb = (mb + 1) / 2; else nb = (nb + 1) / 2;
    }
    j.mb = mb; j.nb = nb;
    j.gm = (j.nmp + mb - 1) / mb;
    {   /* packing tasks: per panel, or per range of K-pairs over every panel (see fdl_bf16k_task) */
        const int ranges = (j.kp + FDL_BF16K_PAIRS_PER_TASK - 1) / FDL_BF16K_PAIRS_PER_TASK;
        j.nbt = tb ? j.nnp : ranges;
        j.npack = j.nbt + (ta ? ranges : j.nmp);
    }
    j.ntasks = j.npack + j.gm * ((j.nnp + nb - 1) / nb);
    j.helpers = 0;
    fdl_bf16k_execute(&j, nt);
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
