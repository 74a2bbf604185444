/* Low-precision GEMMs: INT16 x INT16 -> INT32 (DFP16) and BF16 x BF16 -> FP32, row-major.
 *
 *   C[m, n] = scale * op(A)[m, k] @ op(B)[k, n] + beta * C
 *
 * Both instructions this file is built around (vpdpwssd, vdpbf16ps) multiply *pairs* of 16-bit
 * values along K and add both products into one 32-bit lane. So both operands are packed with the
 * two K-neighbours of an element side by side, as one 32-bit word:
 *   A: MR-row panels, [pair][MR] words, broadcast one word per row;
 *   B: NR-column panels, [pair][NR] words, loaded NR lanes at a time.
 * K is first cut into chunks of at most k_chunk values (the INT32 overflow bound of DFP16); each
 * chunk is padded to an even length with zeros, so a pair never straddles two chunks. The
 * micro-kernel keeps an MR x NR tile of INT32 sums in registers for one chunk, then converts it to
 * FP32, scales it and adds it into C ("spills"), so C receives one FP32 addition per chunk.
 *
 * Every variant of the INT16 GEMM wraps modulo 2^32 inside a chunk and spills with the same FP32
 * operations in the same order, so all variants give bit-identical results. The BF16 variants agree
 * within FP32 rounding.
 *
 * Each SIMD variant is compiled with a per-function target attribute, so the file builds without
 * -march=native; lowp_s16_best()/lowp_bf16_best() pick a variant from the running CPU.
 */
#ifndef MINICAFFE_LOWP_GEMM_H
#define MINICAFFE_LOWP_GEMM_H

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

/* ---- packing -------------------------------------------------------------------------------- */

static inline uint32_t lowp_load_pair(const uint16_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The 4 x 16 blocks of lowp_transpose_pairs: 4 rows of 16 pairs are transposed as 4 x 4 blocks
 * inside each 128-bit lane, then each pair's 4 rows are stored as one 16-byte vector (instead of
 * 4 scalar stores: packing A for a GEMM with a narrow C otherwise takes a third of its time). */
static LOWP_TARGET_AVX512F void lowp_transpose_pairs_avx512(const uint16_t *src, long ld, int rows, int pairs,
                                                            uint32_t *dst, int dst_stride)
{
    for (int i = 0; i + 4 <= rows; i += 4)
        for (int q = 0; q + 16 <= pairs; q += 16) {
            const uint16_t *s = src + (long)i * ld + 2 * q;
            __m512i r0 = _mm512_loadu_si512((const void *)s), r1 = _mm512_loadu_si512((const void *)(s + ld));
            __m512i r2 = _mm512_loadu_si512((const void *)(s + 2 * ld)), r3 = _mm512_loadu_si512((const void *)(s + 3 * ld));
            __m512i t0 = _mm512_unpacklo_epi32(r0, r1), t1 = _mm512_unpackhi_epi32(r0, r1);
            __m512i t2 = _mm512_unpacklo_epi32(r2, r3), t3 = _mm512_unpackhi_epi32(r2, r3);
            __m512i u[4] = { _mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                             _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3) };
            uint32_t *d = dst + (long)q * dst_stride + i;
            for (int j = 0; j < 4; j++) {
                _mm_storeu_si128((__m128i *)(d + (long)j * dst_stride), _mm512_castsi512_si128(u[j]));
                _mm_storeu_si128((__m128i *)(d + (long)(4 + j) * dst_stride), _mm512_extracti32x4_epi32(u[j], 1));
                _mm_storeu_si128((__m128i *)(d + (long)(8 + j) * dst_stride), _mm512_extracti32x4_epi32(u[j], 2));
                _mm_storeu_si128((__m128i *)(d + (long)(12 + j) * dst_stride), _mm512_extracti32x4_epi32(u[j], 3));
            }
        }
}

/* dst[q * dst_stride + i] = pair q (values 2q, 2q + 1) of row i of src, rows ld apart. */
static void lowp_transpose_pairs(const uint16_t *src, long ld, int rows, int pairs, uint32_t *dst, int dst_stride,
                                 int avx512)
{
    int rows4 = 0, pairs16 = 0;
    if (avx512) {
        rows4 = rows / 4 * 4;
        pairs16 = pairs / 16 * 16;
        lowp_transpose_pairs_avx512(src, ld, rows4, pairs16, dst, dst_stride);
    }
    for (int i = 0; i < rows; i++) {
        const uint16_t *row = src + (long)i * ld;
        for (int q = i < rows4 ? pairs16 : 0; q < pairs; q++) dst[(long)q * dst_stride + i] = lowp_load_pair(row + 2 * q);
    }
}

/* Rows [m0, m0 + rows) of op(A) into one panel: out[p * mr_pad + i] = (a[i][k0], a[i][k1]).
 * Walks chunk by chunk, so a pair's K indices need no division. */
