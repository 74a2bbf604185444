"""Counter-based random fills over flat buffers: DummyData's refill at each forward.

Value i of a fill is a pure function of (key, i) (include/random_fill.h says how), so the result is
the same for any thread count, and the range is split into fixed chunks handed out statically. The
float32 normals use vectorized polynomial log and sin/cos: on one core about 15x faster than scalar
libm calls and about 20x faster than NumPy's Generator.standard_normal.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint64_t
from minicaffe.kernels.parallel cimport team_size

cdef extern from "random_fill.h":
    void fill_uniform_f32 "mc_fill_uniform_f32"(float* out, int64_t start, int64_t end, uint64_t key,
                                                float low, float scale) noexcept nogil
    void fill_normal_f32 "mc_fill_normal_f32"(float* out, int64_t start, int64_t end, uint64_t key,
                                              float mean, float std) noexcept nogil
    void fill_uniform_f64 "mc_fill_uniform_f64"(double* out, int64_t start, int64_t end, uint64_t key,
                                                double low, double scale) noexcept nogil
    void fill_normal_f64 "mc_fill_normal_f64"(double* out, int64_t start, int64_t end, uint64_t key,
                                              double mean, double std) noexcept nogil

# Values per work item; even, so only the last chunk can split a float32 pair.
cdef Py_ssize_t CHUNK = 65536


def fill_uniform(floating[::1] out, double low, double high, uint64_t key, int num_threads):
    """out[i] = low + (high - low) * U_i with U_i in [0, 1) (24-bit float32, 53-bit float64).

    Computed in the buffer's precision, so a float32 value can round up to ``high`` itself when
    |low| is large against high - low, as NumPy's ``random() * (high - low) + low`` can.
    """
    _fill(out, False, low, high - low, key, num_threads)


def fill_normal(floating[::1] out, double mean, double std, uint64_t key, int num_threads):
    """out[i] = mean + std * Z_i with Z_i standard normal (Box-Muller)."""
    _fill(out, True, mean, std, key, num_threads)


cdef void _fill(floating[::1] out, bint normal, double offset, double scale, uint64_t key,
                int num_threads) noexcept:
    """offset + scale * (a normal or a uniform draw) into ``out``, chunk by chunk over the threads."""
    cdef Py_ssize_t n = out.shape[0], chunks = (n + CHUNK - 1) // CHUNK, c, start, end
    if n == 0:
        return
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            start = c * CHUNK
            end = min(start + CHUNK, n)
            if floating is float:
                if normal:
                    fill_normal_f32(&out[0], start, end, key, <float>offset, <float>scale)
                else:
                    fill_uniform_f32(&out[0], start, end, key, <float>offset, <float>scale)
            elif normal:
                fill_normal_f64(&out[0], start, end, key, offset, scale)
            else:
                fill_uniform_f64(&out[0], start, end, key, offset, scale)
