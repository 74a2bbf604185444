/* Row loops of the per-channel kernels in batchnorm.pyx, over one contiguous row of a channel.
 *
 * Sums run in double (the float data converted on load) in two vectors of eight lanes, the row's
 * last partial block of 16 included, then the lanes in a fixed tree: the order depends only on the
 * row length, never on the thread count. Written with GCC vector extensions because neither GCC nor
 * Cython vectorizes a double reduction on its own (no -ffast-math); without AVX-512 GCC splits the
 * vectors, same order.
 *
 * Each function exists for float (_f) and double (_d), stamped out by MC_SUM_KERNELS,
 * MC_NORMALIZE_KERNELS and MC_BACKWARD_KERNELS; with AVX-512 the float backward ones are written in
 * intrinsics instead.
 */
#ifndef MINICAFFE_CHANNEL_ROWS_H
#define MINICAFFE_CHANNEL_ROWS_H

#include <stddef.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__FP_FAST_FMAF)
#define MC_AVX512 1
#include <immintrin.h>
#include <stdint.h>
#endif

typedef double mc_v8d __attribute__((vector_size(64)));
typedef float mc_v8f __attribute__((vector_size(32)));
typedef long long mc_v8l __attribute__((vector_size(64)));

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

/* mc_load_part8_f/_d: the first count (0 to 8) elements at p, zeros after them; nothing past them is
 * read. */
#ifdef MC_AVX512
static inline mc_v8d mc_load_part8_f(const float* p, ptrdiff_t count) {
    return _mm512_cvtps_pd(_mm256_maskz_loadu_ps((__mmask8)((1u << count) - 1), p));
}

static inline mc_v8d mc_load_part8_d(const double* p, ptrdiff_t count) {
    return _mm512_maskz_loadu_pd((__mmask8)((1u << count) - 1), p);
}
#else
#define MC_LOAD_PART8(T, S)                                                                           \
static inline mc_v8d mc_load_part8_##S(const T* p, ptrdiff_t count) {                                 \
    mc_v8d v = {0};                                                                                   \
    for (ptrdiff_t k = 0; k < count; k++)                                                             \
        v[k] = p[k];                                                                                  \
    return v;                                                                                         \
}
MC_LOAD_PART8(float, f)
MC_LOAD_PART8(double, d)
#undef MC_LOAD_PART8
#endif

/* v with the lanes from count on set to 0. */
static inline mc_v8d mc_first_lanes(mc_v8d v, ptrdiff_t count) {
    const mc_v8l lane = {0, 1, 2, 3, 4, 5, 6, 7};
    return (mc_v8d)((mc_v8l)v & (lane < count));
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

/* The sums. The last n % 16 elements go through the same vectors as the rest, loaded partly (the
 * unused lanes 0), so a short row (ResNet-50's 49 or 196 floats) needs no scalar tail; the order of
 * the additions still depends on n alone. */
#define MC_SUM_KERNELS(T, S)                                                                          \
/* *sum += sum of (x - shift), *squares += sum of (x - shift)^2. */                                   \
static inline void mc_shifted_moments_##S(const T* x, ptrdiff_t n, double shift, double* sum,        \
                                          double* squares) {                                         \
    mc_v8d s0 = {0}, s1 = {0}, q0 = {0}, q1 = {0}, d0, d1;                                            \
    ptrdiff_t i = 0;                                                                                  \
    for (; i + 16 <= n; i += 16) {                                                                    \
        d0 = mc_load8_##S(x + i) - shift, d1 = mc_load8_##S(x + i + 8) - shift;                       \
        s0 += d0; s1 += d1; q0 += d0 * d0; q1 += d1 * d1;                                             \
    }                                                                                                 \
    if (i < n) {                                                                                      \
        ptrdiff_t low = n - i < 8 ? n - i : 8, high = n - i - low;                                    \
        d0 = mc_first_lanes(mc_load_part8_##S(x + i, low) - shift, low);                              \
        d1 = mc_first_lanes(mc_load_part8_##S(x + i + 8, high) - shift, high);                        \
        s0 += d0; s1 += d1; q0 += d0 * d0; q1 += d1 * d1;                                             \
    }                                                                                                 \
    *sum += mc_lanes_total(s0 + s1);                                                                  \
    *squares += mc_lanes_total(q0 + q1);                                                              \
}                                                                                                     \
                                                                                                      \
/* *sum += sum of x. */                                                                               \
static inline void mc_sum_##S(const T* x, ptrdiff_t n, double* sum) {                                 \
    mc_v8d s0 = {0}, s1 = {0};                                                                        \
    ptrdiff_t i = 0;                                                                                  \
    for (; i + 16 <= n; i += 16) {                                                                    \
        s0 += mc_load8_##S(x + i); s1 += mc_load8_##S(x + i + 8);                                     \
    }                                                                                                 \
    if (i < n) {                                                                                      \
        ptrdiff_t low = n - i < 8 ? n - i : 8;                                                        \
        s0 += mc_load_part8_##S(x + i, low); s1 += mc_load_part8_##S(x + i + 8, n - i - low);         \
    }                                                                                                 \
    *sum += mc_lanes_total(s0 + s1);                                                                  \
}                                                                                                     \
                                                                                                      \
/* *sum += sum of a, *dot += sum of a * b. */                                                         \
static inline void mc_sum_dot_##S(const T* a, const T* b, ptrdiff_t n, double* sum, double* dot) {   \
    mc_v8d s0 = {0}, s1 = {0}, p0 = {0}, p1 = {0}, a0, a1;                                            \
    ptrdiff_t i = 0;                                                                                  \
    for (; i + 16 <= n; i += 16) {                                                                    \
        a0 = mc_load8_##S(a + i), a1 = mc_load8_##S(a + i + 8);                                       \
        s0 += a0; s1 += a1;                                                                           \
        p0 += a0 * mc_load8_##S(b + i); p1 += a1 * mc_load8_##S(b + i + 8);                          \
    }                                                                                                 \
    if (i < n) {                                                                                      \
        ptrdiff_t low = n - i < 8 ? n - i : 8, high = n - i - low;                                    \
        a0 = mc_load_part8_##S(a + i, low), a1 = mc_load_part8_##S(a + i + 8, high);                  \
        s0 += a0; s1 += a1;                                                                           \
        p0 += a0 * mc_load_part8_##S(b + i, low); p1 += a1 * mc_load_part8_##S(b + i + 8, high);     \
    }                                                                                                 \
    *sum += mc_lanes_total(s0 + s1);                                                                  \
    *dot += mc_lanes_total(p0 + p1);                                                                  \
}