static void lowp_pack_a(const lowp_kgeom *g, const uint16_t *a, long lda, int trans, int m0, int rows,
                        int mr_pad, uint32_t *out, int avx512)
{
    for (int k_start = 0, p_start = 0; k_start < g->k; k_start += g->chunk, p_start += g->chunk_pairs) {
        int len = g->k - k_start < g->chunk ? g->k - k_start : g->chunk;
        int whole = len / 2;
        uint32_t *dst = out + (long)p_start * mr_pad;
        /* Padding rows are zeroed with one memset: GCC turns a loop over them into a memset call
         * per pair, which tripled the packing time. */
        if (rows < mr_pad) memset(dst, 0, (size_t)((len + 1) / 2) * mr_pad * sizeof *dst);
        if (!trans) {
            lowp_transpose_pairs(a + (long)m0 * lda + k_start, lda, rows, whole, dst, mr_pad, avx512);
            if (len & 1)
                for (int i = 0; i < rows; i++) dst[(long)whole * mr_pad + i] = a[(long)(m0 + i) * lda + k_start + len - 1];
        } else {
            for (int q = 0; q < (len + 1) / 2; q++) {
                const uint16_t *lo = a + (long)(k_start + 2 * q) * lda + m0;
                const uint16_t *hi = 2 * q + 1 < len ? lo + lda : NULL;
                for (int i = 0; i < rows; i++)
                    dst[(long)q * mr_pad + i] = (uint32_t)lo[i] | (hi ? (uint32_t)hi[i] << 16 : 0u);
            }
        }
    }
}

