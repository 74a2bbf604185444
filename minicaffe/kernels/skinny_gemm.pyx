"""Matrix products with a small batch against a large weight matrix (the C kernels: include/skinny_gemm.h).

A fully connected layer at batch 16 multiplies a 16-row matrix by a weight matrix of millions of
values. BLAS first packs the weight matrix into its own layout, a copy that costs about as much as
the product itself; the skinny kernels stream the weights once, in place. ``matmul`` takes the
arguments of ``minicaffe.kernels.blas.matmul`` and sends each product to the skinny kernel or to
BLAS by shape (``prefers_skinny``); ``skinny_matmul`` always runs the skinny kernel.

Threads split the output columns, never the sum, so results are the same for any thread count.
"""
from cython cimport floating

from minicaffe.kernels import blas
from minicaffe.kernels.parallel import num_threads

cdef extern from "skinny_gemm.h" nogil:
    int SKINNY_MAX_M
    void skinny_abt_f32(int m, int n, int k, const float* a, long lda, const float* b, long ldb,
                        float* c, long ldc, float beta, int threads)
    void skinny_ab_f32(int m, int n, int k, const float* a, long lda, const float* b, long ldb,
                       float* c, long ldc, float beta, int threads)
    void skinny_abt_f64(int m, int n, int k, const double* a, long lda, const double* b, long ldb,
                        double* c, long ldc, double beta, int threads)
    void skinny_ab_f64(int m, int n, int k, const double* a, long lda, const double* b, long ldb,
                       double* c, long ldc, double beta, int threads)

cdef extern from *:
    """
    #if defined(__AVX512F__)
    #define SKINNY_VECTORIZED 1
    #else
    #define SKINNY_VECTORIZED 0
    #endif
    """
    int SKINNY_VECTORIZED

cdef enum:
    # Below this many multiply-adds a second thread costs more to wake than it saves.
    MIN_WORK_PER_THREAD = 1 << 18

MAX_ROWS = SKINNY_MAX_M
# From interleaved timings against OpenBLAS (docs/PERFORMANCE.md): the skinny kernels win up to a
# batch of MAX_BATCH once the product has MIN_WORK multiply-adds; below that the call overhead and
# OpenBLAS's GEMV path (one row) win, and above MAX_BATCH its packing pays for itself.
MAX_BATCH = 16
MIN_WORK = 1 << 21


def vectorized():
    """True when the float32 kernels use AVX-512 (else they are plain C and ``matmul`` keeps BLAS)."""
    return bool(SKINNY_VECTORIZED)


cdef long _leading_dim(const floating[:, :] x, str name) except -1:
    cdef Py_ssize_t itemsize = sizeof(floating)
    if x.shape[1] > 1 and x.shape[0] > 0 and x.strides[1] != itemsize:
        raise ValueError(f"skinny_matmul: the rows of {name} must be contiguous")
    if x.shape[0] <= 1:
        return max(x.shape[1], 1)
    if x.strides[0] < x.shape[1] * itemsize or x.strides[0] % itemsize:
        raise ValueError(f"skinny_matmul: the rows of {name} overlap or are misaligned")
    return x.strides[0] // itemsize


def skinny_matmul(const floating[:, :] a, const floating[:, :] b, floating[:, :] c, bint trans_b=False,
                  double beta=0.0):
    """C = A @ op(B) + beta * C for A with at most ``MAX_ROWS`` rows, op(B) = B^T where ``trans_b``."""
    cdef int m = c.shape[0], n = c.shape[1]
    cdef int k = a.shape[1]
    cdef int b_rows = b.shape[1] if trans_b else b.shape[0]
    cdef int b_cols = b.shape[0] if trans_b else b.shape[1]
    if a.shape[0] != m or b_rows != k or b_cols != n:
        raise ValueError(f"skinny_matmul: A is {a.shape[0]}x{k}, op(B) is {b_rows}x{b_cols}, C is {m}x{n}")
    if m > SKINNY_MAX_M:
        raise ValueError(f"skinny_matmul: A has {m} rows, more than {SKINNY_MAX_M}")
    if m == 0 or n == 0:
        return
    cdef long lda = _leading_dim(a, "A"), ldb = _leading_dim(b, "B"), ldc = _leading_dim(c, "C")
    cdef const floating* pa = &a[0, 0] if a.shape[0] * a.shape[1] > 0 else NULL
    cdef const floating* pb = &b[0, 0] if b.shape[0] * b.shape[1] > 0 else NULL
    cdef floating* pc = &c[0, 0]
    cdef long work = <long>m * n * max(k, 1)
    cdef int threads = max(1, min(<int>num_threads(), <int>(work // MIN_WORK_PER_THREAD)))
    with nogil:
        if floating is float:
            if trans_b:
                skinny_abt_f32(m, n, k, pa, lda, pb, ldb, pc, ldc, <float>beta, threads)
            else:
                skinny_ab_f32(m, n, k, pa, lda, pb, ldb, pc, ldc, <float>beta, threads)
        else:
            if trans_b:
                skinny_abt_f64(m, n, k, pa, lda, pb, ldb, pc, ldc, beta, threads)
            else:
                skinny_ab_f64(m, n, k, pa, lda, pb, ldb, pc, ldc, beta, threads)


def prefers_skinny(int m, int n, int k, bint trans_a, bint trans_b, dtype):
    """True when ``matmul`` sends C[m, n] = op(A)[m, k] @ op(B)[k, n] to the skinny kernel."""
    return (not trans_a and 1 <= m <= MAX_BATCH and <long>m * n * k >= MIN_WORK
            and SKINNY_VECTORIZED and dtype == "float32")


def matmul(a, b, c, bint trans_a=False, bint trans_b=False, double alpha=1.0, double beta=0.0):
    """``blas.matmul`` with the same arguments, or the skinny kernel where it is faster (by shape)."""
    cdef int k = a.shape[0] if trans_a else a.shape[1]
    if alpha == 1.0 and prefers_skinny(c.shape[0], c.shape[1], k, trans_a, trans_b, c.dtype):
        skinny_matmul(a, b, c, trans_b, beta)
    else:
        blas.matmul(a, b, c, trans_a, trans_b, alpha, beta)
