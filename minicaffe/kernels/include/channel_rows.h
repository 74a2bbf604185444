/* Row loops of the per-channel kernels in batchnorm.pyx, over one contiguous row of a channel.
 *
 * Sums run in double (the float data converted on load) in two vectors of eight lanes, then the
 * lanes in a fixed tree and the tail after them: the order depends only on the row length, never on
 * the thread count. Written with GCC vector extensions because neither GCC nor Cython vectorizes a
 * double reduction on its own (no -ffast-math); without AVX-512 GCC splits the vectors, same order.
 *
 * Each function exists for float (_f) and double (_d), stamped out by MC_ROW_KERNELS.
 */
#ifndef MINICAFFE_CHANNEL_ROWS_H
#define MINICAFFE_CHANNEL_ROWS_H

#include <stddef.h>
#include <string.h>

typedef double mc_v8d __attribute__((vector_size(64)));
typedef float mc_v8f __attribute__((vector_size(32)));

static inline mc_v8d mc_load8_f(const float* p) {
    mc_v8f v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, mc_v8d);
}

static inline mc_v8d mc_load8_d(const double* p) {
    mc_v8d v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline double mc_lanes_total(mc_v8d v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* x_norm * scale + shift, rounded once where the hardware has FMA (as the AVX-512 path below does),
 * whatever -ffp-contract says: the fused backward recomputes ReLU's input this way and must land on
 * the same side of 0 as forward did. */
#if defined(__FP_FAST_FMAF)
#define MC_MULADD_f(a, b, c) __builtin_fmaf(a, b, c)
#else
#define MC_MULADD_f(a, b, c) ((a) * (b) + (c))
#endif
#if defined(__FP_FAST_FMA)
#define MC_MULADD_d(a, b, c) __builtin_fma(a, b, c)
#else
#define MC_MULADD_d(a, b, c) ((a) * (b) + (c))
#endif

#define MC_ROW_KERNELS(T, S)                                                                          \
/* *sum += sum of (x - shift), *squares += sum of (x - shift)^2. */                                   \
static inline void mc_shifted_moments_##S(const T* x, ptrdiff_t n, double shift, double* sum,        \
                                          double* squares) {                                         \
    mc_v8d s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0};                                                    \
    ptrdiff_t i = 0;                                                                                  \
    for (; i + 16 <= n; i += 16) {                                                                    \
        mc_v8d d0 = mc_load8_##S(x + i) - shift, d1 = mc_load8_##S(x + i + 8) - shift;               \
        s0 += d0; s1 += d1; q0 += d0 * d0; q1 += d1 * d1;                                             \
    }                                                                                                 \
    double ts = mc_lanes_total(s0 + s1), tq = mc_lanes_total(q0 + q1);                               \
    for (; i < n; i++) {                                                                              \
        double d = (double)x[i] - shift;                                                              \
        ts += d; tq += d * d;                                                                         \
    }                                                                                                 \
    *sum += ts;                                                                                       \
    *squares += tq;                                                                                   \
}                                                                                                     \
                                                                                                      \
/* *sum += sum of x. */                                                                               \
static inline void mc_sum_##S(const T* x, ptrdiff_t n, double* sum) {                                 \
    mc_v8d s0 = {0}, s1 = {0};                                                                        \
    ptrdiff_t i = 0;                                                                                  \
    for (; i + 16 <= n; i += 16) {                                                                    \
        s0 += mc_load8_##S(x + i); s1 += mc_load8_##S(x + i + 8);                                     \
    }                                                                                                 \
    double ts = mc_lanes_total(s0 + s1);                                                              \
    for (; i < n; i++)                                                                                \
        ts += x[i];                                                                                   \
    *sum += ts;                                                                                       \
}                                                                                                     \
                                                                                                      \
/* *sum += sum of a, *dot += sum of a * b. */                                                         \
static inline void mc_sum_dot_##S(const T* a, const T* b, ptrdiff_t n, double* sum, double* dot) {   \
    mc_v8d s0 = {0}, s1 = {0}, p0 = {0}, p1 = {0};                                                    \
    ptrdiff_t i = 0;                                                                                  \
    for (; i + 16 <= n; i += 16) {                                                                    \
        mc_v8d a0 = mc_load8_##S(a + i), a1 = mc_load8_##S(a + i + 8);                                \
        s0 += a0; s1 += a1;                                                                           \
        p0 += a0 * mc_load8_##S(b + i); p1 += a1 * mc_load8_##S(b + i + 8);                          \
    }                                                                                                 \
    double ts = mc_lanes_total(s0 + s1), tp = mc_lanes_total(p0 + p1);                               \
    for (; i < n; i++) {                                                                              \
        ts += a[i]; tp += (double)a[i] * b[i];                                                        \
    }                                                                                                 \
    *sum += ts;                                                                                       \
    *dot += tp;                                                                                       \
}                                                                                                     \
                                                                                                      \
