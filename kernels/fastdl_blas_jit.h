/* MKL's JIT GEMM kernels for small float32 products (kernels/_blas.pyx):
   a kernel generated once per (transposes, sizes, strides, beta) and kept in
   a small open-addressing table; MKL's functions arrive as addresses
   (fdl_jit_set), so nothing links against MKL. */
#ifndef FASTDL_BLAS_JIT_H
#define FASTDL_BLAS_JIT_H
#include <string.h>
typedef void (*fdl_sjit_kernel_t)(void*, float*, float*, float*);
typedef int (*fdl_sjit_create_t)(void**, int, int, int, int, int, int, float, int, int, float, int);
typedef void* (*fdl_jit_get_t)(const void*);
#define FDL_JIT_SLOTS 256
#define FDL_JIT_PROBES 8
typedef struct { int ready; int key[8]; void* jitter; fdl_sjit_kernel_t kern; } fdl_jit_entry;
static fdl_jit_entry fdl_jit_table[FDL_JIT_SLOTS];
static fdl_sjit_create_t fdl_sjit_create = 0;
static fdl_jit_get_t fdl_jit_get = 0;
static int fdl_jit_lock = 0;

static void fdl_jit_set(size_t create, size_t get) {
    fdl_sjit_create = (fdl_sjit_create_t)create;
    fdl_jit_get = (fdl_jit_get_t)get;
}

/* The JIT kernel of this row-major product, made on first use (under a spin
   lock: creation is rare); NULL: use the plain sgemm (no MKL, no JIT for this shape/CPU, table full,
   MKL refused). Entries are published with a release store of `ready`. */
static fdl_sjit_kernel_t fdl_sjit_lookup(int ta, int tb, int M, int N, int K, int lda, int ldb,
                                         float beta, int ldc, void** jitter) {
#if defined(__GNUC__)
    int key[8] = {ta, tb, M, N, K, lda, ldb, 2 * ldc + (beta != 0.0f)};
    unsigned h = 2166136261u;
    int i, probe;
    if (!fdl_sjit_create || !fdl_jit_get || (beta != 0.0f && beta != 1.0f)) return 0;
    for (i = 0; i < 8; i++) h = (h ^ (unsigned)key[i]) * 16777619u;
    for (probe = 0; probe < FDL_JIT_PROBES; probe++) {
        fdl_jit_entry* e = &fdl_jit_table[(h + (unsigned)probe) % FDL_JIT_SLOTS];
        if (!__atomic_load_n(&e->ready, __ATOMIC_ACQUIRE)) {
            while (__atomic_exchange_n(&fdl_jit_lock, 1, __ATOMIC_ACQUIRE)) { }
            if (!e->ready) {
                void* j = 0;
                int st = fdl_sjit_create(&j, 101, ta ? 112 : 111, tb ? 112 : 111, M, N, K, 1.0f,
                                         lda, ldb, beta, ldc);   /* 101 row-major, 111/112 (no)trans */
                memcpy(e->key, key, sizeof key);
                e->jitter = j;
                /* Only MKL_JIT_SUCCESS (0) gives a JIT kernel. MKL_NO_JIT (1: e.g. every product on
                   AMD CPUs) gives a pointer to MKL's standard sgemm, which runs even a 32x64x128
                   product on every thread (a thread wake-up per GEMM): such shapes take the plain
                   path below, single-threaded. */
                e->kern = (st == 0 && j) ? (fdl_sjit_kernel_t)fdl_jit_get(j) : 0;
                __atomic_store_n(&e->ready, 1, __ATOMIC_RELEASE);
            }
            __atomic_store_n(&fdl_jit_lock, 0, __ATOMIC_RELEASE);
        }
        if (memcmp(e->key, key, sizeof key) == 0) {
            *jitter = e->jitter;
            return e->kern;
        }
    }
#endif
    return 0;
}

#endif /* FASTDL_BLAS_JIT_H */