/* Columns [n0, n0 + cols) of op(B), in NR-column panels: panel j holds out[p * nr + jj]. */
static void lowp_pack_b(const lowp_kgeom *g, const uint16_t *b, long ldb, int trans, int n0, int cols,
                        int nr, uint32_t *out, int avx512)
{
    for (int j0 = 0; j0 < cols; j0 += nr) {
        int width = cols - j0 < nr ? cols - j0 : nr;
        uint32_t *panel = out + (long)j0 * g->kp;
        for (int k_start = 0, p_start = 0; k_start < g->k; k_start += g->chunk, p_start += g->chunk_pairs) {
            int len = g->k - k_start < g->chunk ? g->k - k_start : g->chunk;
            int whole = len / 2, pairs = (len + 1) / 2;
            uint32_t *dst = panel + (long)p_start * nr;
            if (width < nr) memset(dst, 0, (size_t)pairs * nr * sizeof *dst);  /* as in lowp_pack_a */
            if (trans) {
                /* op(B) column jj is a row of the stored B: its pairs are adjacent in memory. */
                const uint16_t *src = b + (long)(n0 + j0) * ldb + k_start;
                lowp_transpose_pairs(src, ldb, width, whole, dst, nr, avx512);
                if (len & 1)
                    for (int jj = 0; jj < width; jj++) dst[(long)whole * nr + jj] = src[(long)jj * ldb + len - 1];
            } else {
                for (int q = 0; q < pairs; q++) {
                    const uint16_t *row0 = b + (long)(k_start + 2 * q) * ldb + n0 + j0;
                    uint32_t *d = dst + (long)q * nr;
                    if (2 * q + 1 < len) {
                        const uint16_t *row1 = row0 + ldb;
                        for (int jj = 0; jj < width; jj++) d[jj] = (uint32_t)row0[jj] | ((uint32_t)row1[jj] << 16);
                    } else {
                        for (int jj = 0; jj < width; jj++) d[jj] = row0[jj];
                    }
                }
            }
        }
    }
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

/* ---- kernel table ------------------------------------------------------------------------------ */

typedef struct {
    int mr, nr;          /* register tile; also the packing widths */
    lowp_tile_fn tile;
    int pack_avx512;     /* the CPU has AVX-512F for packing */
} lowp_kernel;

static inline lowp_kernel lowp_s16_kernel(int variant)
{
    lowp_kernel k;
    switch (variant) {
    case LOWP_S16_AVX512_VNNI: k.mr = LOWP_ZMM_MR; k.nr = LOWP_ZMM_NR; k.tile = lowp_s16_tile_vnni; break;
    case LOWP_S16_AVX_VNNI: k.mr = LOWP_AVX2_MR; k.nr = LOWP_AVX2_NR; k.tile = lowp_s16_tile_avxvnni; break;
    case LOWP_S16_AVX2: k.mr = LOWP_AVX2_MR; k.nr = LOWP_AVX2_NR; k.tile = lowp_s16_tile_avx2; break;
    default: k.mr = LOWP_SCALAR_MR; k.nr = LOWP_SCALAR_NR; k.tile = lowp_s16_tile_scalar; break;
    }
    k.pack_avx512 = variant == LOWP_S16_AVX512_VNNI;
    return k;
}

static inline lowp_kernel lowp_bf16_kernel(int variant)
{
    lowp_kernel k;
    switch (variant) {
    case LOWP_BF16_AVX512_BF16: k.mr = LOWP_ZMM_MR; k.nr = LOWP_ZMM_NR; k.tile = lowp_bf16_tile_native; break;
    case LOWP_BF16_AVX512F: k.mr = LOWP_ZMM_MR; k.nr = LOWP_ZMM_NR; k.tile = lowp_bf16_tile_emulated; break;
    default: k.mr = LOWP_SCALAR_MR; k.nr = LOWP_SCALAR_NR; k.tile = lowp_bf16_tile_scalar; break;
    }
    k.pack_avx512 = variant == LOWP_BF16_AVX512_BF16 || variant == LOWP_BF16_AVX512F;
    return k;
}

/* ---- B lowered from an image while packing -------------------------------------------------
 * A convolution's column matrix (im2col) is, for an image padded with zeros so that every window
 * lies inside it, cols[r][j] = image[tap[r] + out[j]]: tap[r] the offset of row r's (channel,
 * kernel row, kernel column), out[j] that of output j's window corner. Forward multiplies by cols
 * (op(B) = cols), backward-weights by its transpose (op(B) = cols^T), so in both
 *   op(B)[kk][nn] = image[k_offset[kk] + n_offset[nn]]
 * with (k_offset, n_offset) = (tap, out) or (out, tap). Packing B from the image skips writing the
 * column matrix and reading it back (and, for cols^T, transposing it): where n_offset runs up by 1
 * across neighbouring columns (outputs along a row at stride 1; taps along a kernel row at dilation
 * 1), a panel row is a few masked loads of those runs, two of which are interleaved into the pairs. */
typedef struct {
    const uint16_t *image;
    const int *tap;
    const int *out;
} lowp_columns;

/* One B panel's runs of columns whose n_offset rises by 1: lanes [start, start + len) read
 * image + k_offset + n_offset[start] + (lane - start). */
typedef struct {
    __mmask32 mask[LOWP_ZMM_NR];
    int base[LOWP_ZMM_NR];
    int count;
} lowp_runs;

static inline void lowp_find_runs(const int *n_offset, int width, lowp_runs *runs)
{
    runs->count = 0;
    for (int start = 0, end; start < width; start = end) {
        for (end = start + 1; end < width && n_offset[end] == n_offset[end - 1] + 1; end++) {}
        uint32_t bits = (end - start == 32 ? 0xFFFFFFFFu : ((1u << (end - start)) - 1)) << start;
        runs->mask[runs->count] = (__mmask32)bits;
        runs->base[runs->count] = n_offset[start] - start;
        runs->count++;
    }
    if (runs->count == 1) {  /* an empty second run for lowp_load_runs */
        runs->mask[1] = 0;
        runs->base[1] = runs->base[0];
    }
}

LOWP_INLINE __attribute__((target("avx512f,avx512bw"))) __m512i
lowp_load_runs(const lowp_runs *runs, const uint16_t *row)
{
    /* Zero-masked loads ORed together (the runs are disjoint); the first two (a panel of 32 outputs
     * spans two or three image rows) are straight-line code: lowp_find_runs pads to two runs. */
    __m512i v = _mm512_or_si512(_mm512_maskz_loadu_epi16(runs->mask[0], row + runs->base[0]),
                                _mm512_maskz_loadu_epi16(runs->mask[1], row + runs->base[1]));
    for (int r = 2; r < runs->count; r++)
        v = _mm512_or_si512(v, _mm512_maskz_loadu_epi16(runs->mask[r], row + runs->base[r]));
    return v;
}

/* One NR = 32 panel: every pair of each chunk as two run loads interleaved by 16-bit lanes. */
static __attribute__((target("avx512f,avx512bw"))) void
lowp_pack_b_columns_avx512(const lowp_kgeom *g, const uint16_t *image, const int *k_offset, const lowp_runs *runs,
                           uint32_t *panel)
{
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                        55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
    for (int k_start = 0, p_start = 0; k_start < g->k; k_start += g->chunk, p_start += g->chunk_pairs) {
        int len = g->k - k_start < g->chunk ? g->k - k_start : g->chunk;
        uint32_t *dst = panel + (long)p_start * LOWP_ZMM_NR;
        for (int q = 0; q < (len + 1) / 2; q++) {
            int kk = k_start + 2 * q;
            __m512i v0 = lowp_load_runs(runs, image + k_offset[kk]);
            __m512i v1 = 2 * q + 1 < len ? lowp_load_runs(runs, image + k_offset[kk + 1]) : _mm512_setzero_si512();
            _mm512_storeu_si512((void *)(dst + (long)q * LOWP_ZMM_NR), _mm512_permutex2var_epi16(v0, lo, v1));
            _mm512_storeu_si512((void *)(dst + (long)q * LOWP_ZMM_NR + 16), _mm512_permutex2var_epi16(v0, hi, v1));
        }
    }
}

/* Pair q of one NR = 32 panel of cols^T (columns: taps; K: outputs) into d: where the pair's two
 * outputs are neighbours in the image, each tap's pair is one 32-bit word, gathered; else value by
 * value. */
LOWP_INLINE __attribute__((target("avx512f,avx512bw"))) void
lowp_pack_bt_pair(const uint16_t *image, const int *out, int kk, int complete, const int *tap, int width,
                  __m512i t0, __m512i t1, __mmask16 m0, __mmask16 m1, uint32_t *d)
{
    if (complete && out[kk + 1] == out[kk] + 1) {
        const void *base = image + out[kk];
        _mm512_storeu_si512((void *)d, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m0, t0, base, 2));
        _mm512_storeu_si512((void *)(d + 16), _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m1, t1, base, 2));
        return;
    }
    const uint16_t *row0 = image + out[kk];
    const uint16_t *row1 = complete ? image + out[kk + 1] : NULL;
    for (int jj = 0; jj < LOWP_ZMM_NR; jj++)
        d[jj] = jj < width ? (uint32_t)row0[tap[jj]] | (row1 ? (uint32_t)row1[tap[jj]] << 16 : 0u) : 0u;
}

