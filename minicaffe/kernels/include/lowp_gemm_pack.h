/* Part of lowp_gemm.h: packing A and B from row-major matrices into panels of 16-bit pairs (scalar,
 * with an AVX-512F 4 x 16 pair transpose). */
#ifndef MINICAFFE_LOWP_GEMM_PACK_H
#define MINICAFFE_LOWP_GEMM_PACK_H

#include "lowp_gemm_base.h"

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

#endif
