# C-level entries of the low-precision GEMMs, callable without the GIL from any kernel:
#     from minicaffe.kernels.lowp_gemm cimport gemm_s16_raw, gemm_bf16_raw
# Row-major operands; op(A) is m x k, op(B) is k x n (stored transposed where trans_a / trans_b),
# with rows lda / ldb apart; C is m x n with rows ldc apart. `threads` caps the OpenMP team (fewer
# start for small products; 1 starts none, for calls from inside a caller's own prange). Packing
# buffers are per thread, so concurrent calls from different threads are safe. Both use the variant
# that minicaffe.kernels.lowp_gemm selected (or that set_variant forced). Return 0, or -1 when a
# packing buffer could not be allocated (C is then unspecified).
from libc.stdint cimport int16_t, uint16_t, uint32_t

cdef extern from "lowp_gemm.h" nogil:
    # The blocking of one product (m, n, k, chunking, instruction-set variant).
    ctypedef struct lowp_plan:
        int items      # independent work items
        int threads    # threads worth starting for them

    # A convolution's column matrix, cols[r][j] = image[tap[r] + out[j]], read from the zero-padded
    # image while B is packed instead of being written out by im2col.
    ctypedef struct lowp_columns:
        const uint16_t* image
        const int* tap     # per row r (channel, kernel row, kernel column): the tap's offset
        const int* out     # per column j (output position): its window's offset

cdef int gemm_s16_raw(bint trans_a, bint trans_b, int m, int n, int k,
                      const int16_t* a, int lda, const int16_t* b, int ldb,
                      float* c, int ldc, float scale, float beta, int k_chunk,
                      bint debug_overflow, long long* overflow_events, int threads) noexcept nogil
# C = scale * op(A) @ op(B) + beta * C; INT32 sums over at most k_chunk products (0: all of K),
# each converted to FP32, scaled and added into C. With debug_overflow, *overflow_events is set
# (not added to) to the number of (row, column, chunk) sums whose exact value left INT32 (they wrap
# either way); the check is an int64 recount, about 40x the GEMM's time. overflow_events may be NULL.

cdef int gemm_bf16_raw(bint trans_a, bint trans_b, int m, int n, int k,
                       const uint16_t* a, int lda, const uint16_t* b, int ldb,
                       float* c, int ldc, float alpha, float beta, int threads) noexcept nogil
# C = alpha * op(A) @ op(B) + beta * C over BF16 bit patterns, FP32 accumulation.

# One operand shared by many single-threaded products (a convolution's weights against each image):
#     cdef lowp_plan plan
#     plan_gemm(&plan, bf16, m, n, k, k_chunk)        # k_chunk is ignored for BF16
#     pack_a(&plan, trans_a, a, lda, apack)          # apack: packed_a_bound(m, k) bytes, 64-aligned
#     gemm_packed_a(&plan, apack, trans_b, b, ldb, c, ldc, scale, beta, debug_overflow, &events)
# gemm_packed_a computes what gemm_s16_raw / gemm_bf16_raw (scale as alpha) compute with threads 1,
# bit for bit; it sets *events like them and returns 0, or -1 when a packing buffer failed.
cdef void plan_gemm(lowp_plan* plan, bint bf16, int m, int n, int k, int k_chunk) noexcept nogil
cdef size_t packed_a_bound(int m, int k) noexcept nogil
cdef void pack_a(const lowp_plan* plan, bint trans_a, const uint16_t* a, long lda, uint32_t* apack) noexcept nogil
cdef int gemm_packed_a(const lowp_plan* plan, const uint32_t* apack, bint trans_b, const uint16_t* b, long ldb,
                       float* c, long ldc, float scale, float beta, bint debug_overflow,
                       long long* events) noexcept nogil
# gemm_columns: the same with op(B) = cols (trans_b False) or cols^T (trans_b True), and A either
# packed by pack_a (apack) or, when apack is NULL, packed here from a / lda.
cdef int gemm_columns(const lowp_plan* plan, const uint32_t* apack, bint trans_a, const uint16_t* a, long lda,
                      bint trans_b, const lowp_columns* columns, float* c, long ldc, float scale, float beta,
                      bint debug_overflow, long long* events) noexcept nogil
