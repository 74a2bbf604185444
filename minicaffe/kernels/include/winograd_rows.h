/* Row loops of the Winograd transforms in winograd.pyx, F(2x2, 3x3) and F(4x4, 3x3).
 *
 * Each 2-D transform is a 1-D one down the columns of a few rows (element-wise over whole rows),
 * then across each row (one tile every 2 or 4 elements). Every row is its own restrict-qualified
 * argument: with them GCC vectorizes the loops, where the same loops written over one base pointer
 * and a run-time row length need more alias checks than it will emit and stay scalar (measured:
 * the F(4x4) transforms took longer than its GEMMs).
 *
 * The matrices are Lavin and Gray's (arXiv:1509.09308): B^T for windows, A^T for outputs, A for
 * output gradients (the adjoint of A^T), G for filters and G^T for their gradients; the filter
 * transforms run over a row of filters, one filter per element of the rows they pass between (so
 * each plane of the transformed filters is written in one contiguous run). Each function exists
 * for float (_f) and double (_d), stamped out by MC_WINOGRAD_ROWS.
 */
#ifndef MINICAFFE_WINOGRAD_ROWS_H
#define MINICAFFE_WINOGRAD_ROWS_H

#include <stddef.h>

/* B^T d, F(2, 3): 4 values to 4. */
#define MC_B2(d0, d1, d2, d3, r0, r1, r2, r3) \
    do { r0 = (d0) - (d2); r1 = (d1) + (d2); r2 = (d2) - (d1); r3 = (d1) - (d3); } while (0)

/* B^T d, F(4, 3): 6 values to 6. */
#define MC_B4(T, d0, d1, d2, d3, d4, d5, r0, r1, r2, r3, r4, r5)                                       \
    do {                                                                                              \
        T even_ = (d4) - 4 * (d2), odd_ = (d3) - 4 * (d1), even2_ = (d4) - (d2), odd2_ = 2 * ((d3) - (d1)); \
        r0 = 4 * (d0) - 5 * (d2) + (d4);                                                              \
        r1 = even_ + odd_;                                                                            \
        r2 = even_ - odd_;                                                                            \
        r3 = even2_ + odd2_;                                                                          \
        r4 = even2_ - odd2_;                                                                          \
        r5 = 4 * (d1) - 5 * (d3) + (d5);                                                              \
    } while (0)

/* A^T m + add, F(2, 3): 4 values to 2. */
#define MC_A2(m0, m1, m2, m3, add, r0, r1) \
    do { r0 = (m0) + (m1) + (m2) + (add); r1 = (m1) - (m2) - (m3) + (add); } while (0)

/* A^T m + add, F(4, 3): 6 values to 4. */
#define MC_A4(T, m0, m1, m2, m3, m4, m5, add, r0, r1, r2, r3)                                           \
    do {                                                                                              \
        T sum12_ = (m1) + (m2), diff12_ = (m1) - (m2), sum34_ = (m3) + (m4), diff34_ = (m3) - (m4);   \
        r0 = (m0) + sum12_ + sum34_ + (add);                                                          \
        r1 = diff12_ + 2 * diff34_ + (add);                                                           \
        r2 = sum12_ + 4 * sum34_ + (add);                                                             \
        r3 = diff12_ + 8 * diff34_ + (m5) + (add);                                                    \
    } while (0)

/* A y, F(2, 3): 2 values to 4. */
#define MC_AT2(y0, y1, r0, r1, r2, r3) \
    do { r0 = (y0); r1 = (y0) + (y1); r2 = (y0) - (y1); r3 = -(y1); } while (0)

/* A y, F(4, 3): 4 values to 6. */
#define MC_AT4(T, y0, y1, y2, y3, r0, r1, r2, r3, r4, r5)                                              \
    do {                                                                                              \
        T even_ = (y0) + (y2), odd_ = (y1) + (y3), even4_ = (y0) + 4 * (y2), odd4_ = 2 * (y1) + 8 * (y3); \
        r0 = (y0);                                                                                    \
        r1 = even_ + odd_;                                                                            \
        r2 = even_ - odd_;                                                                            \
        r3 = even4_ + odd4_;                                                                          \
        r4 = even4_ - odd4_;                                                                          \
        r5 = (y3);                                                                                    \
    } while (0)

