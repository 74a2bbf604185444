/* Part of lowp_gemm.h: the AVX-512 micro-kernels, 12 x 32 tiles. INT16 with vpdpwssd (AVX-512 VNNI)
 * and BF16 with vdpbf16ps (AVX-512 BF16) as inline assembly; BF16 emulated with FMAs where the CPU
 * has AVX-512F only. */
#ifndef MINICAFFE_LOWP_GEMM_AVX512_H
#define MINICAFFE_LOWP_GEMM_AVX512_H

#include "lowp_gemm_base.h"
#include "lowp_gemm_scalar.h"

/* ---- AVX-512 tiles in assembly: INT16 (vpdpwssd) and BF16 (vdpbf16ps) --------------------------
 * A tile is up to 12 rows x 32 columns: 24 zmm accumulators (zmm8-31), the two B vectors of a pair
 * (zmm0-1) and the broadcast A pair (zmm2). Both instructions issue two per cycle with a latency of
 * 4-6 cycles on this CPU (Zen 5), so 8-12 independent accumulators keep them busy; a tile of 12
 * rows measures ~470 GOP/s of the ~480 the instruction allows with operands in L1. The pair loop is
 * assembly because with intrinsics GCC's register allocator keeps a B vector on the stack and
 * re-reads it for every row, which makes the loop load-bound. INSN is vpdpwssd or vdpbf16ps; both
 * compute dst += pairwise products of src2 and src3. */

#define LOWP_ZMM_MR 12
#define LOWP_ZMM_NR 32

#define LOWP_ROW_ASM(INSN, R, C0, C1) \
    "vpbroadcastd " #R "*4(%[a]), %%zmm2\n\t" \
    INSN " %%zmm0, %%zmm2, %%zmm" #C0 "\n\t" \
    INSN " %%zmm1, %%zmm2, %%zmm" #C1 "\n\t"
#define LOWP_ROWS_1(I) LOWP_ROW_ASM(I, 0, 8, 9)
#define LOWP_ROWS_2(I) LOWP_ROWS_1(I) LOWP_ROW_ASM(I, 1, 10, 11)
#define LOWP_ROWS_3(I) LOWP_ROWS_2(I) LOWP_ROW_ASM(I, 2, 12, 13)
#define LOWP_ROWS_4(I) LOWP_ROWS_3(I) LOWP_ROW_ASM(I, 3, 14, 15)
#define LOWP_ROWS_5(I) LOWP_ROWS_4(I) LOWP_ROW_ASM(I, 4, 16, 17)
#define LOWP_ROWS_6(I) LOWP_ROWS_5(I) LOWP_ROW_ASM(I, 5, 18, 19)
#define LOWP_ROWS_7(I) LOWP_ROWS_6(I) LOWP_ROW_ASM(I, 6, 20, 21)
#define LOWP_ROWS_8(I) LOWP_ROWS_7(I) LOWP_ROW_ASM(I, 7, 22, 23)
#define LOWP_ROWS_9(I) LOWP_ROWS_8(I) LOWP_ROW_ASM(I, 8, 24, 25)
#define LOWP_ROWS_10(I) LOWP_ROWS_9(I) LOWP_ROW_ASM(I, 9, 26, 27)
#define LOWP_ROWS_11(I) LOWP_ROWS_10(I) LOWP_ROW_ASM(I, 10, 28, 29)
#define LOWP_ROWS_12(I) LOWP_ROWS_11(I) LOWP_ROW_ASM(I, 11, 30, 31)
#define LOWP_ZERO_ASM(C) "vpxord %%zmm" #C ", %%zmm" #C ", %%zmm" #C "\n\t"
#define LOWP_STORE_ASM(C, I) "vmovdqa64 %%zmm" #C ", " #I "*64(%[out])\n\t"

/* Runs COUNT >= 1 pairs of a ROWS x 32 tile from zero and stores the 2 * ROWS accumulators to
 * OUT (64-byte aligned, row i in OUT[2i], OUT[2i + 1]); all 24 accumulators are zeroed and stored
 * whatever ROWS is, which costs nothing next to the loop. */
