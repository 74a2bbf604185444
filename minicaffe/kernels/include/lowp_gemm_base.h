/* Part of lowp_gemm.h (see there for the design): what every other part shares. The variant enums,
 * the blocking constants, the per-function target attributes, the CPU feature checks, the geometry
 * of K cut into padded chunks, the scalar spill every variant rounds like, and the micro-kernel
 * signature. */
#ifndef MINICAFFE_LOWP_GEMM_BASE_H
#define MINICAFFE_LOWP_GEMM_BASE_H

#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { LOWP_S16_SCALAR = 0, LOWP_S16_AVX2 = 1, LOWP_S16_AVX512_VNNI = 2, LOWP_S16_AVX_VNNI = 3 };
enum { LOWP_BF16_SCALAR = 0, LOWP_BF16_AVX512F = 1, LOWP_BF16_AVX512_BF16 = 2 };

/* Packed B for one thread: about half of L2, so the panel stays in L2 while every row panel of A
 * streams past it. */
#define LOWP_B_BLOCK_BYTES (512 * 1024)
/* Below this many multiply-adds per thread (a few microseconds), waking another thread costs more
 * than it saves. */
#define LOWP_MIN_WORK_PER_THREAD (1L << 19)

#define LOWP_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
#define LOWP_TARGET_AVXVNNI __attribute__((target("avx2,fma,avxvnni")))
#define LOWP_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define LOWP_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))
#define LOWP_TARGET_AVX512F __attribute__((target("avx512f,fma")))
#define LOWP_INLINE static inline __attribute__((always_inline))

/* ---- CPU features ------------------------------------------------------------------------- */

static inline int lowp_s16_supported(int variant)
{
    __builtin_cpu_init();
    switch (variant) {
    case LOWP_S16_SCALAR: return 1;
    case LOWP_S16_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case LOWP_S16_AVX_VNNI:
        return __builtin_cpu_supports("avxvnni") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case LOWP_S16_AVX512_VNNI:
        return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512f");
    }
    return 0;
}

static inline int lowp_bf16_supported(int variant)
{
    __builtin_cpu_init();
    switch (variant) {
    case LOWP_BF16_SCALAR: return 1;
    case LOWP_BF16_AVX512F: return __builtin_cpu_supports("avx512f");
    case LOWP_BF16_AVX512_BF16:
        return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512f");
    }
    return 0;
}

static inline int lowp_s16_best(void)
{
    if (lowp_s16_supported(LOWP_S16_AVX512_VNNI)) return LOWP_S16_AVX512_VNNI;
    if (lowp_s16_supported(LOWP_S16_AVX_VNNI)) return LOWP_S16_AVX_VNNI;
    if (lowp_s16_supported(LOWP_S16_AVX2)) return LOWP_S16_AVX2;
    return LOWP_S16_SCALAR;
}

static inline int lowp_bf16_best(void)
{
    if (lowp_bf16_supported(LOWP_BF16_AVX512_BF16)) return LOWP_BF16_AVX512_BF16;
    if (lowp_bf16_supported(LOWP_BF16_AVX512F)) return LOWP_BF16_AVX512F;
    return LOWP_BF16_SCALAR;
}

/* ---- K geometry: chunks of at most `chunk` values, each padded to whole pairs --------------- */

typedef struct {
    int k;            /* logical K */
    int chunk;        /* values per chunk (K itself when not chunked) */
    int chunk_pairs;  /* packed pairs per full chunk */
    int kp;           /* packed pairs in all */
} lowp_kgeom;

static inline void lowp_kgeom_init(lowp_kgeom *g, int k, int k_chunk)
{
    g->k = k;
    g->chunk = (k_chunk > 0 && k_chunk < k) ? k_chunk : (k > 0 ? k : 1);
    g->chunk_pairs = (g->chunk + 1) / 2;
    int full = k / g->chunk, rest = k % g->chunk;
    g->kp = full * g->chunk_pairs + (rest + 1) / 2;
}

/* ---- spilling a tile into C (shared by every variant, so they round identically) ---------- */

static inline float lowp_spill_scalar(float sum, float old, float scale, float beta, int first)
{
    if (!first) return fmaf(sum, scale, old);
    return beta == 0.0f ? sum * scale : fmaf(sum, scale, old * beta);
}

/* ---- micro-kernel signature ------------------------------------------------------------------
 * One mr x nr tile (mr <= MR, nr <= NR) over all kp pairs, spilling every chunk_pairs pairs:
 * C = scale * sum + beta * C at the first spill, C += scale * sum after. */
typedef void (*lowp_tile_fn)(int mr, int nr, int kp, int chunk_pairs, const uint32_t *ap,
                             const uint32_t *bp, float *c, long ldc, float scale, float beta);

#endif
