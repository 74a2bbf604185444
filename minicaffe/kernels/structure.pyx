"""Embedding table lookups (the Embed layer): gather weight rows by index, and scatter-add back; and
the Eltwise SUM kernels, alone and fused with a ReLU and a Split (sections below).

Indices arrive as floating-point values (blobs hold floats), so they are validated first: each must
be a whole number in [0, rows). Gathering splits the rows across threads; the scatter-add splits the
columns, so that no two threads write the same element and every sum runs in index order, giving the
same result for any thread count.
"""
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.stdlib cimport free, malloc
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


cdef inline void _masked_copies(const floating* total, const floating* y, floating* dy, floating* dx, floating a,
                                floating* other, floating b, floating slope, Py_ssize_t n) noexcept nogil:
    """g = total where y > 0, else total * slope (ReLU's gradient; false for a NaN y); dy = g,
    dx = a * g and, unless other is NULL, other = b * g, over n elements. total may be dy."""
    cdef Py_ssize_t i
    cdef floating g
    if other == NULL:
        for i in range(n):
            g = total[i] if y[i] > 0 else total[i] * slope
            dy[i] = g
            dx[i] = a * g
    else:
        for i in range(n):
            g = total[i] if y[i] > 0 else total[i] * slope
            dy[i] = g
            dx[i] = a * g
            other[i] = b * g


def scaled_copies(floating[::1] dy, floating[::1] dx not None, double coeff, floating[::1] other_dx,
                  double other_coeff, int num_threads, const floating[::1] relu_output=None,
                  double negative_slope=0):
    """dx = coeff * dy and, unless other_dx is None, other_dx = other_coeff * dy: Eltwise SUM's
    backward for two bottoms in one read of dy.

    With relu_output (the y of a ReLU in place on the Eltwise's top), dy is first replaced by ReLU's
    gradient, dy where y > 0 else negative_slope * dy, written back to dy as the ReLU's own backward
    would, and the copies are made from it.
    """
    cdef Py_ssize_t n = dy.shape[0], chunks = (n + ELTWISE_CHUNK - 1) // ELTWISE_CHUNK, c, i, start
    if dx.shape[0] != n or (other_dx is not None and other_dx.shape[0] != n) or \
            (relu_output is not None and relu_output.shape[0] != n):
        raise ValueError("scaled_copies: dy, the dx arrays and relu_output differ in size")
    if n == 0:
        return
    cdef floating a = <floating>coeff, b = <floating>other_coeff, slope = <floating>negative_slope
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
            else:
                start = c * ELTWISE_CHUNK
                _masked_copies(&dy[start], y + start, &dy[start], &dx[start], a,
                               second + start if second != NULL else NULL, b, slope,
                               min(ELTWISE_CHUNK, n - start))


# -- Eltwise SUM -> ReLU -> Split backward ---------------------------------------------------------
# A block of SUM_BLOCK elements is summed into a per-thread buffer, then masked and copied out: the
# sums stay in L1 between the two loops, and each loop has few enough arrays that gcc vectorizes it
# (one loop over all six it does not). The three outputs are written with non-temporal stores where
# the CPU has them: each then costs one write to memory instead of a fill and a write, and at ResNet's
# sizes (3-26 MB each) they would mostly have left the cache before the next layer reads them.

cdef Py_ssize_t SUM_BLOCK = 2048

cdef extern from *:
    """
    #if defined(__AVX512F__)
    #include <immintrin.h>
    #define MC_STREAMING_STORES 1
    /* _masked_copies over the first n - n % 16 elements, with streaming stores; dy, dx and other
       64-byte aligned. */
    static void mc_masked_copies_streaming_f(const float* total, const float* y, float* dy, float* dx, float a,
                                             float* other, float b, float slope, ptrdiff_t n) {
        const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b), vs = _mm512_set1_ps(slope),
                     zero = _mm512_setzero_ps();
        ptrdiff_t i;
        for (i = 0; i + 16 <= n; i += 16) {
            __m512 t = _mm512_loadu_ps(total + i);
            __mmask16 positive = _mm512_cmp_ps_mask(_mm512_loadu_ps(y + i), zero, _CMP_GT_OQ);
            __m512 g = _mm512_mask_blend_ps(positive, _mm512_mul_ps(t, vs), t);
            _mm512_stream_ps(dy + i, g);
            _mm512_stream_ps(dx + i, _mm512_mul_ps(va, g));
            if (other)
                _mm512_stream_ps(other + i, _mm512_mul_ps(vb, g));
        }
        _mm_sfence();
    }
    #else
    #define MC_STREAMING_STORES 0
    #define mc_masked_copies_streaming_f(...) ((void)0)   /* not called: no streaming stores */
    #endif
    """
    bint MC_STREAMING_STORES
    void mc_masked_copies_streaming_f(const float* total, const float* y, float* dy, float* dx, float a,
                                      float* other, float b, float slope, Py_ssize_t n) nogil


