/* Row-group kernels of the BatchNorm passes (kernels/_batchnorm.pyx): static
   inline C, inlined into (and vectorised for) each target clone of the
   Cython callers. See _batchnorm.pyx's module docstring for the algorithm.
   BN_IVDEP: the rows of one group never overlap each other and the
   per-feature arrays, and dZ aliases dout element for element at most (each
   element read before it is written), so no loop-carried dependence.
   Included after Python.h (Py_ssize_t) and math.h (sqrt). */
#ifndef FASTDL_BATCHNORM_H
#define FASTDL_BATCHNORM_H
#if defined(__clang__)
#define BN_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define BN_IVDEP _Pragma("GCC ivdep")
#else
#define BN_IVDEP
#endif

/* Columns before the first 64-byte aligned element of a written row: the
   element-wise passes run them first so that the vector loop stores
   whole cache lines (a store split across two lines costs several
   cycles; NumPy's large arrays start 16 or 32 bytes into a line). */
static inline Py_ssize_t bn_head(const void* p, Py_ssize_t w, size_t size) {
    Py_ssize_t h = (Py_ssize_t)(((size_t)0 - (size_t)p) % 64 / size);
    return h < w ? h : w;
}
/* loop bodies of the element-wise passes (column j of rows 0..3 / one row) */
#define BN_NORM4(T) { \
    T h_ = mh[j], l_ = ml[j], c_ = s[j], d_ = b[j]; \
    o[j] = ((z[j] - h_) - l_) * c_ + d_; \
    o1[j] = ((z1[j] - h_) - l_) * c_ + d_; \
    o2[j] = ((z2[j] - h_) - l_) * c_ + d_; \
    o3[j] = ((z3[j] - h_) - l_) * c_ + d_; }
#define BN_NORM1 { o[j] = ((z[j] - mh[j]) - ml[j]) * s[j] + b[j]; }
#define BN_DZ4(T) { \
    T c_ = mu[j], a_ = k1[j], b_ = k2[j], d_ = k3[j]; \
    o[j] = (a_ * y[j] - b_) - d_ * (z[j] - c_); \
    o1[j] = (a_ * y1[j] - b_) - d_ * (z1[j] - c_); \
    o2[j] = (a_ * y2[j] - b_) - d_ * (z2[j] - c_); \
    o3[j] = (a_ * y3[j] - b_) - d_ * (z3[j] - c_); }
#define BN_DZ1 { o[j] = (k1[j] * y[j] - k2[j]) - k3[j] * (z[j] - mu[j]); }