/* One tap's values at 32 consecutive outputs, i.e. its words of 16 pairs: runs of outputs that
 * are neighbours in the image, as zero-masked loads ORed together. The first two runs (32 outputs
 * mostly span two or three image rows) are straight-line code. */
LOWP_INLINE __attribute__((target("avx512f,avx512bw"))) __m512i
lowp_load_pair_runs(const uint16_t *row, const __mmask32 *mask, const int *base, int count)
{
    __m512i v = _mm512_or_si512(_mm512_maskz_loadu_epi16(mask[0], row + base[0]),
                                _mm512_maskz_loadu_epi16(mask[1], row + base[1]));
    for (int r = 2; r < count; r++) v = _mm512_or_si512(v, _mm512_maskz_loadu_epi16(mask[r], row + base[r]));
    return v;
}

/* All NR = 32 panels of cols^T (columns [0, cols) at tap). Blocks of 16 whole pairs load each tap's
 * 32 values from the image's rows and transpose them 4 taps at a time, as
 * lowp_transpose_pairs_avx512 does from a column matrix (a block's runs are found once for all
 * panels); the pairs after the last whole block go one at a time. */
static __attribute__((target("avx512f,avx512bw"))) void
lowp_pack_bt_columns_avx512(const lowp_kgeom *g, const uint16_t *image, const int *out, const int *tap, int cols,
                            uint32_t *packed)
{
    for (int k_start = 0, p_start = 0; k_start < g->k; k_start += g->chunk, p_start += g->chunk_pairs) {
        int len = g->k - k_start < g->chunk ? g->k - k_start : g->chunk;
        int q = 0;
        for (; q + 16 <= len / 2; q += 16) {
            const int *o = out + k_start + 2 * q;
            __mmask32 mask[33];
            int base[33], count = 0;
            for (int l = 0; l < 32; l++) {
                if (l > 0 && o[l] == o[l - 1] + 1) continue;
                if (count > 0) mask[count - 1] &= (__mmask32)~(0xFFFFFFFFu << l);
                base[count] = o[l] - l;
                mask[count++] = (__mmask32)(0xFFFFFFFFu << l);
            }
            if (count == 1) {  /* lowp_load_pair_runs always loads two runs */
                mask[1] = 0;
                base[1] = base[0];
            }
            for (int j0 = 0; j0 < cols; j0 += LOWP_ZMM_NR) {
                int width = cols - j0 < LOWP_ZMM_NR ? cols - j0 : LOWP_ZMM_NR, width4 = width / 4 * 4;
                const int *t = tap + j0;
                uint32_t *dst = packed + (long)j0 * g->kp + ((long)p_start + q) * LOWP_ZMM_NR;
                for (int i = 0; i < width4; i += 4) {
                    __m512i r0 = lowp_load_pair_runs(image + t[i], mask, base, count);
                    __m512i r1 = lowp_load_pair_runs(image + t[i + 1], mask, base, count);
                    __m512i r2 = lowp_load_pair_runs(image + t[i + 2], mask, base, count);
                    __m512i r3 = lowp_load_pair_runs(image + t[i + 3], mask, base, count);
                    __m512i s0 = _mm512_unpacklo_epi32(r0, r1), s1 = _mm512_unpackhi_epi32(r0, r1);
                    __m512i s2 = _mm512_unpacklo_epi32(r2, r3), s3 = _mm512_unpackhi_epi32(r2, r3);
                    __m512i u[4] = { _mm512_unpacklo_epi64(s0, s2), _mm512_unpackhi_epi64(s0, s2),
                                     _mm512_unpacklo_epi64(s1, s3), _mm512_unpackhi_epi64(s1, s3) };
                    uint32_t *d = dst + i;
                    for (int j = 0; j < 4; j++) {
                        _mm_storeu_si128((__m128i *)(d + (long)j * LOWP_ZMM_NR), _mm512_castsi512_si128(u[j]));
                        _mm_storeu_si128((__m128i *)(d + (long)(4 + j) * LOWP_ZMM_NR), _mm512_extracti32x4_epi32(u[j], 1));
                        _mm_storeu_si128((__m128i *)(d + (long)(8 + j) * LOWP_ZMM_NR), _mm512_extracti32x4_epi32(u[j], 2));
                        _mm_storeu_si128((__m128i *)(d + (long)(12 + j) * LOWP_ZMM_NR), _mm512_extracti32x4_epi32(u[j], 3));
                    }
                }
                for (int l = 0; l < 16; l++) {
                    uint32_t *d = dst + (long)l * LOWP_ZMM_NR;
                    for (int jj = width4; jj < LOWP_ZMM_NR; jj++)
                        d[jj] = jj < width ? (uint32_t)image[t[jj] + o[2 * l]] | (uint32_t)image[t[jj] + o[2 * l + 1]] << 16
                                           : 0u;
                }
            }
        }
        for (int j0 = 0; j0 < cols; j0 += LOWP_ZMM_NR) {
            int width = cols - j0 < LOWP_ZMM_NR ? cols - j0 : LOWP_ZMM_NR;
            const int *t = tap + j0;
            __mmask16 m0 = (__mmask16)(width >= 16 ? 0xFFFF : (1u << width) - 1);
            __mmask16 m1 = (__mmask16)(width >= 32 ? 0xFFFF : width > 16 ? (1u << (width - 16)) - 1 : 0);
            __m512i t0 = _mm512_maskz_loadu_epi32(m0, t), t1 = _mm512_maskz_loadu_epi32(m1, t + 16);
            uint32_t *dst = packed + (long)j0 * g->kp + (long)p_start * LOWP_ZMM_NR;
            for (int qq = q; qq < (len + 1) / 2; qq++)
                lowp_pack_bt_pair(image, out, k_start + 2 * qq, 2 * qq + 1 < len, t, width, t0, t1, m0, m1,
                                  dst + (long)qq * LOWP_ZMM_NR);
        }
    }
}

