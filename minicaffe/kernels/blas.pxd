# Row-major GEMM over SciPy's BLAS, callable without the GIL from any kernel:
#     from minicaffe.kernels.blas cimport gemm
# The BLAS call itself is single-threaded (the thread policy pins it); callers parallelize around it.
from cython cimport floating
from scipy.linalg.cython_blas cimport sgemm, dgemm


cdef inline void gemm(bint trans_a, bint trans_b, int m, int n, int k, floating alpha,
                      const floating* a, int lda, const floating* b, int ldb, floating beta,
                      floating* c, int ldc) noexcept nogil:
    """C[m, n] = alpha * op(A) @ op(B) + beta * C, all row-major with leading dimensions lda, ldb, ldc.

    A row-major matrix is the column-major transpose, so this is the column-major call
    C^T = op(B)^T @ op(A)^T: operands swapped, dimensions m and n swapped.
    """
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*>b, &ldb, <float*>a, &lda, &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double*>b, &ldb, <double*>a, &lda, &beta, c, &ldc)