/* G g, F(2, 3): 3 filter values to 4. */
#define MC_G2(T, g0, g1, g2, r0, r1, r2, r3)                                                           \
    do {                                                                                              \
        T g0_ = (g0), g1_ = (g1), g2_ = (g2);                                                         \
        r0 = g0_;                                                                                     \
        r1 = (g0_ + g1_ + g2_) * (T)0.5;                                                              \
        r2 = (g0_ - g1_ + g2_) * (T)0.5;                                                              \
        r3 = g2_;                                                                                     \
    } while (0)

/* G g, F(4, 3): 3 filter values to 6. */
#define MC_G4(T, g0, g1, g2, r0, r1, r2, r3, r4, r5)                                                   \
    do {                                                                                              \
        T g0_ = (g0), g1_ = (g1), g2_ = (g2), outer_ = g0_ * (T)(1.0 / 24) + g2_ * (T)(1.0 / 6);      \
        r0 = g0_ * (T)0.25;                                                                           \
        r1 = (g0_ + g1_ + g2_) * (T)(-1.0 / 6);                                                       \
        r2 = (g0_ - g1_ + g2_) * (T)(-1.0 / 6);                                                       \
        r3 = outer_ + g1_ * (T)(1.0 / 12);                                                            \
        r4 = outer_ - g1_ * (T)(1.0 / 12);                                                            \
        r5 = g2_;                                                                                     \
    } while (0)

/* G^T d, F(2, 3): 4 values to 3, the adjoint of MC_G2. */
#define MC_GT2(T, d0, d1, d2, d3, r0, r1, r2)                                                          \
    do {                                                                                              \
        T d1_ = (d1), d2_ = (d2);                                                                     \
        r0 = (d0) + (d1_ + d2_) * (T)0.5;                                                             \
        r1 = (d1_ - d2_) * (T)0.5;                                                                    \
        r2 = (d1_ + d2_) * (T)0.5 + (d3);                                                             \
    } while (0)

/* G^T d, F(4, 3): 6 values to 3, the adjoint of MC_G4. */
#define MC_GT4(T, d0, d1, d2, d3, d4, d5, r0, r1, r2)                                                  \
    do {                                                                                              \
        T d1_ = (d1), d2_ = (d2), d3_ = (d3), d4_ = (d4), sum12_ = d1_ + d2_, sum34_ = d3_ + d4_;     \
        r0 = (d0) * (T)0.25 - sum12_ * (T)(1.0 / 6) + sum34_ * (T)(1.0 / 24);                         \
        r1 = (d2_ - d1_) * (T)(1.0 / 6) + (d3_ - d4_) * (T)(1.0 / 12);                                \
        r2 = (sum34_ - sum12_) * (T)(1.0 / 6) + (d5);                                                 \
    } while (0)

/* Filters and their gradients are transformed MC_WINO_FILTER_CHUNK at a time through scratch on the
 * stack (what passes between the two 1-D passes, and the gradients before they are added into dw),
 * small enough to stay in L1. */
#define MC_WINO_FILTER_CHUNK 64

#define MC_WINOGRAD_ROWS(T, S)                                                                        \
/* Windows, down the columns: r_b[i] = (B^T (d_0[i] .. d_3[i]))_b. */                                 \
static inline void mc_wino2_input_columns_##S(const T* restrict d0, const T* restrict d1,              \
        const T* restrict d2, const T* restrict d3, T* restrict r0, T* restrict r1, T* restrict r2,  \
        T* restrict r3, ptrdiff_t n) {                                                               \
    for (ptrdiff_t i = 0; i < n; i++)                                                                 \
        MC_B2(d0[i], d1[i], d2[i], d3[i], r0[i], r1[i], r2[i], r3[i]);                               \
}                                                                                                     \
                                                                                                      \
/* Windows, across a row: o_b[j] = (B^T (s[2j] .. s[2j + 3]))_b. */                                   \
static inline void mc_wino2_input_row_##S(const T* restrict s, T* restrict o0, T* restrict o1,        \
        T* restrict o2, T* restrict o3, ptrdiff_t count) {                                           \
    for (ptrdiff_t j = 0; j < count; j++)                                                             \
        MC_B2(s[2 * j], s[2 * j + 1], s[2 * j + 2], s[2 * j + 3], o0[j], o1[j], o2[j], o3[j]);       \
}                                                                                                     \
                                                                                                      \