#define LOWP_PAIR_LOOP(INSN, ROWS, OUT, A, B, COUNT) \
    __asm__ volatile( \
        LOWP_ZERO_ASM(8) LOWP_ZERO_ASM(9) LOWP_ZERO_ASM(10) LOWP_ZERO_ASM(11) LOWP_ZERO_ASM(12) \
        LOWP_ZERO_ASM(13) LOWP_ZERO_ASM(14) LOWP_ZERO_ASM(15) LOWP_ZERO_ASM(16) LOWP_ZERO_ASM(17) \
        LOWP_ZERO_ASM(18) LOWP_ZERO_ASM(19) LOWP_ZERO_ASM(20) LOWP_ZERO_ASM(21) LOWP_ZERO_ASM(22) \
        LOWP_ZERO_ASM(23) LOWP_ZERO_ASM(24) LOWP_ZERO_ASM(25) LOWP_ZERO_ASM(26) LOWP_ZERO_ASM(27) \
        LOWP_ZERO_ASM(28) LOWP_ZERO_ASM(29) LOWP_ZERO_ASM(30) LOWP_ZERO_ASM(31) \
        "1:\n\t" \
        "vmovdqa32 (%[b]), %%zmm0\n\t" \
        "vmovdqa32 64(%[b]), %%zmm1\n\t" \
        LOWP_ROWS_##ROWS(INSN) \
        "add $128, %[b]\n\t" \
        "add $48, %[a]\n\t" \
        "dec %[n]\n\t" \
        "jnz 1b\n\t" \
        LOWP_STORE_ASM(8, 0) LOWP_STORE_ASM(9, 1) LOWP_STORE_ASM(10, 2) LOWP_STORE_ASM(11, 3) \
        LOWP_STORE_ASM(12, 4) LOWP_STORE_ASM(13, 5) LOWP_STORE_ASM(14, 6) LOWP_STORE_ASM(15, 7) \
        LOWP_STORE_ASM(16, 8) LOWP_STORE_ASM(17, 9) LOWP_STORE_ASM(18, 10) LOWP_STORE_ASM(19, 11) \
        LOWP_STORE_ASM(20, 12) LOWP_STORE_ASM(21, 13) LOWP_STORE_ASM(22, 14) LOWP_STORE_ASM(23, 15) \
        LOWP_STORE_ASM(24, 16) LOWP_STORE_ASM(25, 17) LOWP_STORE_ASM(26, 18) LOWP_STORE_ASM(27, 19) \
        LOWP_STORE_ASM(28, 20) LOWP_STORE_ASM(29, 21) LOWP_STORE_ASM(30, 22) LOWP_STORE_ASM(31, 23) \
        : [a] "+r"(A), [b] "+r"(B), [n] "+r"(COUNT) \
        : [out] "r"(OUT) \
        : "zmm0", "zmm1", "zmm2", "zmm8", "zmm9", "zmm10", "zmm11", "zmm12", "zmm13", "zmm14", "zmm15", \
          "zmm16", "zmm17", "zmm18", "zmm19", "zmm20", "zmm21", "zmm22", "zmm23", "zmm24", "zmm25", \
          "zmm26", "zmm27", "zmm28", "zmm29", "zmm30", "zmm31", "cc", "memory")

static inline __mmask16 lowp_column_mask(int nr, int half)
{
    int width = nr - 16 * half;
    return width >= 16 ? 0xFFFF : (width <= 0 ? 0 : (__mmask16)((1u << width) - 1));
}

/* C = scale * sum + beta * C on a chunk's first spill, C += scale * sum after. */
LOWP_INLINE LOWP_TARGET_AVX512F void lowp_spill_zmm(__m512 sum, float *cp, __mmask16 mask, __m512 scale,
                                                     __m512 beta, int beta_zero, int first)
{
    if (!mask) return;
    __m512 r;
    if (first && beta_zero) {
        r = _mm512_mul_ps(sum, scale);
    } else {
        __m512 old = _mm512_maskz_loadu_ps(mask, cp);
        r = _mm512_fmadd_ps(sum, scale, first ? _mm512_mul_ps(old, beta) : old);
    }
    _mm512_mask_storeu_ps(cp, mask, r);
}