#define MC_NORMALIZE_KERNELS(T, S)                                                                    \
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

#define MC_BACKWARD_KERNELS(T, S)                                                                     \
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

MC_SUM_KERNELS(float, f)
MC_SUM_KERNELS(double, d)
MC_NORMALIZE_KERNELS(float, f)
MC_NORMALIZE_KERNELS(double, d)
MC_BACKWARD_KERNELS(double, d)

#ifdef MC_AVX512
/* The float backward passes in AVX-512, a row's last n % 16 elements in one masked vector rather
 * than a scalar loop (up to 15 of the 49 or 196 floats of ResNet-50's 7x7 and 14x14 rows), with the
 * scalar loops' arithmetic per element (x_norm * scale + shift in one FMA). */

/* Masks of the first count of 16 lanes, count 0 to 16. */
static inline __mmask16 mc_first16(ptrdiff_t count) {
    return (__mmask16)((1u << count) - 1);
}

/* ReLU's gradient over the lanes k of 16 (see mc_relu_gradient_f). */
static inline void mc_relu_gradient16_f(const float* dy, const float* x_norm, float* g, __mmask16 k, __m512 scale,
                                        __m512 shift, __m512 slope) {
    __m512 d = _mm512_maskz_loadu_ps(k, dy);
    __mmask16 open = _mm512_cmp_ps_mask(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, x_norm), scale, shift),
                                        _mm512_setzero_ps(), _CMP_GT_OQ);
    _mm512_mask_storeu_ps(g, k, _mm512_mask_mov_ps(_mm512_mul_ps(d, slope), open, d));
}

/* ReLU's gradient from its input t = x_norm * scale + shift, recomputed (the same float operations
 * as mc_normalize_streaming_f, so the same t): g = dy where t > 0, else negative_slope * dy; g may be
 * dy. */
static inline void mc_relu_gradient_f(const float* dy, const float* x_norm, float* g, ptrdiff_t n, float scale,
                                      float shift, float negative_slope) {
    const __m512 s = _mm512_set1_ps(scale), b = _mm512_set1_ps(shift), slope = _mm512_set1_ps(negative_slope);
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        mc_relu_gradient16_f(dy + i, x_norm + i, g + i, 0xffff, s, b, slope);
    if (i < n)
        mc_relu_gradient16_f(dy + i, x_norm + i, g + i, mc_first16(n - i), s, b, slope);
}

/* The backward formula over the lanes k of 16 (see mc_normalize_backward_f). */
static inline void mc_normalize_backward16_f(const float* dy, const float* x_norm, float* dx, __mmask16 k,
                                             __m512 scale, __m512 mean_dy, __m512 mean_dy_x_norm, __m512 factor) {
    __m512 t = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, dy), scale, mean_dy);
    t = _mm512_fnmadd_ps(_mm512_maskz_loadu_ps(k, x_norm), mean_dy_x_norm, t);
    _mm512_mask_storeu_ps(dx, k, _mm512_mul_ps(t, factor));
}

/* dx = (dy * scale - mean_dy - x_norm * mean_dy_x_norm) * factor; dx may be dy. */
static inline void mc_normalize_backward_f(const float* dy, const float* x_norm, float* dx, ptrdiff_t n,
                                           float scale, float mean_dy, float mean_dy_x_norm, float factor) {
    const __m512 s = _mm512_set1_ps(scale), m = _mm512_set1_ps(mean_dy), mx = _mm512_set1_ps(mean_dy_x_norm),
                 f = _mm512_set1_ps(factor);
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        mc_normalize_backward16_f(dy + i, x_norm + i, dx + i, 0xffff, s, m, mx, f);
    if (i < n)
        mc_normalize_backward16_f(dy + i, x_norm + i, dx + i, mc_first16(n - i), s, m, mx, f);
}
#else
MC_BACKWARD_KERNELS(float, f)
#endif

#undef MC_SUM_KERNELS
#undef MC_NORMALIZE_KERNELS
#undef MC_BACKWARD_KERNELS

/* mc_normalize (relu 0) or mc_normalize_relu (relu 1) for float, x_norm written with non-temporal
 * stores: it is read again only by the backward pass, long after it has left the caches, so this
 * skips reading its old contents in and saves a quarter of the forward's memory traffic. The
 * arithmetic is the same (one FMA for x_norm * scale + shift), so are the results. */
#ifdef MC_AVX512
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