static inline void mc_wino4_input_columns_##S(const T* restrict d0, const T* restrict d1,              \
        const T* restrict d2, const T* restrict d3, const T* restrict d4, const T* restrict d5,      \
        T* restrict r0, T* restrict r1, T* restrict r2, T* restrict r3, T* restrict r4,               \
        T* restrict r5, ptrdiff_t n) {                                                               \
    for (ptrdiff_t i = 0; i < n; i++)                                                                 \
        MC_B4(T, d0[i], d1[i], d2[i], d3[i], d4[i], d5[i], r0[i], r1[i], r2[i], r3[i], r4[i], r5[i]); \
}                                                                                                     \
                                                                                                      \
static inline void mc_wino4_input_row_##S(const T* restrict s, T* restrict o0, T* restrict o1,        \
        T* restrict o2, T* restrict o3, T* restrict o4, T* restrict o5, ptrdiff_t count) {           \
    for (ptrdiff_t j = 0; j < count; j++)                                                             \
        MC_B4(T, s[4 * j], s[4 * j + 1], s[4 * j + 2], s[4 * j + 3], s[4 * j + 4], s[4 * j + 5],     \
              o0[j], o1[j], o2[j], o3[j], o4[j], o5[j]);                                              \
}                                                                                                     \
                                                                                                      \
/* Outputs, down the columns: r_a[j] = (A^T (m_0[j] .. m_3[j]))_a. */                                 \
static inline void mc_wino2_output_columns_##S(const T* restrict m0, const T* restrict m1,             \
        const T* restrict m2, const T* restrict m3, T* restrict r0, T* restrict r1, ptrdiff_t n) {   \
    for (ptrdiff_t j = 0; j < n; j++)                                                                 \
        MC_A2(m0[j], m1[j], m2[j], m3[j], 0, r0[j], r1[j]);                                           \
}                                                                                                     \
                                                                                                      \
/* Outputs, across: out[2j + a] = (A^T (c_0[j] .. c_3[j]))_a + bias. */                               \
static inline void mc_wino2_output_row_##S(const T* restrict c0, const T* restrict c1,                 \
        const T* restrict c2, const T* restrict c3, T bias, T* restrict out, ptrdiff_t count) {      \
    for (ptrdiff_t j = 0; j < count; j++)                                                             \
        MC_A2(c0[j], c1[j], c2[j], c3[j], bias, out[2 * j], out[2 * j + 1]);                          \
}                                                                                                     \
                                                                                                      \
static inline void mc_wino4_output_columns_##S(const T* restrict m0, const T* restrict m1,             \
        const T* restrict m2, const T* restrict m3, const T* restrict m4, const T* restrict m5,      \
        T* restrict r0, T* restrict r1, T* restrict r2, T* restrict r3, ptrdiff_t n) {               \
    for (ptrdiff_t j = 0; j < n; j++)                                                                 \
        MC_A4(T, m0[j], m1[j], m2[j], m3[j], m4[j], m5[j], 0, r0[j], r1[j], r2[j], r3[j]);           \
}                                                                                                     \
                                                                                                      \
static inline void mc_wino4_output_row_##S(const T* restrict c0, const T* restrict c1,                 \
        const T* restrict c2, const T* restrict c3, const T* restrict c4, const T* restrict c5,      \
        T bias, T* restrict out, ptrdiff_t count) {                                                  \
    for (ptrdiff_t j = 0; j < count; j++)                                                             \
        MC_A4(T, c0[j], c1[j], c2[j], c3[j], c4[j], c5[j], bias,                                      \
              out[4 * j], out[4 * j + 1], out[4 * j + 2], out[4 * j + 3]);                            \
}                                                                                                     \
                                                                                                      \
/* Output gradients, down the columns: r_b[i] = (A (y_0[i], y_1[i]))_b. */                           \
static inline void mc_wino2_grad_columns_##S(const T* restrict y0, const T* restrict y1,               \
        T* restrict r0, T* restrict r1, T* restrict r2, T* restrict r3, ptrdiff_t n) {               \
    for (ptrdiff_t i = 0; i < n; i++)                                                                 \
        MC_AT2(y0[i], y1[i], r0[i], r1[i], r2[i], r3[i]);                                             \
}                                                                                                     \
                                                                                                      \
