# Single-threaded DFP16 block kernels for other Cython code:  from minicaffe.kernels.dfp16 cimport ...
# A DFP16 tensor is int16 q with one exponent e: x ≈ q * 2^e. Callers split big tensors into blocks
# (and threads) themselves; the Python-level functions in dfp16.pyx do exactly that.
from libc.stdint cimport int16_t, uint64_t


cdef struct QuantCounts:
    float max_abs            # max|x| in the block (meaningless when nonfinite > 0)
    Py_ssize_t nonfinite     # inf and NaN elements (their q is meaningless)
    Py_ssize_t flushed       # nonzero x that became q == 0
    Py_ssize_t clipped       # |x * 2^-e| rounded beyond 32767, saturated to ±32767


cdef QuantCounts scan_block(const float* x, Py_ssize_t n) noexcept nogil
cdef int exponent_for_max_abs(float max_abs, int headroom) noexcept nogil
cdef QuantCounts quantize_block(const float* x, Py_ssize_t n, int exponent,
                                int16_t* q) noexcept nogil
cdef QuantCounts quantize_block_stochastic(const float* x, Py_ssize_t n, int exponent, uint64_t seed,
                                           uint64_t first_index, int16_t* q) noexcept nogil
cdef void dequantize_block(const int16_t* q, Py_ssize_t n, int exponent, float* out) noexcept nogil