#define LOWP_DEFINE_VNNI_TILE(ROWS) \
    static LOWP_TARGET_VNNI void lowp_s16_tile_vnni_##ROWS(int nr, int kp, int chunk_pairs, const uint32_t *ap, \
                                                           const uint32_t *bp, float *c, long ldc, float scale, \
                                                           float beta) \
    { \
        __m512i acc[2 * LOWP_ZMM_MR] __attribute__((aligned(64))); \
        __m512 vscale = _mm512_set1_ps(scale), vbeta = _mm512_set1_ps(beta); \
        int first = 1, p0 = 0; \
        do { \
            int pend = p0 + chunk_pairs < kp ? p0 + chunk_pairs : kp; \
            long count = pend - p0; \
            const uint32_t *a = ap + (long)p0 * LOWP_ZMM_MR, *b = bp + (long)p0 * LOWP_ZMM_NR; \
            if (count > 0) \
                LOWP_PAIR_LOOP("vpdpwssd", ROWS, acc, a, b, count); \
            else \
                for (int i = 0; i < 2 * ROWS; i++) acc[i] = _mm512_setzero_si512(); \
            for (int i = 0; i < ROWS; i++) \
                for (int h = 0; h < 2; h++) \
                    lowp_spill_zmm(_mm512_cvtepi32_ps(acc[2 * i + h]), c + i * ldc + 16 * h, lowp_column_mask(nr, h), \
                                   vscale, vbeta, beta == 0.0f, first); \
            first = 0; \
            p0 = pend; \
        } while (p0 < kp); \
    }

#define LOWP_DEFINE_BF16_TILE(ROWS) \
    static LOWP_TARGET_BF16 void lowp_bf16_tile_native_##ROWS(int nr, int kp, int chunk_pairs, const uint32_t *ap, \
                                                              const uint32_t *bp, float *c, long ldc, float alpha, \
                                                              float beta) \
    { \
        (void)chunk_pairs; \
        __m512 acc[2 * LOWP_ZMM_MR] __attribute__((aligned(64))); \
        long count = kp; \
        if (count > 0) \
            LOWP_PAIR_LOOP("vdpbf16ps", ROWS, acc, ap, bp, count); \
        else \
            for (int i = 0; i < 2 * ROWS; i++) acc[i] = _mm512_setzero_ps(); \
        __m512 valpha = _mm512_set1_ps(alpha), vbeta = _mm512_set1_ps(beta); \
        for (int i = 0; i < ROWS; i++) \
            for (int h = 0; h < 2; h++) \
                lowp_spill_zmm(acc[2 * i + h], c + i * ldc + 16 * h, lowp_column_mask(nr, h), valpha, vbeta, \
                               beta == 0.0f, 1); \
    }

#define LOWP_FOR_ROWS(DEFINE) \
    DEFINE(1) DEFINE(2) DEFINE(3) DEFINE(4) DEFINE(5) DEFINE(6) DEFINE(7) DEFINE(8) DEFINE(9) DEFINE(10) \
    DEFINE(11) DEFINE(12)
LOWP_FOR_ROWS(LOWP_DEFINE_VNNI_TILE)
LOWP_FOR_ROWS(LOWP_DEFINE_BF16_TILE)