/* As lowp_pack_b, with op(B) lowered from columns->image (trans: op(B) = cols^T). */
static void lowp_pack_b_columns(const lowp_kgeom *g, const lowp_columns *columns, int trans, int n0, int cols,
                                int nr, uint32_t *out, int avx512)
{
    const int *k_offset = trans ? columns->out : columns->tap;
    const int *n_offset = (trans ? columns->tap : columns->out) + n0;
    const uint16_t *image = columns->image;
    int wide = avx512 && nr == LOWP_ZMM_NR && __builtin_cpu_supports("avx512bw");
    if (wide && trans) {
        lowp_pack_bt_columns_avx512(g, image, k_offset, n_offset, cols, out);
        return;
    }
    for (int j0 = 0; j0 < cols; j0 += nr) {
        int width = cols - j0 < nr ? cols - j0 : nr;
        uint32_t *panel = out + (long)j0 * g->kp;
        if (wide) {
            lowp_runs runs;
            lowp_find_runs(n_offset + j0, width, &runs);
            lowp_pack_b_columns_avx512(g, image, k_offset, &runs, panel);
            continue;
        }
        for (int k_start = 0, p_start = 0; k_start < g->k; k_start += g->chunk, p_start += g->chunk_pairs) {
            int len = g->k - k_start < g->chunk ? g->k - k_start : g->chunk;
            uint32_t *dst = panel + (long)p_start * nr;
            if (width < nr) memset(dst, 0, (size_t)((len + 1) / 2) * nr * sizeof *dst);
            for (int q = 0; q < (len + 1) / 2; q++) {
                const uint16_t *row0 = image + k_offset[k_start + 2 * q];
                const uint16_t *row1 = 2 * q + 1 < len ? image + k_offset[k_start + 2 * q + 1] : NULL;
                uint32_t *d = dst + (long)q * nr;
                for (int jj = 0; jj < width; jj++) {
                    int at = n_offset[j0 + jj];
                    d[jj] = (uint32_t)row0[at] | (row1 ? (uint32_t)row1[at] << 16 : 0u);
                }
            }
        }
    }
}

/* ---- overflow debugging ---------------------------------------------------------------------
 * Counts the (row, column, chunk) sums of one tile whose exact value leaves INT32: the exact sum
 * in int64, from the same packed operands the micro-kernel read, a row at a time so that the
 * column loop vectorizes. */
