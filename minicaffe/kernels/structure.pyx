"""Embedding table lookups (the Embed layer): gather weight rows by index, and scatter-add back.

Indices arrive as floating-point values (blobs hold floats), so they are validated first: each must
be a whole number in [0, rows). Gathering splits the rows across threads; the scatter-add splits the
columns, so that no two threads write the same element and every sum runs in index order, giving the
same result for any thread count.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memcpy
from minicaffe.kernels.parallel cimport team_size

# Columns a thread should own at least, to keep its stores off other threads' cache lines.
cdef Py_ssize_t MIN_COLUMNS_PER_THREAD = 16


cdef Py_ssize_t _first_invalid(const floating[::1] indices, Py_ssize_t rows) noexcept nogil:
    cdef Py_ssize_t n
    cdef floating value
    for n in range(indices.shape[0]):
        value = indices[n]
        # NaN fails both comparisons, so it never reaches the cast.
        if not (value >= 0 and value < rows) or <floating>(<Py_ssize_t>value) != value:
            return n
    return -1


def first_invalid_index(const floating[::1] indices, Py_ssize_t rows):
    """Position of the first index that is not a whole number in [0, rows), or -1 when all are."""
    cdef Py_ssize_t position
    with nogil:
        position = _first_invalid(indices, rows)
    return position


def embed_gather(const floating[::1] indices, const floating[:, ::1] weight, floating[:, ::1] top,
                 int num_threads):
    """top[n] = weight[indices[n]]; the indices must have passed ``first_invalid_index``."""
    cdef Py_ssize_t count = indices.shape[0], width = weight.shape[1], n
    if top.shape[0] != count or top.shape[1] != width:
        raise ValueError("embed_gather: top must be (number of indices, weight columns)")
    if count == 0 or width == 0:
        return
    with nogil:
        for n in prange(count, schedule="static", num_threads=team_size(count, num_threads)):
            memcpy(&top[n, 0], &weight[<Py_ssize_t>indices[n], 0], width * sizeof(floating))


def embed_scatter_add(const floating[::1] indices, const floating[:, ::1] top_diff,
                      floating[:, ::1] weight_diff, int num_threads):
    """weight_diff[indices[n]] += top_diff[n] for every n, in order of n; indices already validated."""
    cdef Py_ssize_t count = indices.shape[0], width = weight_diff.shape[1]
    if top_diff.shape[0] != count or top_diff.shape[1] != width:
        raise ValueError("embed_scatter_add: top_diff must be (number of indices, weight columns)")
    if count == 0 or width == 0:
        return
    cdef int teams = team_size(max(width // MIN_COLUMNS_PER_THREAD, 1), num_threads)
    cdef Py_ssize_t team, n, j, row, first, last
    with nogil:
        for team in prange(teams, schedule="static", num_threads=teams):
            first = width * team // teams
            last = width * (team + 1) // teams
            for n in range(count):
                row = <Py_ssize_t>indices[n]
                for j in range(first, last):
                    weight_diff[row, j] += top_diff[n, j]


# -- Eltwise SUM ------------------------------------------------------------------------------------
# Streams split into chunks of ELTWISE_CHUNK elements handed out statically; every element is
# computed on its own, so results do not depend on the thread count.

cdef Py_ssize_t ELTWISE_CHUNK = 16384


cdef inline floating _relu(floating v, floating negative_slope) noexcept nogil:
    # The rule of activation.pyx's relu_forward, so a fused Eltwise -> ReLU gives the same bits.
    if negative_slope == 0:
        return 0 if v <= 0 else v
    return v * negative_slope if v <= 0 else v


def weighted_sum(const floating[::1] x, double coeff_x, const floating[::1] z, double coeff_z,
                 floating[::1] y, int num_threads, bint relu=False, double negative_slope=0):
    """y = coeff_x * x + coeff_z * z, element by element; y may be x or z. With relu, y then goes
    through ReLU (y where y > 0, else negative_slope * y): an Eltwise SUM and the ReLU in place on its
    top, in one pass."""
    cdef Py_ssize_t n = x.shape[0], chunks = (n + ELTWISE_CHUNK - 1) // ELTWISE_CHUNK, c, i
    if z.shape[0] != n or y.shape[0] != n:
        raise ValueError("weighted_sum: x, z and y differ in size")
    cdef floating a = <floating>coeff_x, b = <floating>coeff_z, slope = <floating>negative_slope
    cdef bint plain = a == 1 and b == 1
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            if plain and not relu:
                for i in range(c * ELTWISE_CHUNK, min(c * ELTWISE_CHUNK + ELTWISE_CHUNK, n)):
                    y[i] = x[i] + z[i]
            elif plain:
                for i in range(c * ELTWISE_CHUNK, min(c * ELTWISE_CHUNK + ELTWISE_CHUNK, n)):
                    y[i] = _relu(x[i] + z[i], slope)
            elif not relu:
                for i in range(c * ELTWISE_CHUNK, min(c * ELTWISE_CHUNK + ELTWISE_CHUNK, n)):
                    y[i] = a * x[i] + b * z[i]
            else:
                for i in range(c * ELTWISE_CHUNK, min(c * ELTWISE_CHUNK + ELTWISE_CHUNK, n)):
                    y[i] = _relu(a * x[i] + b * z[i], slope)


def scaled_copies(floating[::1] dy, floating[::1] dx not None, double coeff, floating[::1] other_dx,
                  double other_coeff, int num_threads, const floating[::1] relu_output=None,
                  double negative_slope=0):
    """dx = coeff * dy and, unless other_dx is None, other_dx = other_coeff * dy: Eltwise SUM's
    backward for two bottoms in one read of dy.

    With relu_output (the y of a ReLU in place on the Eltwise's top), dy is first replaced by ReLU's
    gradient, dy where y > 0 else negative_slope * dy, written back to dy as the ReLU's own backward
    would, and the copies are made from it.
    """
    cdef Py_ssize_t n = dy.shape[0], chunks = (n + ELTWISE_CHUNK - 1) // ELTWISE_CHUNK, c, i
    if dx.shape[0] != n or (other_dx is not None and other_dx.shape[0] != n) or \
            (relu_output is not None and relu_output.shape[0] != n):
        raise ValueError("scaled_copies: dy, the dx arrays and relu_output differ in size")
    if n == 0:
        return
    cdef floating a = <floating>coeff, b = <floating>other_coeff, slope = <floating>negative_slope, g
    cdef floating* second = &other_dx[0] if other_dx is not None else NULL
    cdef const floating* y = &relu_output[0] if relu_output is not None else NULL
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            if y == NULL and second == NULL:
                for i in range(c * ELTWISE_CHUNK, min(c * ELTWISE_CHUNK + ELTWISE_CHUNK, n)):
                    dx[i] = a * dy[i]
            elif y == NULL:
                for i in range(c * ELTWISE_CHUNK, min(c * ELTWISE_CHUNK + ELTWISE_CHUNK, n)):
                    dx[i] = a * dy[i]
                    second[i] = b * dy[i]
            elif second == NULL:
                for i in range(c * ELTWISE_CHUNK, min(c * ELTWISE_CHUNK + ELTWISE_CHUNK, n)):
                    g = dy[i] if y[i] > 0 else dy[i] * slope
                    dy[i] = g
                    dx[i] = a * g
            else:
                for i in range(c * ELTWISE_CHUNK, min(c * ELTWISE_CHUNK + ELTWISE_CHUNK, n)):
                    g = dy[i] if y[i] > 0 else dy[i] * slope
                    dy[i] = g
                    dx[i] = a * g
                    second[i] = b * g
