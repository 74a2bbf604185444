"""Matrix products for the layers: single-threaded BLAS calls on blocks of C, one block per thread.

``matmul`` computes C = alpha * op(A) @ op(B) + beta * C for row-major float32 or float64 matrices
whose rows are contiguous (row-strided views are fine). It splits the larger of C's two dimensions
into one block per OpenMP thread, each a single-threaded GEMM, so every element of C is computed by
exactly one call: the result does not depend on timing, and with a fixed thread count it is
bit-identical from run to run.
"""
from cython cimport floating
from cython.parallel cimport prange

from minicaffe.kernels.blas cimport gemm
from minicaffe.kernels.parallel import num_threads

cdef enum:
    # Below this many multiply-adds a second thread costs more to wake than it saves.
    MIN_WORK_PER_THREAD = 1 << 18
    # Block edges on multiples of the BLAS micro-kernel's width keep every block on the fast path.
    BLOCK_ALIGN = 16


cdef int _leading_dim(Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t row_stride, Py_ssize_t col_stride,
                      Py_ssize_t itemsize, str name) except -1:
    if cols > 1 and rows > 0 and col_stride != itemsize:
        raise ValueError(f"matmul: the rows of {name} must be contiguous")
    if rows <= 1:
        return max(cols, 1)
    if row_stride < cols * itemsize or row_stride % itemsize:
        raise ValueError(f"matmul: the rows of {name} overlap or are misaligned")
    return max(row_stride // itemsize, 1)


def matmul(const floating[:, :] a, const floating[:, :] b, floating[:, :] c, bint trans_a=False,
           bint trans_b=False, double alpha=1.0, double beta=0.0):
    """C = alpha * op(A) @ op(B) + beta * C, op being a transpose where ``trans_a``/``trans_b``."""
    cdef int m = c.shape[0], n = c.shape[1]
    cdef int k = a.shape[0] if trans_a else a.shape[1]
    cdef int a_rows = a.shape[1] if trans_a else a.shape[0]
    cdef int b_rows = b.shape[1] if trans_b else b.shape[0]
    cdef int b_cols = b.shape[0] if trans_b else b.shape[1]
    if a_rows != m or b_rows != k or b_cols != n:
        raise ValueError(f"matmul: op(A) is {a_rows}x{k}, op(B) is {b_rows}x{b_cols}, C is {m}x{n}")
    if m == 0 or n == 0:
        return
    cdef Py_ssize_t itemsize = sizeof(floating)
    cdef int lda = _leading_dim(a.shape[0], a.shape[1], a.strides[0], a.strides[1], itemsize, "A")
    cdef int ldb = _leading_dim(b.shape[0], b.shape[1], b.strides[0], b.strides[1], itemsize, "B")
    cdef int ldc = _leading_dim(c.shape[0], c.shape[1], c.strides[0], c.strides[1], itemsize, "C")
    cdef const floating* pa = &a[0, 0] if a.shape[0] * a.shape[1] > 0 else NULL
    cdef const floating* pb = &b[0, 0] if b.shape[0] * b.shape[1] > 0 else NULL
    cdef floating* pc = &c[0, 0]
    cdef floating alpha_ = <floating>alpha, beta_ = <floating>beta

    cdef bint split_rows = m >= n
    cdef int extent = m if split_rows else n
    cdef long work = <long>m * n * max(k, 1)
    cdef int threads = max(1, min(<int>num_threads(), <int>(work // MIN_WORK_PER_THREAD),
                                  (extent + BLOCK_ALIGN - 1) // BLOCK_ALIGN))
    cdef int block = (extent + threads - 1) // threads
    block = (block + BLOCK_ALIGN - 1) // BLOCK_ALIGN * BLOCK_ALIGN
    cdef int t, start, size
    if threads == 1:
        with nogil:
            gemm(trans_a, trans_b, m, n, k, alpha_, pa, lda, pb, ldb, beta_, pc, ldc)
        return
    with nogil:
        for t in prange(threads, num_threads=threads, schedule='static', chunksize=1):
            start = t * block
            size = min(block, extent - start)
            if size <= 0:
                pass
            elif split_rows:
                gemm(trans_a, trans_b, size, n, k, alpha_,
                     pa + (start if trans_a else <long>start * lda), lda, pb, ldb,
                     beta_, pc + <long>start * ldc, ldc)
            else:
                gemm(trans_a, trans_b, m, size, k, alpha_, pa, lda,
                     pb + (<long>start * ldb if trans_b else start), ldb,
                     beta_, pc + start, ldc)