#define BN_KERNELS(T, S) \
/* 8 rows: shifted sums of the block, merged with Chan (f = 8/(cnt+8), g = cnt*f) */ \
static inline void bn_stats8_##S(const T* z, Py_ssize_t n, Py_ssize_t w, const T* k, \
                                 double* mu, double* m2, double f, double g) { \
    const T *z1 = z + n, *z2 = z1 + n, *z3 = z2 + n, *z4 = z3 + n, *z5 = z4 + n, *z6 = z5 + n, \
            *z7 = z6 + n; \
    Py_ssize_t j; \
    BN_IVDEP for (j = 0; j < w; j++) { \
        double a = z[j]; \
        double d1 = z1[j] - a, d2 = z2[j] - a, d3 = z3[j] - a, d4 = z4[j] - a, \
               d5 = z5[j] - a, d6 = z6[j] - a, d7 = z7[j] - a; \
        double s1 = ((d1 + d2) + (d3 + d4)) + ((d5 + d6) + d7); \
        double s2 = ((d1 * d1 + d2 * d2) + (d3 * d3 + d4 * d4)) + ((d5 * d5 + d6 * d6) + d7 * d7); \
        double dl = (s1 * 0.125 + (a - k[j])) - mu[j]; \
        mu[j] += dl * f; \
        m2[j] += (s2 - s1 * s1 * 0.125) + dl * dl * g; \
    } \
} \
/* one row (Welford: f = 1/(cnt+1), g = cnt*f) */ \
static inline void bn_stats1_##S(const T* z, Py_ssize_t w, const T* k, double* mu, double* m2, \
                                 double f, double g) { \
    Py_ssize_t j; \
    BN_IVDEP for (j = 0; j < w; j++) { \
        double dl = ((double)z[j] - k[j]) - mu[j]; \
        mu[j] += dl * f; \
        m2[j] += dl * dl * g; \
    } \
} \
static inline void bn_norm4_##S(const T* z, T* o, Py_ssize_t n, Py_ssize_t w, const T* mh, \
                                const T* ml, const T* s, const T* b) { \
    const T *z1 = z + n, *z2 = z1 + n, *z3 = z2 + n; \
    T *o1 = o + n, *o2 = o1 + n, *o3 = o2 + n; \
    Py_ssize_t j, h = bn_head(o, w, sizeof(T)); \
    BN_IVDEP for (j = 0; j < h; j++) \
        BN_NORM4(T) \
    BN_IVDEP for (j = h; j < w; j++) \
        BN_NORM4(T) \
} \
static inline void bn_norm1_##S(const T* z, T* o, Py_ssize_t w, const T* mh, const T* ml, \
                                const T* s, const T* b) { \
    Py_ssize_t j, h = bn_head(o, w, sizeof(T)); \
    BN_IVDEP for (j = 0; j < h; j++) \
        BN_NORM1 \
    BN_IVDEP for (j = h; j < w; j++) \
        BN_NORM1 \
} \
/* sb += sum(dy), sg += sum(dy * (z - mu)) over 4 rows (8 would spill registers) */ \
static inline void bn_bsums4_##S(const T* z, const T* y, Py_ssize_t n, Py_ssize_t w, const T* mu, \
                                 double* sb, double* sg) { \
    const T *z1 = z + n, *z2 = z1 + n, *z3 = z2 + n, *y1 = y + n, *y2 = y1 + n, *y3 = y2 + n; \
    Py_ssize_t j; \
    BN_IVDEP for (j = 0; j < w; j++) { \
        double c = mu[j], e0 = y[j], e1 = y1[j], e2 = y2[j], e3 = y3[j]; \
        sb[j] += (e0 + e1) + (e2 + e3); \
        sg[j] += (e0 * (z[j] - c) + e1 * (z1[j] - c)) + (e2 * (z2[j] - c) + e3 * (z3[j] - c)); \
    } \
} \
static inline void bn_bsums1_##S(const T* z, const T* y, Py_ssize_t w, const T* mu, double* sb, \
                                 double* sg) { \
    Py_ssize_t j; \
    BN_IVDEP for (j = 0; j < w; j++) { \
        double e = y[j]; \
        sb[j] += e; \
        sg[j] += e * ((double)z[j] - mu[j]); \
    } \
} \
static inline void bn_dz4_##S(const T* z, const T* y, T* o, Py_ssize_t n, Py_ssize_t w, const T* mu, \
                              const T* k1, const T* k2, const T* k3) { \
    const T *z1 = z + n, *z2 = z1 + n, *z3 = z2 + n, *y1 = y + n, *y2 = y1 + n, *y3 = y2 + n; \
    T *o1 = o + n, *o2 = o1 + n, *o3 = o2 + n; \
    Py_ssize_t j, h = bn_head(o, w, sizeof(T)); \
    BN_IVDEP for (j = 0; j < h; j++) \
        BN_DZ4(T) \
    BN_IVDEP for (j = h; j < w; j++) \
        BN_DZ4(T) \
} \
static inline void bn_dz1_##S(const T* z, const T* y, T* o, Py_ssize_t w, const T* mu, const T* k1, \
                              const T* k2, const T* k3) { \
    Py_ssize_t j, h = bn_head(o, w, sizeof(T)); \
    BN_IVDEP for (j = 0; j < h; j++) \
        BN_DZ1 \
    BN_IVDEP for (j = h; j < w; j++) \
        BN_DZ1 \
} \
/* per-feature results and the parameters of the element-wise pass (columns \
   [0, w)); m2 becomes var, sd holds sqrt(var + eps). The sqrt has a loop \
   of its own: with errno (the default) GCC does not vectorise it. */ \
static inline void bn_fwd_finish_##S( \
        Py_ssize_t w, Py_ssize_t m, double eps, double mom, const T* k, const double* mu, \
        double* m2, double* sd, const T* gamma, const T* beta, T* mean, T* inv_std, \
        T* run_mean, T* run_var, T* mh, T* ml, T* s, T* b) { \
    Py_ssize_t j; \
    BN_IVDEP for (j = 0; j < w; j++) \
        m2[j] = m2[j] / m; \
    for (j = 0; j < w; j++) \
        sd[j] = sqrt(m2[j] + eps); \
    BN_IVDEP for (j = 0; j < w; j++) { \
        double u = mu[j] + k[j], var = m2[j], istd = 1.0 / sd[j]; \
        T h = (T)u; \
        mean[j] = h; \
        inv_std[j] = (T)istd; \
        run_mean[j] = (T)(mom * run_mean[j] + (1.0 - mom) * u); \
        run_var[j] = (T)(mom * run_var[j] + (1.0 - mom) * var); \
        mh[j] = h; \
        ml[j] = (T)(u - h); \
        s[j] = (T)(gamma[j] * istd); \
        b[j] = beta[j]; \
    } \
} \
/* dgamma, dbeta and the coefficients of dZ = k1*dy - k2 - k3*(z - mean) */ \
static inline void bn_bwd_finish_##S(Py_ssize_t w, Py_ssize_t m, const T* gamma, const T* inv_std, \
                                     const double* sb, const double* sg, T* dgamma, T* dbeta, \
                                     T* k1, T* k2, T* k3) { \
    Py_ssize_t j; \
    double inv_m = 1.0 / m; \
    BN_IVDEP for (j = 0; j < w; j++) { \
        double istd = inv_std[j], dg = sg[j] * istd, g = gamma[j] * istd; \
        dgamma[j] = (T)dg; \
        dbeta[j] = (T)sb[j]; \
        k1[j] = (T)g; \
        k2[j] = (T)(g * sb[j] * inv_m); \
        k3[j] = (T)(g * dg * istd * inv_m); \
    } \
}

BN_KERNELS(float, f)
BN_KERNELS(double, d)

#endif /* FASTDL_BATCHNORM_H */
