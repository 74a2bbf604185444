/* Counter-based random fills: value i of a fill is a pure function of (key, i).
 *
 * Random word j of key k is the SplitMix64 output for the state k + (j + 1) * golden gamma, that is
 * word j of the SplitMix64 stream seeded with k. Dropout's masks use the same words (activation.pyx).
 * Keys k and k + m * gamma give the same stream shifted by m words, so two fills keyed by random
 * 64-bit draws overlap with probability about (their length) / 2^63.
 *
 * float32 fills take two values from each word: value 2j from its high 32 bits, value 2j + 1 from its
 * low 32 bits. float64 fills take one word per uniform and two words per pair of normals.
 *
 * Uniforms: float32 from the top 24 bits of the half (k * 2^-24), float64 from the top 53 bits of the
 * word; both lie in [0, 1): 0 is possible (probability 2^-24 or 2^-53), 1 never.
 *
 * Normals: Box-Muller on a pair. float32: the radius uniform comes from all 32 bits of the high half,
 * as float(k) * 2^-32 + 2^-33, in (0, 1], so log never sees 0 and the tail reaches 6.8 sigma; the angle
 * is the top 24 bits of the low half, in turns. log and sin/cos are our own polynomials, which the
 * compiler vectorizes where libm calls would stay scalar (tests/test_random_kernel.py checks them
 * against float64 libm). float64 uses libm on 53-bit uniforms, the radius one offset by 2^-54 so that
 * log never sees 0; these loops stay scalar (float64 refills are for gradient checks, not speed).
 *
 * The main loops carry no branches, so the compiler vectorizes them; a pair split by the edge of a
 * range is computed by the same inline function in scalar code.
 */
#ifndef MINICAFFE_RANDOM_FILL_H
#define MINICAFFE_RANDOM_FILL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define MINICAFFE_GOLDEN_GAMMA 0x9E3779B97F4A7C15ULL

static inline uint64_t mc_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint64_t mc_random_word(uint64_t key, uint64_t counter) {
    return mc_mix64(key + (counter + 1) * MINICAFFE_GOLDEN_GAMMA);
}

static inline float mc_uniform24(uint32_t half) {
    return (float)(half >> 8) * 0x1p-24f;
}

/* ln(x) for a normal float x > 0: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), and
 * ln(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...) with s = (m - 1) / (m + 1), |s| < 0.172, where the
 * first omitted term is below 3e-9 of the sum. m - 1 is exact, so ln stays accurate near x = 1. */
static inline float mc_logf(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    int32_t exponent = (int32_t)(bits >> 23) - 127;
    uint32_t mantissa_bits = (bits & 0x007FFFFFu) | 0x3F800000u;
    float m;
    memcpy(&m, &mantissa_bits, sizeof m);
    int above = m > 1.41421356f;
    m = above ? m * 0.5f : m;
    exponent += above;
    float s = (m - 1.0f) / (m + 1.0f);
    float s2 = s * s;
    float series = 1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
    float e = (float)exponent;
    /* ln 2 in two parts: e * 0.693359375 is exact for |e| < 2^15. */
    return e * 0.693359375f + (e * -2.121944400546905827679e-4f + 2.0f * s * series);
}

/* sin and cos of 2 pi a / 2^24 for a 24-bit a: the octant comes from the top 3 bits, and the angle
 * within it, reflected so that it lies in [0, pi/4], from the other 21 (exact); Taylor series there
 * (first omitted terms below 2e-9). Reflection keeps the result accurate relative to its size near
 * every zero of sin and cos. */
static inline void mc_sincos_turns24(uint32_t a, float* sin_out, float* cos_out) {
    uint32_t octant = a >> 21;
    int32_t within = (int32_t)(a & 0x1FFFFFu);
    within = (octant & 1u) ? (1 << 21) - within : within;
    float x = (float)within * (float)(M_PI / 4 / (1 << 21));
    float x2 = x * x;
    float s = x * (1.0f + x2 * (-1.0f / 6 + x2 * (1.0f / 120 + x2 * (-1.0f / 5040 + x2 * (1.0f / 362880)))));
    float c = 1.0f + x2 * (-0.5f + x2 * (1.0f / 24 + x2 * (-1.0f / 720 + x2 * (1.0f / 40320
              + x2 * (-1.0f / 3628800)))));
    int swap = ((octant + 1) >> 1) & 1u;
    float sin_value = swap ? c : s;
    float cos_value = swap ? s : c;
    *sin_out = (octant >= 4) ? -sin_value : sin_value;
    *cos_out = (((octant + 2) >> 2) & 1u) ? -cos_value : cos_value;
}

