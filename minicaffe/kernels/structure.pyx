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
