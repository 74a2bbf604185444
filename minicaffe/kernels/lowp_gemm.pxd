# C-level entries of the low-precision GEMMs, callable without the GIL from any kernel:
#     from minicaffe.kernels.lowp_gemm cimport gemm_s16_raw, gemm_bf16_raw
# Row-major operands; op(A) is m x k, op(B) is k x n (stored transposed where trans_a / trans_b),
# with rows lda / ldb apart; C is m x n with rows ldc apart. `threads` caps the OpenMP team (fewer
# start for small products; 1 starts none, for calls from inside a caller's own prange). Packing
# buffers are per thread, so concurrent calls from different threads are safe. Both use the variant
# that minicaffe.kernels.lowp_gemm selected (or that set_variant forced). Return 0, or -1 when a
# packing buffer could not be allocated (C is then unspecified).
from libc.stdint cimport int16_t, uint16_t

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
