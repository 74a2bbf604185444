/* Row-major GEMMs where m, the batch, is small and B is a large weight matrix, as in a fully
 * connected layer at a small batch:
 *
 *   skinny_abt:  C[m, n] = A[m, k] . B[n, k]^T + beta * C   (forward: each output is a dot product)
 *   skinny_ab:   C[m, n] = A[m, k] . B[k, n]   + beta * C   (backward-data: rows of B are axpys)
 *
 * m is at most SKINNY_MAX_M. BLAS packs the large operand before it multiplies; at a batch of 16
 * that copy costs about as much as the product. These kernels stream B from memory once, with
 * software prefetch, and keep A in cache. (The weight gradient, C += A^T . B with a small K, was
 * measured too: OpenBLAS streams C faster than a plain kernel did, so it stays with BLAS.)
 * Register tiles are fixed (TILE_* below); a partial tile computes its missing rows from a copy of
 * a valid row (or from zeros) and stores only the valid results, so every element of C goes through
 * the same operations in the same order whatever tile, block or thread computes it. Threads split
 * the output columns (never the sum), so the result is the same for any thread count. beta == 0
 * never reads C.
 *
 * The AVX-512 versions are used when the compiler targets AVX-512F; the portable versions (plain C,
 * written so that the compiler can vectorize across lanes or columns) serve double, and float on
 * other CPUs.
 */
#ifndef MINICAFFE_SKINNY_GEMM_H
#define MINICAFFE_SKINNY_GEMM_H

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* The largest m the kernels take (skinny_abt keeps partial sums for all of it, skinny_ab packs it). */
#define SKINNY_MAX_M 64
/* Portable dot products keep this many partial sums per output, one per lane. */
#define SKINNY_LANES 8

static inline int skinny_team(int threads) {
#ifdef _OPENMP
    return threads > 1 ? threads : 1;
#else
    (void)threads;
    return 1;
#endif
}

static inline int skinny_thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* The part [lo, hi) of [0, extent) that thread t of `team` owns, cut on multiples of `align`. */
static inline void skinny_share(int extent, int align, int team, int t, int* lo, int* hi) {
    int units = (extent + align - 1) / align;
    int per = units / team, extra = units % team;
    int first = t * per + (t < extra ? t : extra);
    int count = per + (t < extra ? 1 : 0);
    *lo = first * align < extent ? first * align : extent;
    *hi = (first + count) * align < extent ? (first + count) * align : extent;
}

/* ------------------------------------------------------------------------------------------------
 * Portable versions, one per element type.
 */
#define SKINNY_PORTABLE(T, SUFFIX)                                                                   \
static void skinny_abt_part_##SUFFIX(int m, int k, const T* a, long lda, const T* b, long ldb,       \
                                     T* c, long ldc, T beta, int n0, int n1) {                       \
    for (int j = n0; j < n1; j++) {                                                                  \
        const T* brow = b + (long)j * ldb;                                                           \
        for (int i = 0; i < m; i++) {                                                                \
            const T* arow = a + (long)i * lda;                                                       \
            T lanes[SKINNY_LANES] = {0};                                                             \
            int kk = 0;                                                                              \
            for (; kk + SKINNY_LANES <= k; kk += SKINNY_LANES)                                       \
                for (int l = 0; l < SKINNY_LANES; l++) lanes[l] += arow[kk + l] * brow[kk + l];      \
            for (int l = 0; kk + l < k; l++) lanes[l] += arow[kk + l] * brow[kk + l];                \
            T sum = 0;                                                                               \
            for (int l = 0; l < SKINNY_LANES; l++) sum += lanes[l];                                  \
            T* out = c + (long)i * ldc + j;                                                          \
            *out = beta == 0 ? sum : beta * *out + sum;                                              \
        }                                                                                            \
    }                                                                                                \
}                                                                                                    \
                                                                                                     \
static void skinny_ab_part_##SUFFIX(int m, int k, const T* a, long lda, const T* b, long ldb,        \
                                    T* c, long ldc, T beta, int n0, int n1) {                        \
    for (int i = 0; i < m; i++) {                                                                    \
        T* crow = c + (long)i * ldc;                                                                 \
        const T* arow = a + (long)i * lda;                                                           \
        for (int j = n0; j < n1; j++) crow[j] = beta == 0 ? 0 : beta * crow[j];                      \
        for (int kk = 0; kk < k; kk++) {                                                             \
            const T* brow = b + (long)kk * ldb;                                                      \
            T scale = arow[kk];                                                                      \
            for (int j = n0; j < n1; j++) crow[j] += scale * brow[j];                                \
        }                                                                                            \
    }                                                                                                \
}

