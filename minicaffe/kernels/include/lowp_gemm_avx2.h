/* Part of lowp_gemm.h: the 256-bit INT16 micro-kernels, 6 x 16 tiles, with vpmaddwd + vpaddd (AVX2)
 * or vpdpwssd (AVX-VNNI). */
#ifndef MINICAFFE_LOWP_GEMM_AVX2_H
#define MINICAFFE_LOWP_GEMM_AVX2_H

#include "lowp_gemm_base.h"

/* ---- INT16, AVX2 (vpmaddwd + vpaddd) and AVX-VNNI (256-bit vpdpwssd): 6 x 16 tile -----------
 * 12 ymm accumulators + 2 B vectors + broadcast + product fill the 16 ymm registers. */

#define LOWP_AVX2_MR 6
#define LOWP_AVX2_NR 16

LOWP_INLINE LOWP_TARGET_AVX2 void lowp_spill_ymm(__m256i sum, float *cp, int width, __m256 scale,
                                                 __m256 beta, int beta_zero, int first)
{
    if (width <= 0) return;
    __m256 f = _mm256_cvtepi32_ps(sum);
    if (width >= 8) {
        __m256 r = (first && beta_zero) ? _mm256_mul_ps(f, scale)
            : _mm256_fmadd_ps(f, scale, first ? _mm256_mul_ps(_mm256_loadu_ps(cp), beta) : _mm256_loadu_ps(cp));
        _mm256_storeu_ps(cp, r);
        return;
    }
    __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(width), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 r = (first && beta_zero) ? _mm256_mul_ps(f, scale)
        : _mm256_fmadd_ps(f, scale, first ? _mm256_mul_ps(_mm256_maskload_ps(cp, mask), beta)
                                          : _mm256_maskload_ps(cp, mask));
    _mm256_maskstore_ps(cp, mask, r);
}

#define LOWP_YMM_TILE_BODY(NAME, TARGET, DOT)                                                              \
    LOWP_INLINE TARGET void NAME(const int mr, int nr, int kp, int chunk_pairs, const uint32_t *ap,      \
                                 const uint32_t *bp, float *c, long ldc, float scale, float beta)         \
    {                                                                                                      \
        __m256 vscale = _mm256_set1_ps(scale), vbeta = _mm256_set1_ps(beta);                               \
        int beta_zero = beta == 0.0f;                                                                      \
        int first = 1, p0 = 0;                                                                             \
        do {                                                                                               \
            int pend = p0 + chunk_pairs < kp ? p0 + chunk_pairs : kp;                                      \
            /* __v8si, not __m256i: GCC keeps an array of these in registers, but not of __m256i. */     \
            __v8si acc0[LOWP_AVX2_MR], acc1[LOWP_AVX2_MR];                                                 \
            _Pragma("GCC unroll 6") for (int i = 0; i < mr; i++) acc0[i] = acc1[i] = (__v8si)_mm256_setzero_si256(); \
            for (int p = p0; p < pend; p++) {                                                              \
                __m256i b0 = _mm256_load_si256((const __m256i *)(bp + (long)p * LOWP_AVX2_NR));            \
                __m256i b1 = _mm256_load_si256((const __m256i *)(bp + (long)p * LOWP_AVX2_NR + 8));        \
                const uint32_t *arow = ap + (long)p * LOWP_AVX2_MR;                                        \
                _Pragma("GCC unroll 6") for (int i = 0; i < mr; i++) {                                     \
                    __m256i av = _mm256_set1_epi32((int)arow[i]);                                          \
                    acc0[i] = (__v8si)DOT((__m256i)acc0[i], av, b0);                                       \
                    acc1[i] = (__v8si)DOT((__m256i)acc1[i], av, b1);                                       \
                }                                                                                          \
            }                                                                                              \
            _Pragma("GCC unroll 6") for (int i = 0; i < mr; i++) {                                         \
                lowp_spill_ymm((__m256i)acc0[i], c + i * ldc, nr, vscale, vbeta, beta_zero, first);        \
                lowp_spill_ymm((__m256i)acc1[i], c + i * ldc + 8, nr - 8, vscale, vbeta, beta_zero, first); \
            }                                                                                              \
            first = 0;                                                                                     \
            p0 = pend;                                                                                     \
        } while (p0 < kp);                                                                                 \
    }

#define LOWP_MADD_ADD(acc, a, b) _mm256_add_epi32((acc), _mm256_madd_epi16((a), (b)))
#define LOWP_DPWSSD_YMM(acc, a, b) _mm256_dpwssd_avx_epi32((acc), (a), (b))

LOWP_YMM_TILE_BODY(lowp_s16_tile_avx2_body, LOWP_TARGET_AVX2, LOWP_MADD_ADD)
LOWP_YMM_TILE_BODY(lowp_s16_tile_avxvnni_body, LOWP_TARGET_AVXVNNI, LOWP_DPWSSD_YMM)

#define LOWP_CASES_6(BODY, ...) \
    switch (mr) { \
    case 6: BODY(6, __VA_ARGS__); break; case 5: BODY(5, __VA_ARGS__); break; \
    case 4: BODY(4, __VA_ARGS__); break; case 3: BODY(3, __VA_ARGS__); break; \
    case 2: BODY(2, __VA_ARGS__); break; default: BODY(1, __VA_ARGS__); break; }

static LOWP_TARGET_AVX2 void lowp_s16_tile_avx2(int mr, int nr, int kp, int chunk_pairs, const uint32_t *ap,
                                                const uint32_t *bp, float *c, long ldc, float scale, float beta)
{
    LOWP_CASES_6(lowp_s16_tile_avx2_body, nr, kp, chunk_pairs, ap, bp, c, ldc, scale, beta)
}

static LOWP_TARGET_AVXVNNI void lowp_s16_tile_avxvnni(int mr, int nr, int kp, int chunk_pairs, const uint32_t *ap,
                                                      const uint32_t *bp, float *c, long ldc, float scale, float beta)
{
    LOWP_CASES_6(lowp_s16_tile_avxvnni_body, nr, kp, chunk_pairs, ap, bp, c, ldc, scale, beta)
}

#endif