/* Output gradients, across: o_b[j] = (A (s[2j], s[2j + 1]))_b. */                                    \
static inline void mc_wino2_grad_row_##S(const T* restrict s, T* restrict o0, T* restrict o1,         \
        T* restrict o2, T* restrict o3, ptrdiff_t count) {                                           \
    for (ptrdiff_t j = 0; j < count; j++)                                                             \
        MC_AT2(s[2 * j], s[2 * j + 1], o0[j], o1[j], o2[j], o3[j]);                                   \
}                                                                                                     \
                                                                                                      \
static inline void mc_wino4_grad_columns_##S(const T* restrict y0, const T* restrict y1,               \
        const T* restrict y2, const T* restrict y3, T* restrict r0, T* restrict r1,                  \
        T* restrict r2, T* restrict r3, T* restrict r4, T* restrict r5, ptrdiff_t n) {               \
    for (ptrdiff_t i = 0; i < n; i++)                                                                 \
        MC_AT4(T, y0[i], y1[i], y2[i], y3[i], r0[i], r1[i], r2[i], r3[i], r4[i], r5[i]);             \
}                                                                                                     \
                                                                                                      \
static inline void mc_wino4_grad_row_##S(const T* restrict s, T* restrict o0, T* restrict o1,         \
        T* restrict o2, T* restrict o3, T* restrict o4, T* restrict o5, ptrdiff_t count) {           \
    for (ptrdiff_t j = 0; j < count; j++)                                                             \
        MC_AT4(T, s[4 * j], s[4 * j + 1], s[4 * j + 2], s[4 * j + 3],                                 \
               o0[j], o1[j], o2[j], o3[j], o4[j], o5[j]);                                             \
}                                                                                                     \
                                                                                                      \
/* The loops above for a tile size (2 or 4), with rows given as a first row and the distance between \
 * rows: what winograd.pyx calls. */                                                                  \
static inline void mc_wino_input_columns_##S(int tile, const T* d, ptrdiff_t step, T* r, ptrdiff_t n) { \
    if (tile == 2)                                                                                    \
        mc_wino2_input_columns_##S(d, d + step, d + 2 * step, d + 3 * step, r, r + step, r + 2 * step, \
                                   r + 3 * step, n);                                                  \
    else                                                                                              \
        mc_wino4_input_columns_##S(d, d + step, d + 2 * step, d + 3 * step, d + 4 * step, d + 5 * step, \
                                   r, r + step, r + 2 * step, r + 3 * step, r + 4 * step, r + 5 * step, n); \
}                                                                                                     \
                                                                                                      \
static inline void mc_wino_input_row_##S(int tile, const T* s, T* o, ptrdiff_t o_step, ptrdiff_t count) { \
    if (tile == 2)                                                                                    \
        mc_wino2_input_row_##S(s, o, o + o_step, o + 2 * o_step, o + 3 * o_step, count);              \
    else                                                                                              \
        mc_wino4_input_row_##S(s, o, o + o_step, o + 2 * o_step, o + 3 * o_step, o + 4 * o_step,      \
                               o + 5 * o_step, count);                                                \
}                                                                                                     \
                                                                                                      \
static inline void mc_wino_output_columns_##S(int tile, const T* m, ptrdiff_t step, T* r, ptrdiff_t r_step, \
                                              ptrdiff_t n) {                                          \
    if (tile == 2)                                                                                    \
        mc_wino2_output_columns_##S(m, m + step, m + 2 * step, m + 3 * step, r, r + r_step, n);       \
    else                                                                                              \
        mc_wino4_output_columns_##S(m, m + step, m + 2 * step, m + 3 * step, m + 4 * step, m + 5 * step, \
                                    r, r + r_step, r + 2 * r_step, r + 3 * r_step, n);                \
}                                                                                                     \
                                                                                                      \
static inline void mc_wino_output_row_##S(int tile, const T* c, ptrdiff_t step, T bias, T* out,       \
                                          ptrdiff_t count) {                                          \
    if (tile == 2)                                                                                    \
        mc_wino2_output_row_##S(c, c + step, c + 2 * step, c + 3 * step, bias, out, count);           \
    else                                                                                              \
        mc_wino4_output_row_##S(c, c + step, c + 2 * step, c + 3 * step, c + 4 * step, c + 5 * step,  \
                                bias, out, count);                                                    \
}                                                                                                     \
                                                                                                      \
