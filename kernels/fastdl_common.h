/* C helpers shared by fastdl's Cython kernels (declared in _kernel_common.pxd).

   OpenMP thread count, the target_clones marker FASTDL_TC (AVX-512 / AVX2 /
   baseline copies of leaf functions, chosen by the loader), branch-free
   float32 exp / tanh / logistic / log1p that GCC vectorises, and
   order-preserving integer keys of floats. Included after Python.h and
   math.h by the Cython-generated C. */
#ifndef FASTDL_COMMON_H
#define FASTDL_COMMON_H
#include <math.h>
#include <stdint.h>

#if defined(_OPENMP)
#include <omp.h>
#define FASTDL_HAVE_OPENMP 1
#if defined(__GNUC__) && defined(__unix__)
/* libgomp is not fork-safe: a fork()ed child whose parent has run a parallel region hangs in
   its next one. Each module marks the child at fork and runs serially there (as the Numba
   kernels and MKL do: fastdl/backends/numba/_chunks.py, blas.py). */
#include <pthread.h>
static volatile int fastdl_forked = 0;
static void fastdl_mark_forked(void) { fastdl_forked = 1; }
__attribute__((constructor)) static void fastdl_register_atfork(void) {
    pthread_atfork(NULL, NULL, fastdl_mark_forked);
}
static int fastdl_max_threads(void) { return fastdl_forked ? 1 : omp_get_max_threads(); }
#else
static int fastdl_max_threads(void) { return omp_get_max_threads(); }
#endif
#else
#define FASTDL_HAVE_OPENMP 0
static int fastdl_max_threads(void) { return 1; }
#endif

#if defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 12) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && !defined(FASTDL_NO_CLONES)
#define FASTDL_TC __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FASTDL_CLONES 1
#else
#define FASTDL_TC
#define FASTDL_CLONES 0
#endif

/* Branch-free float32 exp, tanh and logistic. Written without control
   flow (bit selects instead of ?:) so that GCC vectorises the loops that
   call them even at baseline ISA (a float ?: is if-converted only with
   AVX-512 masks). exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2,
   Cephes degree-6 polynomial, 2^n applied as two normal factors so that
   n = 128 overflows to inf and subnormal results (x < -87.3) are rounded
   once; max error 1 ulp against exp in float64. NaN propagates. */
#include <stdint.h>
#if defined(_MSC_VER) && !defined(__cplusplus)
#define FASTDL_INLINE __inline
#else
#define FASTDL_INLINE inline
#endif
typedef union { float f; int32_t i; } fastdl_fi32;

static FASTDL_INLINE float fastdl_self(int c, float a, float b) {  /* c ? a : b */
    fastdl_fi32 ua, ub;
    int32_t m = -(int32_t)(c != 0);
    ua.f = a; ub.f = b;
    ua.i = (ua.i & m) | (ub.i & ~m);
    return ua.f;
}

static FASTDL_INLINE float fastdl_expf(float x) {
    fastdl_fi32 s1, s2;
    float xx = fastdl_self(x < -105.0f, -105.0f, x);
    float n, r, p;
    int32_t ni, n1;
    xx = fastdl_self(xx > 89.0f, 89.0f, xx);
    n = (xx * 1.44269504088896341f + 12582912.0f) - 12582912.0f;   /* round to nearest */
    r = xx - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    ni = (int32_t)n;
    n1 = ni >> 1;
    s1.i = (n1 + 127) << 23;
    s2.i = (ni - n1 + 127) << 23;
    return p * s1.f * s2.f;
}

static FASTDL_INLINE float fastdl_tanhf(float x) {
    /* |x| < 0.625: Cephes odd polynomial; else (1 - e)/(1 + e), e = exp(-2|x|) <= 0.29 */
    float ax = fabsf(x), s = x * x, small, e, big;
    small = ((((-5.70498872745e-3f * s + 2.06390887954e-2f) * s - 5.37397155531e-2f) * s
              + 1.33314422036e-1f) * s - 3.33332819422e-1f) * s * x + x;
    e = fastdl_expf(-2.0f * ax);
    big = copysignf((1.0f - e) / (1.0f + e), x);
    return fastdl_self(ax < 0.625f, small, big);
}

static FASTDL_INLINE float fastdl_sigmoidf(float z) {
    float e = fastdl_expf(-fabsf(z));
    return fastdl_self(z >= 0.0f, 1.0f, e) / (1.0f + e);
}

static FASTDL_INLINE float fastdl_reluf(float z) { return fastdl_self(z <= 0.0f, 0.0f, z); }

static FASTDL_INLINE float fastdl_log1pf(float x) {
    /* log(1 + x) for 0 <= x <= 1 (NaN propagates): u = 1 + x rounded, its
       rounding corrected by (x - (u - 1)) / u; log(u) by Cephes' logf
       polynomial on [sqrt(1/2), sqrt(2)) after halving u >= sqrt(2). */
    float u = 1.0f + x;
    float c = (x - (u - 1.0f)) / u;
    int big = u > 1.41421356f;
    float f = fastdl_self(big, 0.5f * u, u) - 1.0f;
    float e = fastdl_self(big, 1.0f, 0.0f);
    float z = f * f, p, y;
    p = 7.0376836292e-2f;
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    y = f * z * p + e * -2.12194440e-4f - 0.5f * z;
    return (f + y) + e * 0.693359375f + c;
}

typedef union { double f; int64_t i; } fastdl_fi64;
static FASTDL_INLINE double fastdl_seld(int c, double a, double b) {  /* c ? a : b */
    fastdl_fi64 ua, ub;
    int64_t m = -(int64_t)(c != 0);
    ua.f = a; ub.f = b;
    ua.i = (ua.i & m) | (ub.i & ~m);
    return ua.f;
}
/* Order-preserving integer keys of floats: key(a) < key(b) iff a < b for
   non-NaN a, b (-0.0 sorts below +0.0). Integer max reductions vectorise
   without -ffast-math; float ones do not. The map is its own inverse. */
static FASTDL_INLINE int32_t fastdl_fkey(float x) {
    fastdl_fi32 u; u.f = x;
    return u.i ^ ((u.i >> 31) & 0x7FFFFFFF);
}
static FASTDL_INLINE float fastdl_funkey(int32_t k) {
    fastdl_fi32 u; u.i = k ^ ((k >> 31) & 0x7FFFFFFF);
    return u.f;
}
static FASTDL_INLINE int64_t fastdl_dkey(double x) {
    fastdl_fi64 u; u.f = x;
    return u.i ^ ((u.i >> 63) & 0x7FFFFFFFFFFFFFFFLL);
}
static FASTDL_INLINE double fastdl_dunkey(int64_t k) {
    fastdl_fi64 u; u.i = k ^ ((k >> 63) & 0x7FFFFFFFFFFFFFFFLL);
    return u.f;
}
static FASTDL_INLINE double fastdl_relud(double z) {
    fastdl_fi64 u;
    u.f = z;
    u.i &= -(int64_t)(!(z <= 0.0));
    return u.f;
}

#endif /* FASTDL_COMMON_H */