#define LOWP_CASES_12(PREFIX, ...) \
    switch (mr) { \
    case 12: PREFIX##12(__VA_ARGS__); break; case 11: PREFIX##11(__VA_ARGS__); break; \
    case 10: PREFIX##10(__VA_ARGS__); break; case 9: PREFIX##9(__VA_ARGS__); break; \
    case 8: PREFIX##8(__VA_ARGS__); break; case 7: PREFIX##7(__VA_ARGS__); break; \
    case 6: PREFIX##6(__VA_ARGS__); break; case 5: PREFIX##5(__VA_ARGS__); break; \
    case 4: PREFIX##4(__VA_ARGS__); break; case 3: PREFIX##3(__VA_ARGS__); break; \
    case 2: PREFIX##2(__VA_ARGS__); break; default: PREFIX##1(__VA_ARGS__); break; }

static void lowp_s16_tile_vnni(int mr, int nr, int kp, int chunk_pairs, const uint32_t *ap, const uint32_t *bp,
                               float *c, long ldc, float scale, float beta)
{
    LOWP_CASES_12(lowp_s16_tile_vnni_, nr, kp, chunk_pairs, ap, bp, c, ldc, scale, beta)
}

static void lowp_bf16_tile_native(int mr, int nr, int kp, int chunk_pairs, const uint32_t *ap, const uint32_t *bp,
                                  float *c, long ldc, float alpha, float beta)
{
    LOWP_CASES_12(lowp_bf16_tile_native_, nr, kp, chunk_pairs, ap, bp, c, ldc, alpha, beta)
}

/* AVX-512F without BF16 instructions: decode both halves of each pair to FP32 and FMA them. */
LOWP_INLINE LOWP_TARGET_AVX512F void lowp_bf16_tile_emulated_body(const int mr, int nr, int kp, const uint32_t *ap,
                                                                   const uint32_t *bp, float *c, long ldc,
                                                                   float alpha, float beta)
{
    const __m512i high_half = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 acc0[LOWP_ZMM_MR], acc1[LOWP_ZMM_MR];
#pragma GCC unroll 12
    for (int i = 0; i < mr; i++) acc0[i] = acc1[i] = _mm512_setzero_ps();
    for (int p = 0; p < kp; p++) {
        __m512i b0 = _mm512_load_si512((const void *)(bp + (long)p * LOWP_ZMM_NR));
        __m512i b1 = _mm512_load_si512((const void *)(bp + (long)p * LOWP_ZMM_NR + 16));
        __m512 b0_lo = _mm512_castsi512_ps(_mm512_slli_epi32(b0, 16));
        __m512 b0_hi = _mm512_castsi512_ps(_mm512_and_si512(b0, high_half));
        __m512 b1_lo = _mm512_castsi512_ps(_mm512_slli_epi32(b1, 16));
        __m512 b1_hi = _mm512_castsi512_ps(_mm512_and_si512(b1, high_half));
        const uint32_t *arow = ap + (long)p * LOWP_ZMM_MR;
#pragma GCC unroll 12
        for (int i = 0; i < mr; i++) {
            __m512 a_lo = _mm512_set1_ps(lowp_bf16_lo(arow[i]));
            __m512 a_hi = _mm512_set1_ps(lowp_bf16_hi(arow[i]));
            acc0[i] = _mm512_fmadd_ps(a_hi, b0_hi, _mm512_fmadd_ps(a_lo, b0_lo, acc0[i]));
            acc1[i] = _mm512_fmadd_ps(a_hi, b1_hi, _mm512_fmadd_ps(a_lo, b1_lo, acc1[i]));
        }
    }
    __m512 valpha = _mm512_set1_ps(alpha), vbeta = _mm512_set1_ps(beta);
#pragma GCC unroll 12
    for (int i = 0; i < mr; i++) {
        lowp_spill_zmm(acc0[i], c + i * ldc, lowp_column_mask(nr, 0), valpha, vbeta, beta == 0.0f, 1);
        lowp_spill_zmm(acc1[i], c + i * ldc + 16, lowp_column_mask(nr, 1), valpha, vbeta, beta == 0.0f, 1);
    }
}

static LOWP_TARGET_AVX512F void lowp_bf16_tile_emulated(int mr, int nr, int kp, int chunk_pairs, const uint32_t *ap,
                                                        const uint32_t *bp, float *c, long ldc, float alpha, float beta)
{
    (void)chunk_pairs;
    switch (mr) {
    case 12: lowp_bf16_tile_emulated_body(12, nr, kp, ap, bp, c, ldc, alpha, beta); break;
    case 11: lowp_bf16_tile_emulated_body(11, nr, kp, ap, bp, c, ldc, alpha, beta); break;
    case 10: lowp_bf16_tile_emulated_body(10, nr, kp, ap, bp, c, ldc, alpha, beta); break;
    case 9: lowp_bf16_tile_emulated_body(9, nr, kp, ap, bp, c, ldc, alpha, beta); break;
    case 8: lowp_bf16_tile_emulated_body(8, nr, kp, ap, bp, c, ldc, alpha, beta); break;
    case 7: lowp_bf16_tile_emulated_body(7, nr, kp, ap, bp, c, ldc, alpha, beta); break;
    case 6: lowp_bf16_tile_emulated_body(6, nr, kp, ap, bp, c, ldc, alpha, beta); break;
    case 5: lowp_bf16_tile_emulated_body(5, nr, kp, ap, bp, c, ldc, alpha, beta); break;
    case 4: lowp_bf16_tile_emulated_body(4, nr, kp, ap, bp, c, ldc, alpha, beta); break;
    case 3: lowp_bf16_tile_emulated_body(3, nr, kp, ap, bp, c, ldc, alpha, beta); break;
    case 2: lowp_bf16_tile_emulated_body(2, nr, kp, ap, bp, c, ldc, alpha, beta); break;
    default: lowp_bf16_tile_emulated_body(1, nr, kp, ap, bp, c, ldc, alpha, beta); break;
    }
}

#endif