static inline void mc_wino_grad_columns_##S(int tile, const T* y, ptrdiff_t step, T* r, ptrdiff_t n) { \
    if (tile == 2)                                                                                    \
        mc_wino2_grad_columns_##S(y, y + step, r, r + step, r + 2 * step, r + 3 * step, n);           \
    else                                                                                              \
        mc_wino4_grad_columns_##S(y, y + step, y + 2 * step, y + 3 * step, r, r + step, r + 2 * step, \
                                  r + 3 * step, r + 4 * step, r + 5 * step, n);                       \
}                                                                                                     \
                                                                                                      \
static inline void mc_wino_grad_row_##S(int tile, const T* s, T* o, ptrdiff_t o_step, ptrdiff_t count) { \
    if (tile == 2)                                                                                    \
        mc_wino2_grad_row_##S(s, o, o + o_step, o + 2 * o_step, o + 3 * o_step, count);               \
    else                                                                                              \
        mc_wino4_grad_row_##S(s, o, o + o_step, o + 2 * o_step, o + 3 * o_step, o + 4 * o_step,       \
                              o + 5 * o_step, count);                                                 \
}                                                                                                     \
                                                                                                      \
/* Filters, one 1-D pass over a run of filters: r_b[i] = (G (g_0[i step], g_1[i step], g_2[i step]))_b. \
 * The first pass reads the filters in place, ``step`` apart: measured faster overall than copying  \
 * them into rows first (the forward's reads 9 apart gained more than the adjoint's lost). */        \
static inline void mc_wino2_filter_1d_##S(const T* restrict g0, const T* restrict g1,                 \
        const T* restrict g2, ptrdiff_t step, T* restrict r0, T* restrict r1, T* restrict r2,        \
        T* restrict r3, ptrdiff_t n) {                                                               \
    for (ptrdiff_t i = 0; i < n; i++)                                                                 \
        MC_G2(T, g0[i * step], g1[i * step], g2[i * step], r0[i], r1[i], r2[i], r3[i]);               \
}                                                                                                     \
                                                                                                      \
static inline void mc_wino4_filter_1d_##S(const T* restrict g0, const T* restrict g1,                 \
        const T* restrict g2, ptrdiff_t step, T* restrict r0, T* restrict r1, T* restrict r2,        \
        T* restrict r3, T* restrict r4, T* restrict r5, ptrdiff_t n) {                               \
    for (ptrdiff_t i = 0; i < n; i++)                                                                 \
        MC_G4(T, g0[i * step], g1[i * step], g2[i * step], r0[i], r1[i], r2[i], r3[i], r4[i], r5[i]); \
}                                                                                                     \
                                                                                                      \
/* Filter gradients, one 1-D pass: r_a[i] = (G^T (d_0[i] .. d_{tile+1}[i]))_a. */                    \
static inline void mc_wino2_filter_grad_1d_##S(const T* restrict d0, const T* restrict d1,            \
        const T* restrict d2, const T* restrict d3, T* restrict r0, T* restrict r1, T* restrict r2,  \
        ptrdiff_t n) {                                                                               \
    for (ptrdiff_t i = 0; i < n; i++)                                                                 \
        MC_GT2(T, d0[i], d1[i], d2[i], d3[i], r0[i], r1[i], r2[i]);                                   \
}                                                                                                     \
                                                                                                      \
static inline void mc_wino4_filter_grad_1d_##S(const T* restrict d0, const T* restrict d1,            \
        const T* restrict d2, const T* restrict d3, const T* restrict d4, const T* restrict d5,      \
        T* restrict r0, T* restrict r1, T* restrict r2, ptrdiff_t n) {                               \
    for (ptrdiff_t i = 0; i < n; i++)                                                                 \
        MC_GT4(T, d0[i], d1[i], d2[i], d3[i], d4[i], d5[i], r0[i], r1[i], r2[i]);                     \
}                                                                                                     \
                                                                                                      \
/* The 1-D passes for a tile size: the 3 input rows row_step apart, the outputs r_step apart. */      \
static inline void mc_wino_filter_1d_##S(int tile, const T* g, ptrdiff_t row_step, ptrdiff_t step,    \
                                         T* r, ptrdiff_t r_step, ptrdiff_t n) {                       \
    if (tile == 2)                                                                                    \
        mc_wino2_filter_1d_##S(g, g + row_step, g + 2 * row_step, step, r, r + r_step,                \
                               r + 2 * r_step, r + 3 * r_step, n);                                    \
    else                                                                                              \
        mc_wino4_filter_1d_##S(g, g + row_step, g + 2 * row_step, step, r, r + r_step,                \
                               r + 2 * r_step, r + 3 * r_step, r + 4 * r_step, r + 5 * r_step, n);    \
}                                                                                                     \
                                                                                                      \