#define LOWP_MAX_NR 32
_Static_assert(LOWP_ZMM_NR <= LOWP_MAX_NR && LOWP_AVX2_NR <= LOWP_MAX_NR && LOWP_SCALAR_NR <= LOWP_MAX_NR,
               "lowp_count_overflows sums at most LOWP_MAX_NR columns");

static long long lowp_count_overflows(const lowp_kernel *kern, int mr, int nr, int kp, int chunk_pairs,
                                      const uint32_t *ap, const uint32_t *bp)
{
    long long events = 0;
    const int NR = kern->nr;
    for (int p0 = 0; p0 < kp; p0 += chunk_pairs) {
        int pend = p0 + chunk_pairs < kp ? p0 + chunk_pairs : kp;
        for (int i = 0; i < mr; i++) {
            int64_t sum[LOWP_MAX_NR] = {0};
            for (int p = p0; p < pend; p++) {
                uint32_t a = ap[(long)p * kern->mr + i];
                int64_t a_lo = (int16_t)(a & 0xFFFF), a_hi = (int16_t)(a >> 16);
                const uint32_t *brow = bp + (long)p * NR;
                for (int j = 0; j < NR; j++)
                    sum[j] += a_lo * (int16_t)(brow[j] & 0xFFFF) + a_hi * (int16_t)(brow[j] >> 16);
            }
            for (int j = 0; j < nr; j++) events += sum[j] > INT32_MAX || sum[j] < INT32_MIN;
        }
    }
    return events;
}

/* ---- the driver -------------------------------------------------------------------------------
 * Work is a grid of (column block x row block) items: a column block is as wide as fits
 * LOWP_B_BLOCK_BYTES of packed B, narrowed until every thread has one; rows are split too when
 * there are still fewer column blocks than threads. A is packed once, by all threads, then each
 * thread packs the B block of its items and runs the micro-kernel over it: one A row panel at a
 * time (48 bytes per pair: in L1 up to K of about 1500) against every B column panel of the block
 * (from L2). Row panels are
 * balanced (50 rows make 5 panels of 10, not 4 of 12 and one of 2), because a panel of few rows
 * has too few accumulators to hide the instruction's latency.
 *
 * Columns come in whole vectors (NR = 32 lanes), so a narrow C wastes lanes (N = 49 computes 64
 * columns). Computing C^T instead when M pads better, through a transposed scratch copy of C, was
 * tried and measured slower at most such shapes of ResNet-50 (2048 x 49 x 512: 250 against
 * 285 GOP/s): the transposes and the packing of the large operand as B cost more than the lanes. */

typedef struct {
    lowp_kernel kern;
    lowp_kgeom g;
    int m, n;
    int m_panels, nc, n_blocks, m_block_panels, m_blocks;
    int items;    /* independent work items */
    int threads;  /* the threads asked for, capped by the work: start min(items, threads) */
} lowp_plan;

static inline void lowp_plan_init(lowp_plan *plan, lowp_kernel kern, int m, int n, int k, int k_chunk, int threads)
{
    const int MR = kern.mr, NR = kern.nr;
    plan->kern = kern;
    plan->m = m;
    plan->n = n;
    lowp_kgeom_init(&plan->g, k, k_chunk);
    long kp = plan->g.kp > 0 ? plan->g.kp : 1;
    long work = (long)m * n * (k > 0 ? k : 1);
    if (threads > work / LOWP_MIN_WORK_PER_THREAD) threads = (int)(work / LOWP_MIN_WORK_PER_THREAD);
    if (threads < 1) threads = 1;
    plan->threads = threads;
    plan->m_panels = (m + MR - 1) / MR;
    int n_panels = (n + NR - 1) / NR;
    long fit = LOWP_B_BLOCK_BYTES / (kp * 4 * NR);
    int block_panels = fit < 1 ? 1 : (int)(fit < n_panels ? fit : n_panels);
    int per_thread = (n_panels + threads - 1) / threads;
    if (block_panels > per_thread) block_panels = per_thread;
    if (block_panels < 1) block_panels = 1;
    plan->nc = block_panels * NR;
    plan->n_blocks = (n + plan->nc - 1) / plan->nc;
    int m_blocks = 1;
    if (plan->n_blocks < threads) {
        m_blocks = (threads + plan->n_blocks - 1) / plan->n_blocks;
        if (m_blocks > plan->m_panels) m_blocks = plan->m_panels;
    }
    if (m_blocks < 1) m_blocks = 1;
    plan->m_block_panels = (plan->m_panels + m_blocks - 1) / m_blocks;
    plan->m_blocks = plan->m_block_panels > 0 ? (plan->m_panels + plan->m_block_panels - 1) / plan->m_block_panels : 1;
    plan->items = plan->n_blocks * plan->m_blocks;
}