SKINNY_PORTABLE(double, f64)
#if !defined(__AVX512F__)
SKINNY_PORTABLE(float, f32)
#endif

/* ------------------------------------------------------------------------------------------------
 * AVX-512 float versions.
 */
#if defined(__AVX512F__)

/* The sizes below were chosen by timing fc6/fc7/fc8 of AlexNet at batch 16 (docs/PERFORMANCE.md).
 * skinny_abt: TILE_ABT_I rows of A x TILE_ABT_J rows of B, one 16-lane partial sum each, over K
 * blocks of SKINNY_ABT_KB values. */
#define TILE_ABT_I 4
#define TILE_ABT_J 6
#define SKINNY_ABT_KB 256
/* skinny_ab: TILE_AB_I rows of C x TILE_AB_V vectors of 16 columns; K blocks of SKINNY_AB_KB rows of
 * B, column chunks of SKINNY_AB_NB, each prefetched SKINNY_AB_AHEAD chunks ahead. */
#define TILE_AB_I 4
#define TILE_AB_V 4
#define SKINNY_AB_KB 64
#define SKINNY_AB_NB 64
#define SKINNY_AB_AHEAD 1

static inline __mmask16 skinny_mask(int remaining) {
    return remaining >= 16 ? (__mmask16)0xFFFF : remaining <= 0 ? 0 : (__mmask16)((1u << remaining) - 1);
}

/* One TILE_ABT_I x TILE_ABT_J tile over K values [k0, k0 + kb): the 16-lane partial sums live in
 * `acc` between K blocks. `ahead`, when not NULL, is the next block of B rows: it is fetched into L2
 * while this one runs. */
static inline void skinny_abt_tile(int rows_a, int rows_b, int k0, int kb, const float* a, long lda,
                                   const float* b, long ldb, __m512* acc, const float* ahead, int ahead_rows) {
    const float* arow[TILE_ABT_I];
    const float* brow[TILE_ABT_J];
    for (int i = 0; i < TILE_ABT_I; i++) arow[i] = a + (long)(i < rows_a ? i : rows_a - 1) * lda + k0;
    for (int j = 0; j < TILE_ABT_J; j++) brow[j] = b + (long)(j < rows_b ? j : rows_b - 1) * ldb + k0;
    __m512 sum[TILE_ABT_I][TILE_ABT_J];
    for (int i = 0; i < TILE_ABT_I; i++)
        for (int j = 0; j < TILE_ABT_J; j++) sum[i][j] = acc[i * TILE_ABT_J + j];
    int kk = 0;
    for (; kk + 16 <= kb; kk += 16) {
        __m512 bv[TILE_ABT_J];
        for (int j = 0; j < TILE_ABT_J; j++) bv[j] = _mm512_loadu_ps(brow[j] + kk);
        if (ahead)
            for (int j = 0; j < ahead_rows; j++)
                _mm_prefetch((const char*)(ahead + j * ldb + k0 + kk), _MM_HINT_T1);
        for (int i = 0; i < TILE_ABT_I; i++) {
            __m512 av = _mm512_loadu_ps(arow[i] + kk);
            for (int j = 0; j < TILE_ABT_J; j++) sum[i][j] = _mm512_fmadd_ps(av, bv[j], sum[i][j]);
        }
    }
    if (kk < kb) {
        __mmask16 tail = skinny_mask(kb - kk);
        __m512 bv[TILE_ABT_J];
        for (int j = 0; j < TILE_ABT_J; j++) bv[j] = _mm512_maskz_loadu_ps(tail, brow[j] + kk);
        for (int i = 0; i < TILE_ABT_I; i++) {
            __m512 av = _mm512_maskz_loadu_ps(tail, arow[i] + kk);
            for (int j = 0; j < TILE_ABT_J; j++) sum[i][j] = _mm512_fmadd_ps(av, bv[j], sum[i][j]);
        }
    }
    for (int i = 0; i < TILE_ABT_I; i++)
        for (int j = 0; j < TILE_ABT_J; j++) acc[i * TILE_ABT_J + j] = sum[i][j];
}

