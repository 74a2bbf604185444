/* Part of lowp_gemm.h: the kernel table by variant, the overflow counter, the blocking plan, the
 * per-thread packing buffers and the entry points that run a plan (threaded, pre-packed A, B from
 * an image). */
#ifndef MINICAFFE_LOWP_GEMM_DRIVER_H
#define MINICAFFE_LOWP_GEMM_DRIVER_H

#include "lowp_gemm_base.h"
#include "lowp_gemm_pack.h"
#include "lowp_gemm_scalar.h"
#include "lowp_gemm_avx512.h"
#include "lowp_gemm_avx2.h"
#include "lowp_gemm_columns.h"

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