/* First row of balanced row panel ip (ip == m_panels gives m). */
static inline int lowp_panel_row(const lowp_plan *plan, int ip)
{
    return (int)((long)ip * plan->m / plan->m_panels);
}

/* Packing buffers are kept per thread and only grow: a GEMM per image would otherwise map and
 * fault in fresh pages at every call. They are never freed; each holds the largest packed operand
 * its thread has seen (B: LOWP_B_BLOCK_BYTES, or one column panel where K makes that larger;
 * A: about M x K x 2 bytes). */
typedef struct {
    void *ptr;
    size_t bytes;
} lowp_buffer;

static __thread lowp_buffer lowp_a_buffer, lowp_b_buffer;

static inline void *lowp_reserve(lowp_buffer *buffer, size_t bytes)
{
    bytes = (bytes + 63) / 64 * 64 + 64;
    if (buffer->bytes < bytes) {
        free(buffer->ptr);
        buffer->ptr = aligned_alloc(64, bytes);
        buffer->bytes = buffer->ptr ? bytes : 0;
    }
    return buffer->ptr;
}

typedef struct {
    const lowp_plan *plan;
    int trans_a, trans_b;
    const uint16_t *a, *b;
    long lda, ldb, ldc;
    float *c;
    float scale, beta;
    int debug_overflow;
    uint32_t *apack;
    const lowp_columns *columns;  /* B lowered from an image instead of b / ldb (NULL: not) */
} lowp_job;

/* Thread t of team packs row panels t, t + team, ... of A. */
static void lowp_pack_a_share(const lowp_job *job, int t, int team)
{
    const lowp_plan *plan = job->plan;
    const int MR = plan->kern.mr;
    long kp = plan->g.kp > 0 ? plan->g.kp : 1;
    for (int ip = t; ip < plan->m_panels; ip += team) {
        int row = lowp_panel_row(plan, ip);
        lowp_pack_a(&plan->g, job->a, job->lda, job->trans_a, row, lowp_panel_row(plan, ip + 1) - row, MR,
                    job->apack + (long)ip * MR * kp, plan->kern.pack_avx512);
    }
}

/* Thread t of team runs its contiguous share of the work items (consecutive items share a B
 * block, packed once). Returns the overflow events counted, or -1 when B's buffer failed. */
static long long lowp_items_share(const lowp_job *job, int t, int team)
{
    const lowp_plan *plan = job->plan;
    const lowp_kernel *kern = &plan->kern;
    const lowp_kgeom *g = &plan->g;
    const int NR = kern->nr, MR = kern->mr;
    long kp = g->kp > 0 ? g->kp : 1;
    int per_thread = (plan->items + team - 1) / team;
    int first = t * per_thread, last = first + per_thread < plan->items ? first + per_thread : plan->items;
    if (first >= last) return 0;
    uint32_t *bpack = (uint32_t *)lowp_reserve(&lowp_b_buffer, (size_t)plan->nc * kp * 4);
    if (!bpack) return -1;
    long long events = 0;
    int packed_block = -1;
    for (int item = first; item < last; item++) {
        int jb = item / plan->m_blocks, mb = item % plan->m_blocks;
        int n0 = jb * plan->nc;
        int cols = plan->n - n0 < plan->nc ? plan->n - n0 : plan->nc;
        if (jb != packed_block) {
            if (job->columns)
                lowp_pack_b_columns(g, job->columns, job->trans_b, n0, cols, NR, bpack, kern->pack_avx512);
            else
                lowp_pack_b(g, job->b, job->ldb, job->trans_b, n0, cols, NR, bpack, kern->pack_avx512);
            packed_block = jb;
        }
        int ip0 = mb * plan->m_block_panels;
        int ip1 = ip0 + plan->m_block_panels < plan->m_panels ? ip0 + plan->m_block_panels : plan->m_panels;
        for (int ip = ip0; ip < ip1; ip++) {
            int row = lowp_panel_row(plan, ip), rows = lowp_panel_row(plan, ip + 1) - row;
            const uint32_t *ap = job->apack + (long)ip * MR * kp;
            for (int j0 = 0; j0 < cols; j0 += NR) {
                int nr = cols - j0 < NR ? cols - j0 : NR;
                const uint32_t *bp = bpack + (long)j0 * kp;
                kern->tile(rows, nr, g->kp, g->chunk_pairs, ap, bp, job->c + (long)row * job->ldc + n0 + j0, job->ldc,
                           job->scale, job->beta);
                if (job->debug_overflow)
                    events += lowp_count_overflows(kern, rows, nr, g->kp, g->chunk_pairs, ap, bp);
            }
        }
    }
    return events;
}

/* ---- pre-packed A: one operand shared by many products -------------------------------------
 * A convolution multiplies the same weights with every image's columns: packing them once per pass
 * instead of once per image made the forward passes of CIFAR-10 quick and AlexNet 5-15% faster. */