/* Each block of TILE_ABT_J rows of B runs over K in blocks of SKINNY_ABT_KB, every row group of A
 * within a block, so the B block is read from memory once and then from L1. */
static void skinny_abt_part_f32(int m, int k, const float* a, long lda, const float* b, long ldb,
                                float* c, long ldc, float beta, int n0, int n1) {
    enum { GROUPS = (SKINNY_MAX_M + TILE_ABT_I - 1) / TILE_ABT_I, TILE = TILE_ABT_I * TILE_ABT_J };
    __m512 acc[GROUPS * TILE];
    int groups = (m + TILE_ABT_I - 1) / TILE_ABT_I;
    for (int j = n0; j < n1; j += TILE_ABT_J) {
        int rows_b = n1 - j < TILE_ABT_J ? n1 - j : TILE_ABT_J;
        int next = j + TILE_ABT_J;
        int ahead_rows = n1 - next < TILE_ABT_J ? n1 - next : TILE_ABT_J;
        for (int t = 0; t < groups * TILE; t++) acc[t] = _mm512_setzero_ps();
        for (int k0 = 0; k0 < k; k0 += SKINNY_ABT_KB) {
            int kb = k - k0 < SKINNY_ABT_KB ? k - k0 : SKINNY_ABT_KB;
            for (int g = 0; g < groups; g++) {
                int i = g * TILE_ABT_I;
                int rows_a = m - i < TILE_ABT_I ? m - i : TILE_ABT_I;
                skinny_abt_tile(rows_a, rows_b, k0, kb, a + (long)i * lda, lda, b + (long)j * ldb, ldb,
                                acc + g * TILE, g == 0 && ahead_rows > 0 ? b + (long)next * ldb : NULL,
                                ahead_rows);
            }
        }
        for (int i = 0; i < m; i++)
            for (int jj = 0; jj < rows_b; jj++) {
                float sum = _mm512_reduce_add_ps(acc[(i / TILE_ABT_I) * TILE + (i % TILE_ABT_I) * TILE_ABT_J + jj]);
                float* out = c + (long)i * ldc + j + jj;
                *out = beta == 0 ? sum : beta * *out + sum;
            }
    }
}

/* C[rows, 16 * TILE_AB_V columns] (+)= A[rows, kb] . Bcopy[kb, 16 * TILE_AB_V], with A^T packed as
 * [kb][stride] (zero rows past m) and the block of B copied to a contiguous buffer. Rows past
 * `valid` are computed but neither read nor written in C; columns past `columns` are masked. `load`
 * says whether C already holds a partial sum (else it starts from beta * C, or zero if beta == 0). */
static inline void skinny_ab_tile(int valid, int kb, const float* at, int stride, const float* bcopy,
                                  float* c, long ldc, int columns, int load, float beta) {
    __mmask16 mask[TILE_AB_V];
    for (int v = 0; v < TILE_AB_V; v++) mask[v] = skinny_mask(columns - 16 * v);
    __m512 acc[TILE_AB_I][TILE_AB_V];
    for (int i = 0; i < TILE_AB_I; i++) {
        const float* crow = c + (long)(i < valid ? i : valid - 1) * ldc;
        for (int v = 0; v < TILE_AB_V; v++) {
            __m512 old = load || beta != 0 ? _mm512_maskz_loadu_ps(mask[v], crow + 16 * v) : _mm512_setzero_ps();
            acc[i][v] = load || beta == 1 ? old : _mm512_mul_ps(old, _mm512_set1_ps(beta));
        }
    }
    for (int kk = 0; kk < kb; kk++) {
        const float* brow = bcopy + kk * SKINNY_AB_NB;
        const float* av = at + kk * stride;
        __m512 bv[TILE_AB_V];
        for (int v = 0; v < TILE_AB_V; v++) bv[v] = _mm512_load_ps(brow + 16 * v);
        for (int i = 0; i < TILE_AB_I; i++) {
            __m512 ai = _mm512_set1_ps(av[i]);
            for (int v = 0; v < TILE_AB_V; v++) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
        }
    }
    for (int i = 0; i < valid && i < TILE_AB_I; i++)
        for (int v = 0; v < TILE_AB_V; v++)
            _mm512_mask_storeu_ps(c + (long)i * ldc + 16 * v, mask[v], acc[i][v]);
}

