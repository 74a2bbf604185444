/* Part of lowp_gemm.h: packing B straight from a zero-padded image (a convolution's column matrix or
 * its transpose), so that im2col never writes the column matrix out. */
#ifndef MINICAFFE_LOWP_GEMM_COLUMNS_H
#define MINICAFFE_LOWP_GEMM_COLUMNS_H

#include "lowp_gemm_base.h"
#include "lowp_gemm_avx512.h"

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

#endif
