"""ReLU (with Caffe's leaky ``negative_slope``) over flat buffers.

The work is cut into fixed-size chunks handed out statically, so each thread streams a contiguous
range and the compiler can vectorize the select in the inner loop. Every element is computed on its
own, so results do not depend on the thread count. Input and output may be the same buffer.
"""
from cython cimport floating
from cython.parallel cimport prange
from minicaffe.kernels.parallel cimport team_size

# Elements per work item: large enough to amortize the scheduling, small enough to balance threads.
cdef Py_ssize_t CHUNK = 16384


cdef inline void _relu_forward_chunk(const floating* x, floating* y, Py_ssize_t n,
                                     floating slope) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating v
    if slope == 0:
        # ``v <= 0`` is false for NaN, so a NaN passes through and divergence stays visible.
        for i in range(n):
            v = x[i]
            y[i] = 0 if v <= 0 else v
    else:
        for i in range(n):
            v = x[i]
            y[i] = v * slope if v <= 0 else v


cdef inline void _relu_backward_chunk(const floating* x, const floating* dy, floating* dx,
                                      Py_ssize_t n, floating slope) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = dy[i] if x[i] > 0 else dy[i] * slope


def relu_forward(const floating[::1] x, floating[::1] y, double negative_slope, int num_threads):
    """y = x where x > 0, else negative_slope * x. ``y`` may be ``x`` (in-place layer)."""
    cdef Py_ssize_t n = x.shape[0], chunks = (n + CHUNK - 1) // CHUNK, c, start
    cdef floating slope = <floating>negative_slope
    if y.shape[0] != n:
        raise ValueError("relu_forward: x and y differ in size")
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            start = c * CHUNK
            _relu_forward_chunk(&x[start], &y[start], min(CHUNK, n - start), slope)


def relu_backward(const floating[::1] x, const floating[::1] dy, floating[::1] dx,
                  double negative_slope, int num_threads):
    """dx = dy where x > 0, else negative_slope * dy.

    ``x`` is the bottom data. For an in-place layer it is the top data, which has the same sign as
    the input whenever negative_slope >= 0, so the mask is unchanged (Caffe relies on this too).
    """
    cdef Py_ssize_t n = x.shape[0], chunks = (n + CHUNK - 1) // CHUNK, c, start
    cdef floating slope = <floating>negative_slope
    if dy.shape[0] != n or dx.shape[0] != n:
        raise ValueError("relu_backward: x, dy and dx differ in size")
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            start = c * CHUNK
            _relu_backward_chunk(&x[start], &dy[start], &dx[start], min(CHUNK, n - start), slope)