cdef inline void _sum_block(const floating** parts, Py_ssize_t count, floating* total, Py_ssize_t start,
                            Py_ssize_t stop) noexcept nogil:
    """total[i - start] = parts[0][i] + parts[1][i] + ... for i in [start, stop), added in order, as
    SplitLayer.backward adds them."""
    cdef const floating* p = parts[0] + start
    cdef const floating* q
    cdef Py_ssize_t i, k, n = stop - start
    if count == 1:
        for i in range(n):
            total[i] = p[i]
        return
    q = parts[1] + start
    for i in range(n):
        total[i] = p[i] + q[i]
    for k in range(2, count):
        q = parts[k] + start
        for i in range(n):
            total[i] = total[i] + q[i]


cdef inline void _masked_copies_block(const floating* total, const floating* y, floating* dy, floating* dx,
                                      floating a, floating* other, floating b, floating slope, Py_ssize_t n,
                                      bint stream) noexcept nogil:
    """_masked_copies, with streaming stores from the first 64-byte boundary of dy on when stream."""
    cdef Py_ssize_t head, body
    if floating is double or not stream:
        _masked_copies(total, y, dy, dx, a, other, b, slope, n)
        return
    head = min(<Py_ssize_t>(((64 - (<size_t>dy & 63)) & 63) // sizeof(float)), n)
    body = (n - head) // 16 * 16
    _masked_copies(total, y, dy, dx, a, other, b, slope, head)
    mc_masked_copies_streaming_f(total + head, y + head, dy + head, dx + head, a,
                                 other + head if other != NULL else NULL, b, slope, body)
    head += body
    _masked_copies(total + head, y + head, dy + head, dx + head, a, other + head if other != NULL else NULL,
                   b, slope, n - head)


def summed_scaled_copies(list summands, floating[::1] dy, const floating[::1] relu_output, floating[::1] dx not None,
                         double coeff, floating[::1] other_dx, double other_coeff, int num_threads,
                         double negative_slope=0):
    """The backward of Eltwise SUM -> ReLU in place -> Split in one pass: dy = the sum of the
    ``summands`` (the Split's tops' diffs, added in order as the Split adds them), then ReLU's
    gradient from relu_output, written to dy and, scaled, to dx and other_dx (None for one bottom),
    as ``scaled_copies``. The summands must not be dy, dx or other_dx."""
    cdef Py_ssize_t n = dy.shape[0], count = len(summands), blocks = (n + SUM_BLOCK - 1) // SUM_BLOCK, c, k
    if count == 0:
        raise ValueError("summed_scaled_copies: no summands")
    if relu_output.shape[0] != n or dx.shape[0] != n or (other_dx is not None and other_dx.shape[0] != n):
        raise ValueError("summed_scaled_copies: the diffs and relu_output differ in size")
    cdef floating[::1] summand
    for summand in summands:
        if summand.shape[0] != n:
            raise ValueError("summed_scaled_copies: the diffs and relu_output differ in size")
    if n == 0:
        return
    cdef floating a = <floating>coeff, b = <floating>other_coeff, slope = <floating>negative_slope
    cdef floating* other = &other_dx[0] if other_dx is not None else NULL
    # Streaming needs the outputs aligned alike: one head loop aligns them all.
    cdef bint stream = MC_STREAMING_STORES and not (<size_t>&dx[0] - <size_t>&dy[0]) & 63 and \
        (other == NULL or not (<size_t>other - <size_t>&dy[0]) & 63)
    cdef int teams = team_size(blocks, num_threads), team
    cdef Py_ssize_t start, stop
    # The list keeps the summands alive while the kernel reads them through these pointers.
    cdef const floating** parts = <const floating**>malloc(count * sizeof(floating*))
    cdef floating* totals = <floating*>malloc(teams * SUM_BLOCK * sizeof(floating))
    if parts == NULL or totals == NULL:
        free(parts)
        free(totals)
        raise MemoryError()
    try:
        for k in range(count):
            summand = summands[k]
            parts[k] = &summand[0]
        with nogil:
            for c in prange(blocks, schedule="static", num_threads=teams):
                team = threadid()
                start = c * SUM_BLOCK
                stop = min(start + SUM_BLOCK, n)
                _sum_block(parts, count, totals + team * SUM_BLOCK, start, stop)
                _masked_copies_block(totals + team * SUM_BLOCK, &relu_output[start], &dy[start], &dx[start], a,
                                     other + start if other != NULL else NULL, b, slope, stop - start, stream)
    finally:
        free(parts)
        free(totals)