/* x_norm = (x - mean) * factor, y = x_norm * scale + shift; y may be x. */                          \
static inline void mc_normalize_##S(const T* x, T* y, T* x_norm, ptrdiff_t n, T mean, T factor,     \
                                    T scale, T shift) {                                               \
    ptrdiff_t i;                                                                                      \
    for (i = 0; i < n; i++) {                                                                         \
        T v = (x[i] - mean) * factor;                                                                 \
        x_norm[i] = v;                                                                                \
        y[i] = MC_MULADD_##S(v, scale, shift);                                                        \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* As mc_normalize, then y = y where y > 0, else negative_slope * y (ReLU's rule, NaN kept). */       \
static inline void mc_normalize_relu_##S(const T* x, T* y, T* x_norm, ptrdiff_t n, T mean, T factor, \
                                         T scale, T shift, T negative_slope) {                        \
    ptrdiff_t i;                                                                                      \
    if (negative_slope == 0) {                                                                        \
        for (i = 0; i < n; i++) {                                                                     \
            T v = (x[i] - mean) * factor, t;                                                          \
            x_norm[i] = v;                                                                            \
            t = MC_MULADD_##S(v, scale, shift);                                                       \
            y[i] = t <= 0 ? (T)0 : t;                                                                 \
        }                                                                                             \
        return;                                                                                       \
    }                                                                                                 \
    for (i = 0; i < n; i++) {                                                                         \
        T v = (x[i] - mean) * factor, t;                                                              \
        x_norm[i] = v;                                                                                \
        t = MC_MULADD_##S(v, scale, shift);                                                           \
        y[i] = t <= 0 ? t * negative_slope : t;                                                       \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* ReLU's gradient from its input t = x_norm * scale + shift, recomputed (the same float operations \
 * as mc_normalize_relu, so the same t): g = dy where t > 0, else negative_slope * dy; g may be dy. */\
static inline void mc_relu_gradient_##S(const T* dy, const T* x_norm, T* g, ptrdiff_t n, T scale,    \
                                        T shift, T negative_slope) {                                  \
    ptrdiff_t i;                                                                                      \
    for (i = 0; i < n; i++)                                                                           \
        g[i] = MC_MULADD_##S(x_norm[i], scale, shift) > 0 ? dy[i] : dy[i] * negative_slope;           \
}                                                                                                     \
                                                                                                      \
/* dx = (dy * scale - mean_dy - x_norm * mean_dy_x_norm) * factor; dx may be dy. */                   \
static inline void mc_normalize_backward_##S(const T* dy, const T* x_norm, T* dx, ptrdiff_t n,       \
                                             T scale, T mean_dy, T mean_dy_x_norm, T factor) {        \
    ptrdiff_t i;                                                                                      \
    for (i = 0; i < n; i++)                                                                           \
        dx[i] = (dy[i] * scale - mean_dy - x_norm[i] * mean_dy_x_norm) * factor;                      \
}

MC_ROW_KERNELS(float, f)
MC_ROW_KERNELS(double, d)

#undef MC_ROW_KERNELS

/* mc_normalize (relu 0) or mc_normalize_relu (relu 1) for float, x_norm written with non-temporal
 * stores: it is read again only by the backward pass, long after it has left the caches, so this
 * skips reading its old contents in and saves a quarter of the forward's memory traffic. The
 * arithmetic is the same (one FMA for x_norm * scale + shift), so are the results. */
#if defined(__AVX512F__) && defined(__FP_FAST_FMAF)
#include <immintrin.h>
#include <stdint.h>

static inline void mc_normalize_streaming_f(const float* x, float* y, float* x_norm, ptrdiff_t n, float mean,
                                            float factor, float scale, float shift, int relu,
                                            float negative_slope) {
    ptrdiff_t head = (ptrdiff_t)(((64 - ((uintptr_t)x_norm & 63)) & 63) / sizeof(float)), i;
    if (n < 64)
        head = n;   /* too short to be worth aligning */
    if (relu)
        mc_normalize_relu_f(x, y, x_norm, head, mean, factor, scale, shift, negative_slope);
    else
        mc_normalize_f(x, y, x_norm, head, mean, factor, scale, shift);
    if (head == n)
        return;
    const __m512 m = _mm512_set1_ps(mean), f = _mm512_set1_ps(factor), s = _mm512_set1_ps(scale),
                 b = _mm512_set1_ps(shift), slope = _mm512_set1_ps(negative_slope), zero = _mm512_setzero_ps();
    for (i = head; i + 16 <= n; i += 16) {
        __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), m), f);
        __m512 t = _mm512_fmadd_ps(v, s, b);
        _mm512_stream_ps(x_norm + i, v);
        if (relu) {
            /* t <= 0 is false for NaN, which passes through as in mc_normalize_relu. */
            __mmask16 clipped = _mm512_cmp_ps_mask(t, zero, _CMP_LE_OQ);
            t = negative_slope == 0 ? _mm512_mask_mov_ps(t, clipped, zero) : _mm512_mask_mul_ps(t, clipped, t, slope);
        }
        _mm512_storeu_ps(y + i, t);
    }
    _mm_sfence();
    if (relu)
        mc_normalize_relu_f(x + i, y + i, x_norm + i, n - i, mean, factor, scale, shift, negative_slope);
    else
        mc_normalize_f(x + i, y + i, x_norm + i, n - i, mean, factor, scale, shift);
}
#else
static inline void mc_normalize_streaming_f(const float* x, float* y, float* x_norm, ptrdiff_t n, float mean,
                                            float factor, float scale, float shift, int relu,
                                            float negative_slope) {
    if (relu)
        mc_normalize_relu_f(x, y, x_norm, n, mean, factor, scale, shift, negative_slope);
    else
        mc_normalize_f(x, y, x_norm, n, mean, factor, scale, shift);
}
#endif

#endif