static inline void mc_wino_filter_grad_1d_##S(int tile, const T* d, ptrdiff_t d_step, T* r,           \
                                              ptrdiff_t r_step, ptrdiff_t n) {                        \
    if (tile == 2)                                                                                    \
        mc_wino2_filter_grad_1d_##S(d, d + d_step, d + 2 * d_step, d + 3 * d_step, r, r + r_step,     \
                                    r + 2 * r_step, n);                                               \
    else                                                                                              \
        mc_wino4_filter_grad_1d_##S(d, d + d_step, d + 2 * d_step, d + 3 * d_step, d + 4 * d_step,    \
                                    d + 5 * d_step, r, r + r_step, r + 2 * r_step, n);                \
}                                                                                                     \
                                                                                                      \
/* n filters: u[(alpha a + b) k_stride + i] = (G g G^T)[a][b] for the 3x3 filter g at w + i w_step,  \
 * read backwards (rotated by 180 degrees) where rotate. Each plane of u gets a contiguous run. */    \
static void mc_wino_filters_##S(int tile, const T* w, ptrdiff_t w_step, int rotate, T* u,              \
                                ptrdiff_t k_stride, ptrdiff_t n) {                                    \
    enum { chunk = MC_WINO_FILTER_CHUNK };                                                            \
    T t[18 * chunk];                                                                                  \
    ptrdiff_t alpha = tile + 2, dir = rotate ? -1 : 1;                                                \
    const T* first = rotate ? w + 8 : w;                                                              \
    for (ptrdiff_t start = 0; start < n; start += chunk) {                                            \
        ptrdiff_t count = n - start < chunk ? n - start : chunk;                                      \
        /* t[3 b + j] = (G g[:, j])_b down each column j, then G across each row of t. */             \
        for (int j = 0; j < 3; j++)                                                                   \
            mc_wino_filter_1d_##S(tile, first + start * w_step + dir * j, 3 * dir, w_step,            \
                                  t + j * chunk, 3 * chunk, count);                                   \
        for (ptrdiff_t a = 0; a < alpha; a++)                                                         \
            mc_wino_filter_1d_##S(tile, t + 3 * a * chunk, chunk, 1, u + alpha * a * k_stride + start, \
                                  k_stride, count);                                                   \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* The adjoint for n filter gradients: dw[9 i + 3 a + j] += (G^T dU G)[a][j], dU[k] at               \
 * du + k k_stride + i. */                                                                            \
static void mc_wino_add_filter_grads_##S(int tile, const T* du, ptrdiff_t k_stride, T* dw,             \
                                         ptrdiff_t n) {                                               \
    enum { chunk = MC_WINO_FILTER_CHUNK };                                                            \
    T t[18 * chunk], grad[9 * chunk];                                                                 \
    ptrdiff_t alpha = tile + 2;                                                                       \
    for (ptrdiff_t start = 0; start < n; start += chunk) {                                            \
        ptrdiff_t count = n - start < chunk ? n - start : chunk;                                      \
        /* t[alpha a + b] = (G^T dU[:, b])_a down each column b, then G^T across each row of t. */    \
        for (ptrdiff_t b = 0; b < alpha; b++)                                                         \
            mc_wino_filter_grad_1d_##S(tile, du + b * k_stride + start, alpha * k_stride,             \
                                       t + b * chunk, alpha * chunk, count);                          \
        for (int a = 0; a < 3; a++)                                                                   \
            mc_wino_filter_grad_1d_##S(tile, t + alpha * a * chunk, chunk, grad + 3 * a * chunk,      \
                                       chunk, count);                                                 \
        T* dst = dw + 9 * start;                                                                      \
        for (ptrdiff_t i = 0; i < count; i++)                                                         \
            for (int e = 0; e < 9; e++)                                                               \
                dst[9 * i + e] += grad[e * chunk + i];                                                \
    }                                                                                                 \
}

MC_WINOGRAD_ROWS(float, f)
MC_WINOGRAD_ROWS(double, d)

#undef MC_WINOGRAD_ROWS

#endif