/* The two standard normals of word w (float32). */
static inline void mc_normal_pair_f32(uint64_t w, float* z0, float* z1) {
    float u = (float)(uint32_t)(w >> 32) * 0x1p-32f + 0x1p-33f;
    float radius = sqrtf(-2.0f * mc_logf(u));
    float s, c;
    mc_sincos_turns24((uint32_t)w >> 8, &s, &c);
    *z0 = radius * c;
    *z1 = radius * s;
}

/* out[i] = low + scale * U_i for i in [start, end); out points at element 0 of the fill. */
static inline void mc_fill_uniform_f32(float* out, int64_t start, int64_t end, uint64_t key,
                                       float low, float scale) {
    int64_t i = start;
    if ((i & 1) && i < end) {
        out[i] = low + scale * mc_uniform24((uint32_t)mc_random_word(key, (uint64_t)(i >> 1)));
        i++;
    }
    int64_t pairs_end = end >> 1;
    #pragma omp simd
    for (int64_t j = i >> 1; j < pairs_end; j++) {
        uint64_t w = mc_random_word(key, (uint64_t)j);
        out[2 * j] = low + scale * mc_uniform24((uint32_t)(w >> 32));
        out[2 * j + 1] = low + scale * mc_uniform24((uint32_t)w);
    }
    if ((end & 1) && end - 1 >= i) {
        out[end - 1] = low + scale * mc_uniform24((uint32_t)(mc_random_word(key, (uint64_t)(end >> 1)) >> 32));
    }
}

static inline void mc_fill_normal_f32(float* out, int64_t start, int64_t end, uint64_t key,
                                      float mean, float std) {
    float z0, z1;
    int64_t i = start;
    if ((i & 1) && i < end) {
        mc_normal_pair_f32(mc_random_word(key, (uint64_t)(i >> 1)), &z0, &z1);
        out[i] = mean + std * z1;
        i++;
    }
    int64_t pairs_end = end >> 1;
    #pragma omp simd private(z0, z1)
    for (int64_t j = i >> 1; j < pairs_end; j++) {
        mc_normal_pair_f32(mc_random_word(key, (uint64_t)j), &z0, &z1);
        out[2 * j] = mean + std * z0;
        out[2 * j + 1] = mean + std * z1;
    }
    if ((end & 1) && end - 1 >= i) {
        mc_normal_pair_f32(mc_random_word(key, (uint64_t)(end >> 1)), &z0, &z1);
        out[end - 1] = mean + std * z0;
    }
}

static inline double mc_uniform53(uint64_t w) {
    return (double)(w >> 11) * 0x1p-53;
}

static inline void mc_fill_uniform_f64(double* out, int64_t start, int64_t end, uint64_t key,
                                       double low, double scale) {
    for (int64_t i = start; i < end; i++) {
        out[i] = low + scale * mc_uniform53(mc_random_word(key, (uint64_t)i));
    }
}

/* Normals 2p and 2p + 1 (float64) come from words 2p (radius) and 2p + 1 (angle). */
static inline void mc_normal_pair_f64(uint64_t key, int64_t pair, double* z0, double* z1) {
    double u = mc_uniform53(mc_random_word(key, (uint64_t)(2 * pair))) + 0x1p-54;
    double radius = sqrt(-2.0 * log(u));
    double angle = 2.0 * M_PI * mc_uniform53(mc_random_word(key, (uint64_t)(2 * pair + 1)));
    *z0 = radius * cos(angle);
    *z1 = radius * sin(angle);
}

static inline void mc_fill_normal_f64(double* out, int64_t start, int64_t end, uint64_t key,
                                      double mean, double std) {
    double z0, z1;
    int64_t i = start;
    if ((i & 1) && i < end) {
        mc_normal_pair_f64(key, i >> 1, &z0, &z1);
        out[i] = mean + std * z1;
        i++;
    }
    for (int64_t pair = i >> 1; pair < (end >> 1); pair++) {
        mc_normal_pair_f64(key, pair, &z0, &z1);
        out[2 * pair] = mean + std * z0;
        out[2 * pair + 1] = mean + std * z1;
    }
    if ((end & 1) && end - 1 >= i) {
        mc_normal_pair_f64(key, end >> 1, &z0, &z1);
        out[end - 1] = mean + std * z0;
    }
}

#endif
