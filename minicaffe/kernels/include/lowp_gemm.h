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
 *
 * The code is split by concern into parts, included here in dependency order:
 *   lowp_gemm_base.h     variant enums, constants, target attributes, CPU features, K geometry;
 *   lowp_gemm_pack.h     packing A and B from matrices;
 *   lowp_gemm_scalar.h   portable INT16 and BF16 micro-kernels;
 *   lowp_gemm_avx512.h   AVX-512 VNNI / BF16 micro-kernels (inline assembly), BF16 emulated on AVX-512F;
 *   lowp_gemm_avx2.h     AVX2 and AVX-VNNI INT16 micro-kernels;
 *   lowp_gemm_columns.h  packing B straight from a zero-padded image (convolutions);
 *   lowp_gemm_driver.h   kernel table, overflow counter, blocking plan, buffers and the run entry points.
 */
#ifndef MINICAFFE_LOWP_GEMM_H
#define MINICAFFE_LOWP_GEMM_H

#include "lowp_gemm_base.h"
#include "lowp_gemm_pack.h"
#include "lowp_gemm_scalar.h"
#include "lowp_gemm_avx512.h"
#include "lowp_gemm_avx2.h"
#include "lowp_gemm_columns.h"
#include "lowp_gemm_driver.h"

#endif