/* An upper bound, for any variant and chunking, of the bytes lowp_plan_pack_a writes for an m x k A:
 * fewer than m + MR rows (MR <= 12), at most k pairs (one per value when k_chunk is 1). */
static inline size_t lowp_packed_a_bound(int m, int k)
{
    return (size_t)(m + LOWP_ZMM_MR) * (size_t)(k > 0 ? k : 1) * 4;
}

/* Packs all of op(A) for the plan into apack (64-byte aligned, lowp_packed_a_bound bytes). */
static void lowp_plan_pack_a(const lowp_plan *plan, int trans_a, const uint16_t *a, long lda, uint32_t *apack)
{
    lowp_job job = { plan, trans_a, 0, a, NULL, lda, 0, 0, NULL, 0.0f, 0.0f, 0, apack };
    lowp_pack_a_share(&job, 0, 1);
}

/* Runs the plan on the calling thread alone with A packed by lowp_plan_pack_a; as lowp_plan_run. */
static int lowp_plan_run_packed_a(const lowp_plan *plan, const uint32_t *apack, int trans_b, const uint16_t *b,
                                  long ldb, float *c, long ldc, float scale, float beta, int debug_overflow,
                                  long long *overflow_events)
{
    if (overflow_events) *overflow_events = 0;
    if (plan->m <= 0 || plan->n <= 0) return 0;
    lowp_job job = { plan, 0, trans_b, NULL, b, 0, ldb, ldc, c, scale, beta, debug_overflow, (uint32_t *)apack };
    long long events = lowp_items_share(&job, 0, 1);
    if (events < 0) return -1;
    if (overflow_events) *overflow_events = events;
    return 0;
}

/* Runs the plan on the calling thread alone with op(B) lowered from columns' image (trans_b: the
 * transposed column matrix) and A packed by lowp_plan_pack_a (apack), or, when apack is NULL, packed
 * here from a / lda; as lowp_plan_run with B the column matrix. */
static int lowp_plan_run_columns(const lowp_plan *plan, const uint32_t *apack, int trans_a, const uint16_t *a,
                                 long lda, int trans_b, const lowp_columns *columns, float *c, long ldc,
                                 float scale, float beta, int debug_overflow, long long *overflow_events)
{
    if (overflow_events) *overflow_events = 0;
    if (plan->m <= 0 || plan->n <= 0) return 0;
    lowp_job job = { plan, trans_a, trans_b, a, NULL, lda, 0, ldc, c, scale, beta, debug_overflow,
                     (uint32_t *)apack, columns };
    if (!apack) {
        long kp = plan->g.kp > 0 ? plan->g.kp : 1;
        job.apack = (uint32_t *)lowp_reserve(&lowp_a_buffer, (size_t)plan->m_panels * plan->kern.mr * kp * 4);
        if (!job.apack) return -1;
        lowp_pack_a_share(&job, 0, 1);
    }
    long long events = lowp_items_share(&job, 0, 1);
    if (events < 0) return -1;
    if (overflow_events) *overflow_events = events;
    return 0;
}

/* Runs the plan on `team` threads (1: no parallel region at all, for callers that already run in
 * one). Returns 0, or -1 when a buffer could not be allocated (C is then unspecified). */
static int lowp_plan_run(const lowp_plan *plan, int team, int trans_a, int trans_b,
                         const uint16_t *a, long lda, const uint16_t *b, long ldb, float *c, long ldc,
                         float scale, float beta, int debug_overflow, long long *overflow_events)
{
    if (overflow_events) *overflow_events = 0;
    if (plan->m <= 0 || plan->n <= 0) return 0;
    long kp = plan->g.kp > 0 ? plan->g.kp : 1;
    lowp_job job = { plan, trans_a, trans_b, a, b, lda, ldb, ldc, c, scale, beta, debug_overflow, NULL };
    job.apack = (uint32_t *)lowp_reserve(&lowp_a_buffer, (size_t)plan->m_panels * plan->kern.mr * kp * 4);
    if (!job.apack) return -1;
    long long events = 0;
    int failed = 0;
#ifdef _OPENMP
    if (team > 1) {
#pragma omp parallel num_threads(team) reduction(+ : events, failed)
        {
            int t = omp_get_thread_num(), size = omp_get_num_threads();
            lowp_pack_a_share(&job, t, size);
#pragma omp barrier
            long long found = lowp_items_share(&job, t, size);
            if (found < 0) failed = 1; else events += found;
        }
    } else
#endif
    {
        lowp_pack_a_share(&job, 0, 1);
        events = lowp_items_share(&job, 0, 1);
        failed = events < 0;
    }
    if (overflow_events) *overflow_events = failed ? 0 : events;
    return failed ? -1 : 0;
}

#endif
