/* Part of lowp_gemm.h: the portable micro-kernels (INT16 and BF16, 4 x 8 tiles in plain C) and the
 * BF16 pair decoding the AVX-512F emulation shares. */
#ifndef MINICAFFE_LOWP_GEMM_SCALAR_H
#define MINICAFFE_LOWP_GEMM_SCALAR_H

#include "lowp_gemm_base.h"

/* ---- INT16, scalar ------------------------------------------------------------------------- */

#define LOWP_SCALAR_MR 4
#define LOWP_SCALAR_NR 8

static inline int32_t lowp_pair_dot_wrapped(uint32_t a, uint32_t b)
{
    /* Each product fits in int32; their sum may not, and wraps like vpdpwssd/vpmaddwd. */
    int32_t p0 = (int32_t)(int16_t)(a & 0xFFFF) * (int16_t)(b & 0xFFFF);
    int32_t p1 = (int32_t)(int16_t)(a >> 16) * (int16_t)(b >> 16);
    return (int32_t)((uint32_t)p0 + (uint32_t)p1);
}

static void lowp_s16_tile_scalar(int mr, int nr, int kp, int chunk_pairs, const uint32_t *ap,
                                 const uint32_t *bp, float *c, long ldc, float scale, float beta)
{
    int first = 1, p0 = 0;
    do {
        int pend = p0 + chunk_pairs < kp ? p0 + chunk_pairs : kp;
        uint32_t acc[LOWP_SCALAR_MR][LOWP_SCALAR_NR] = {{0}};
        for (int p = p0; p < pend; p++)
            for (int i = 0; i < LOWP_SCALAR_MR; i++)
                for (int j = 0; j < LOWP_SCALAR_NR; j++)
                    acc[i][j] += (uint32_t)lowp_pair_dot_wrapped(ap[p * LOWP_SCALAR_MR + i], bp[p * LOWP_SCALAR_NR + j]);
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++)
                c[i * ldc + j] = lowp_spill_scalar((float)(int32_t)acc[i][j], c[i * ldc + j], scale, beta, first);
        first = 0;
        p0 = pend;
    } while (p0 < kp);
}

/* ---- BF16 --------------------------------------------------------------------------------------
 * A BF16 value is the top half of an FP32, so a pair word (lo, hi) decodes as
 * lo = word << 16 and hi = word & 0xFFFF0000. BF16 products are exact in FP32. */

static inline float lowp_bf16_lo(uint32_t w) { union { uint32_t u; float f; } v = { w << 16 }; return v.f; }
static inline float lowp_bf16_hi(uint32_t w) { union { uint32_t u; float f; } v = { w & 0xFFFF0000u }; return v.f; }

static inline float lowp_store_scalar(float sum, float old, float alpha, float beta)
{
    return beta == 0.0f ? sum * alpha : fmaf(sum, alpha, old * beta);
}

static void lowp_bf16_tile_scalar(int mr, int nr, int kp, int chunk_pairs, const uint32_t *ap,
                                  const uint32_t *bp, float *c, long ldc, float alpha, float beta)
{
    (void)chunk_pairs;
    float acc[LOWP_SCALAR_MR][LOWP_SCALAR_NR] = {{0}};
    for (int p = 0; p < kp; p++)
        for (int i = 0; i < LOWP_SCALAR_MR; i++) {
            uint32_t a = ap[p * LOWP_SCALAR_MR + i];
            float a0 = lowp_bf16_lo(a), a1 = lowp_bf16_hi(a);
            for (int j = 0; j < LOWP_SCALAR_NR; j++) {
                uint32_t b = bp[p * LOWP_SCALAR_NR + j];
                acc[i][j] += a0 * lowp_bf16_lo(b) + a1 * lowp_bf16_hi(b);
            }
        }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            c[i * ldc + j] = lowp_store_scalar(acc[i][j], c[i * ldc + j], alpha, beta);
}

#endif