/* K runs in blocks of SKINNY_AB_KB rows of B, columns in chunks of SKINNY_AB_NB: each chunk is read
 * from memory once, as SKINNY_AB_KB runs of contiguous lines, into a buffer that every row group of
 * A then reads from L1. (Used in place, the rows of a weight matrix, usually a multiple of 4 KiB
 * apart, would evict each other from L1.) */
static void skinny_ab_part_f32(int m, int k, const float* a, long lda, const float* b, long ldb,
                               float* c, long ldc, float beta, int n0, int n1) {
    int stride = (m + TILE_AB_I - 1) / TILE_AB_I * TILE_AB_I;
    float at[SKINNY_AB_KB * SKINNY_MAX_M];
    float bcopy[SKINNY_AB_KB * SKINNY_AB_NB] __attribute__((aligned(64)));
    for (int k0 = 0; k0 < k; k0 += SKINNY_AB_KB) {
        int kb = k - k0 < SKINNY_AB_KB ? k - k0 : SKINNY_AB_KB;
        for (int kk = 0; kk < kb; kk++)
            for (int i = 0; i < stride; i++) at[kk * stride + i] = i < m ? a[(long)i * lda + k0 + kk] : 0.0f;
        for (int j = n0; j < n1; j += SKINNY_AB_NB) {
            int width = n1 - j < SKINNY_AB_NB ? n1 - j : SKINNY_AB_NB;
            for (int kk = 0; kk < kb; kk++) {
                const float* brow = b + (long)(k0 + kk) * ldb + j;
                for (int v = 0; v < SKINNY_AB_NB / 16; v++)
                    _mm_prefetch((const char*)(brow + SKINNY_AB_NB * SKINNY_AB_AHEAD + 16 * v), _MM_HINT_T0);
                for (int v = 0; v < SKINNY_AB_NB / 16; v++)
                    _mm512_store_ps(bcopy + kk * SKINNY_AB_NB + 16 * v,
                                    _mm512_maskz_loadu_ps(skinny_mask(width - 16 * v), brow + 16 * v));
            }
            for (int jj = 0; jj < width; jj += 16 * TILE_AB_V)
                for (int i = 0; i < stride; i += TILE_AB_I)
                    skinny_ab_tile(m - i, kb, at + i, stride, bcopy + jj, c + (long)i * ldc + j + jj, ldc,
                                   width - jj, k0 > 0, beta);
        }
    }
    if (k == 0)
        for (int i = 0; i < m; i++)
            for (int j = n0; j < n1; j++) c[(long)i * ldc + j] = beta == 0 ? 0 : beta * c[(long)i * ldc + j];
}

#endif /* __AVX512F__ */

/* ------------------------------------------------------------------------------------------------
 * Entry points: each thread computes its own share of C's columns.
 */
#define SKINNY_ENTRY(T, SUFFIX)                                                                      \
static void skinny_abt_##SUFFIX(int m, int n, int k, const T* a, long lda, const T* b, long ldb,     \
                                T* c, long ldc, T beta, int threads) {                               \
    int team = skinny_team(threads);                                                                 \
    _Pragma("omp parallel num_threads(team) if(team > 1)")                                           \
    {                                                                                                \
        int lo, hi;                                                                                  \
        skinny_share(n, 4, team, skinny_thread_id(), &lo, &hi);                                      \
        if (lo < hi) skinny_abt_part_##SUFFIX(m, k, a, lda, b, ldb, c, ldc, beta, lo, hi);           \
    }                                                                                                \
}                                                                                                    \
static void skinny_ab_##SUFFIX(int m, int n, int k, const T* a, long lda, const T* b, long ldb,      \
                               T* c, long ldc, T beta, int threads) {                                \
    int team = skinny_team(threads);                                                                 \
    _Pragma("omp parallel num_threads(team) if(team > 1)")                                           \
    {                                                                                                \
        int lo, hi;                                                                                  \
        skinny_share(n, 16, team, skinny_thread_id(), &lo, &hi);                                     \
        if (lo < hi) skinny_ab_part_##SUFFIX(m, k, a, lda, b, ldb, c, ldc, beta, lo, hi);            \
    }                                                                                                \
}

SKINNY_ENTRY(float, f32)
SKINNY_ENTRY(double, f64)

#endif /* MINICAFFE_SKINNY_GEMM_H */
