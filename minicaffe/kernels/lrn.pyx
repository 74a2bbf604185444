"""Local response normalization with Caffe's semantics, across channels and within a channel.

Both regions compute y = x * scale^-beta from a window sum of squares:

* ACROSS_CHANNELS: scale[n, c, p] = k + alpha / size * sum of x[n, c', p]^2 for c' within
  (size - 1) / 2 of c, channels outside the blob counting as zeros;
* WITHIN_CHANNEL: scale = 1 + alpha / size^2 * sum of x^2 over the size x size square centred on
  each pixel, zero padded. Caffe builds this from AVE pooling (pad (size - 1) / 2, stride 1), whose
  windows then all lie inside the padded image and so all divide by size^2; like Caffe, it has no k.

The backward pass of both is dx = dy * scale^-beta - 2 * alpha' * beta * x * (the same window sum
of dy * y / scale), where alpha' is alpha / size or alpha / size^2: every window is symmetric, so
the pixels a pixel's scale depends on are the pixels whose scales depend on it.

Window sums slide: each step adds the entering term and subtracts the leaving one, so the cost does
not grow with the size. The sums are kept in double, where the adding and subtracting cannot drift.
Across channels a work item is one image and a block of BLOCK pixel positions, and the inner loops
run over those contiguous positions; within a channel a work item is one plane.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdlib cimport free, malloc
from minicaffe.kernels.parallel cimport team_size

# Pixel positions per across-channel work item: the running sums stay in L1.
cdef enum:
    BLOCK = 512

cdef extern from *:
    """
    /* out = v * s^-beta over a row. The compiler does not vectorize sqrt here (it must keep errno
       for negative arguments), so the square-root forms go through vector intrinsics where the
       build target has them. Vector and scalar sqrt and division are both correctly rounded, so
       every element gets the same value whichever path computes it. */
    #include <math.h>
    #if defined(__AVX512F__) || defined(__AVX__)
    #include <immintrin.h>
    #endif

    enum { LRN_POWER_075, LRN_POWER_05, LRN_POWER_1, LRN_POWER_ANY };

    #define LRN_SCALAR_NEG_POWER(T, SQRT, POW)                                             \
        static inline T lrn_neg_power_##T(T s, T beta, int kind) {                        \
            T r;                                                                           \
            switch (kind) {                                                                \
            case LRN_POWER_075: r = (T)1 / SQRT(s); return r * SQRT(r);                    \
            case LRN_POWER_05: return (T)1 / SQRT(s);                                      \
            case LRN_POWER_1: return (T)1 / s;                                             \
            default: return POW(s, -beta);                                                 \
            }                                                                              \
        }
    LRN_SCALAR_NEG_POWER(float, sqrtf, powf)
    LRN_SCALAR_NEG_POWER(double, sqrt, pow)

    #if defined(__AVX512F__)
    #define LRN_VECTOR_LOOP(T, W, V, SUFFIX)                                               \
        for (; j + W <= n; j += W) {                                                       \
            V sv = _mm512_loadu_##SUFFIX(s + j), one = _mm512_set1_##SUFFIX(1), p;         \
            if (kind == LRN_POWER_075) {                                                   \
                V r = _mm512_div_##SUFFIX(one, _mm512_sqrt_##SUFFIX(sv));                  \
                p = _mm512_mul_##SUFFIX(r, _mm512_sqrt_##SUFFIX(r));                       \
            } else if (kind == LRN_POWER_05) {                                             \
                p = _mm512_div_##SUFFIX(one, _mm512_sqrt_##SUFFIX(sv));                    \
            } else {                                                                       \
                p = _mm512_div_##SUFFIX(one, sv);                                          \
            }                                                                              \
            _mm512_storeu_##SUFFIX(out + j, _mm512_mul_##SUFFIX(_mm512_loadu_##SUFFIX(v + j), p)); \
        }
    #define LRN_VECTOR_FLOAT LRN_VECTOR_LOOP(float, 16, __m512, ps)
    #define LRN_VECTOR_DOUBLE LRN_VECTOR_LOOP(double, 8, __m512d, pd)
    #elif defined(__AVX__)
    #define LRN_VECTOR_LOOP(T, W, V, SUFFIX)                                               \
        for (; j + W <= n; j += W) {                                                       \
            V sv = _mm256_loadu_##SUFFIX(s + j), one = _mm256_set1_##SUFFIX(1), p;         \
            if (kind == LRN_POWER_075) {                                                   \
                V r = _mm256_div_##SUFFIX(one, _mm256_sqrt_##SUFFIX(sv));                  \
                p = _mm256_mul_##SUFFIX(r, _mm256_sqrt_##SUFFIX(r));                       \
            } else if (kind == LRN_POWER_05) {                                             \
                p = _mm256_div_##SUFFIX(one, _mm256_sqrt_##SUFFIX(sv));                    \
            } else {                                                                       \
                p = _mm256_div_##SUFFIX(one, sv);                                          \
            }                                                                              \
            _mm256_storeu_##SUFFIX(out + j, _mm256_mul_##SUFFIX(_mm256_loadu_##SUFFIX(v + j), p)); \
        }
    #define LRN_VECTOR_FLOAT LRN_VECTOR_LOOP(float, 8, __m256, ps)
    #define LRN_VECTOR_DOUBLE LRN_VECTOR_LOOP(double, 4, __m256d, pd)
    #else
    #define LRN_VECTOR_FLOAT
    #define LRN_VECTOR_DOUBLE
    #endif

    #define LRN_MUL_NEG_POWER(T, VECTOR_LOOP)                                              \
        static void lrn_mul_neg_power_##T(const T* v, const T* s, T* out, Py_ssize_t n,    \
                                          double beta, int kind) {                         \
            Py_ssize_t j = 0;                                                              \
            if (kind != LRN_POWER_ANY) {                                                   \
                VECTOR_LOOP                                                                \
            }                                                                              \
            for (; j < n; j++)                                                             \
                out[j] = v[j] * lrn_neg_power_##T(s[j], (T)beta, kind);                    \
        }
    LRN_MUL_NEG_POWER(float, LRN_VECTOR_FLOAT)
    LRN_MUL_NEG_POWER(double, LRN_VECTOR_DOUBLE)
    """
    # How s^-beta is computed: the betas nets use have exact forms much cheaper than pow().
    enum:
        LRN_POWER_075
        LRN_POWER_05
        LRN_POWER_1
        LRN_POWER_ANY
    void lrn_mul_neg_power_float(const float* v, const float* s, float* out, Py_ssize_t n, double beta,
                                 int kind) noexcept nogil
    void lrn_mul_neg_power_double(const double* v, const double* s, double* out, Py_ssize_t n,
                                  double beta, int kind) noexcept nogil


cdef int _power_kind(double beta):
    if beta == 0.75:
        return LRN_POWER_075
    if beta == 0.5:
        return LRN_POWER_05
    if beta == 1.0:
        return LRN_POWER_1
    return LRN_POWER_ANY


cdef inline void _mul_neg_power(const floating* v, const floating* s, floating* out, Py_ssize_t n,
                                double beta, int kind) noexcept nogil:
    """out = v * s^-beta; out may be v."""
    if floating is float:
        lrn_mul_neg_power_float(v, s, out, n, beta, kind)
    else:
        lrn_mul_neg_power_double(v, s, out, n, beta, kind)


cdef struct Across:
    Py_ssize_t channels, plane    # channels, and the pixels of one channel (height * width)
    int half                      # (size - 1) / 2
    double k, alpha_over_size, beta
    int power


# -- ACROSS_CHANNELS -------------------------------------------------------------------------------

cdef void _across_forward_block(const floating* x, floating* y, floating* scale, const Across* a,
                                Py_ssize_t count) noexcept nogil:
    """One image's block of ``count`` pixel positions; the pointers are at the block's first pixel."""
    cdef double sums[BLOCK]
    cdef Py_ssize_t c, j, offset
    cdef const floating* entering
    cdef const floating* leaving
    for j in range(count):
        sums[j] = 0
    for c in range(min(<Py_ssize_t>a.half, a.channels)):
        entering = x + c * a.plane
        for j in range(count):
            sums[j] += <double>entering[j] * entering[j]
    for c in range(a.channels):
        if c + a.half < a.channels:
            entering = x + (c + a.half) * a.plane
            for j in range(count):
                sums[j] += <double>entering[j] * entering[j]
        if c - a.half - 1 >= 0:
            leaving = x + (c - a.half - 1) * a.plane
            for j in range(count):
                sums[j] -= <double>leaving[j] * leaving[j]
        offset = c * a.plane
        for j in range(count):
            scale[offset + j] = <floating>(a.k + a.alpha_over_size * sums[j])
        _mul_neg_power(x + offset, scale + offset, y + offset, count, a.beta, a.power)


cdef inline double _ratio(const floating* dy, const floating* y, const floating* scale,
                          Py_ssize_t i) noexcept nogil:
    return <double>dy[i] * y[i] / scale[i]


cdef void _across_backward_block(const floating* x, const floating* y, const floating* scale,
                                 const floating* dy, floating* dx, const Across* a, Py_ssize_t count,
                                 double* ring) noexcept nogil:
    """``ring`` holds the ratios dy * y / scale of the last ``size`` channels to enter the window
    (channel c in row c % size), so each is computed once though it enters and leaves."""
    cdef double sums[BLOCK]
    cdef double coefficient = 2 * a.alpha_over_size * a.beta
    cdef Py_ssize_t c, j, offset, size = 2 * a.half + 1
    cdef double* row
    for j in range(count):
        sums[j] = 0
    for c in range(min(<Py_ssize_t>a.half, a.channels)):
        offset = c * a.plane
        row = ring + (c % size) * BLOCK
        for j in range(count):
            row[j] = _ratio(dy, y, scale, offset + j)
            sums[j] += row[j]
    for c in range(a.channels):
        # The channel leaving the window and the one entering share a ring row: leave first.
        if c - a.half - 1 >= 0:
            row = ring + ((c - a.half - 1) % size) * BLOCK
            for j in range(count):
                sums[j] -= row[j]
        if c + a.half < a.channels:
            offset = (c + a.half) * a.plane
            row = ring + ((c + a.half) % size) * BLOCK
            for j in range(count):
                row[j] = _ratio(dy, y, scale, offset + j)
                sums[j] += row[j]
        offset = c * a.plane
        _mul_neg_power(dy + offset, scale + offset, dx + offset, count, a.beta, a.power)
        for j in range(count):
            dx[offset + j] = <floating>(dx[offset + j] - coefficient * x[offset + j] * sums[j])


cdef Across _across(tuple shape, int size, double alpha, double beta, double k) except *:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"lrn: local_size must be odd and positive, got {size}")
    cdef Across a
    a.channels = shape[1]
    a.plane = <Py_ssize_t>shape[2] * shape[3]
    a.half = (size - 1) // 2
    a.k, a.alpha_over_size, a.beta = k, alpha / size, beta
    a.power = _power_kind(beta)
    return a


cdef tuple _dims(const Py_ssize_t* shape):
    return (shape[0], shape[1], shape[2], shape[3])


def lrn_across_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] y,
                       floating[:, :, :, ::1] scale, int size, double alpha, double beta, double k,
                       int num_threads):
    """y = x * scale^-beta with scale = k + alpha / size * (sum of squares over size channels).

    Writes ``scale`` for the backward pass. ``y`` must not be ``x``: the window reads channels
    behind the one being written.
    """
    shape = _dims(x.shape)
    if _dims(y.shape) != shape or _dims(scale.shape) != shape:
        raise ValueError("lrn_across_forward: x, y and scale differ in shape")
    cdef Across a = _across(shape, size, alpha, beta, k)
    cdef Py_ssize_t blocks = (a.plane + BLOCK - 1) // BLOCK, items = shape[0] * blocks, item, n, j0
    if items == 0 or a.channels == 0:
        return
    with nogil:
        for item in prange(items, schedule="static", num_threads=team_size(items, num_threads)):
            n = item // blocks
            j0 = (item % blocks) * BLOCK
            _across_forward_block(&x[n, 0, 0, 0] + j0, &y[n, 0, 0, 0] + j0, &scale[n, 0, 0, 0] + j0,
                                  &a, min(<Py_ssize_t>BLOCK, a.plane - j0))


def lrn_across_backward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] y,
                        const floating[:, :, :, ::1] scale, const floating[:, :, :, ::1] dy,
                        floating[:, :, :, ::1] dx, int size, double alpha, double beta, double k,
                        int num_threads):
    """Gradient of lrn_across_forward given its x, y and scale (overwrites dx, which must not be dy)."""
    shape = _dims(x.shape)
    if (_dims(y.shape) != shape or _dims(scale.shape) != shape or _dims(dy.shape) != shape
            or _dims(dx.shape) != shape):
        raise ValueError("lrn_across_backward: x, y, scale, dy and dx differ in shape")
    cdef Across a = _across(shape, size, alpha, beta, k)
    cdef Py_ssize_t blocks = (a.plane + BLOCK - 1) // BLOCK, items = shape[0] * blocks, item, n, j0
    cdef double* ring = NULL
    cdef int failures = 0
    if items == 0 or a.channels == 0:
        return
    with nogil, parallel(num_threads=team_size(items, num_threads)):
        ring = <double*>malloc(<Py_ssize_t>size * BLOCK * sizeof(double))
        for item in prange(items, schedule="static"):
            if ring == NULL:
                failures += 1
            else:
                n = item // blocks
                j0 = (item % blocks) * BLOCK
                _across_backward_block(&x[n, 0, 0, 0] + j0, &y[n, 0, 0, 0] + j0, &scale[n, 0, 0, 0] + j0,
                                       &dy[n, 0, 0, 0] + j0, &dx[n, 0, 0, 0] + j0, &a,
                                       min(<Py_ssize_t>BLOCK, a.plane - j0), ring)
        free(ring)
    if failures:
        raise MemoryError("lrn_across_backward: no memory for the window's ratios")


# -- WITHIN_CHANNEL --------------------------------------------------------------------------------

cdef struct Within:
    int height, width, half
    double alpha_over_area, beta
    int power


cdef void _box_sums(double* values, double* row_sums, double* column_sums, const Within* g,
                    int h) noexcept nogil:
    """column_sums[w] = sum of values over the size x size window centred on (h, w), clipped to the
    plane, for every w of row h; call for h = 0, 1, ... in order (the window slides down).

    ``row_sums`` holds each row's horizontal window sums, filled in as rows enter the window.
    """
    cdef int w, row, width = g.width, half = g.half
    cdef double* sums_row
    if h == 0:
        for w in range(width):
            column_sums[w] = 0
        for row in range(min(half, g.height)):
            _row_window_sums(values + <Py_ssize_t>row * width, row_sums + <Py_ssize_t>row * width,
                             width, half)
            sums_row = row_sums + <Py_ssize_t>row * width
            for w in range(width):
                column_sums[w] += sums_row[w]
    row = h + half
    if row < g.height:
        _row_window_sums(values + <Py_ssize_t>row * width, row_sums + <Py_ssize_t>row * width, width, half)
        sums_row = row_sums + <Py_ssize_t>row * width
        for w in range(width):
            column_sums[w] += sums_row[w]
    row = h - half - 1
    if row >= 0:
        sums_row = row_sums + <Py_ssize_t>row * width
        for w in range(width):
            column_sums[w] -= sums_row[w]


cdef inline void _row_window_sums(const double* values, double* sums, int width, int half) noexcept nogil:
    cdef int w
    cdef double total = 0
    for w in range(min(half, width)):
        total += values[w]
    for w in range(width):
        if w + half < width:
            total += values[w + half]
        if w - half - 1 >= 0:
            total -= values[w - half - 1]
        sums[w] = total


cdef void _within_forward_plane(const floating* x, floating* y, floating* scale, const Within* g,
                                double* scratch) noexcept nogil:
    cdef Py_ssize_t size = <Py_ssize_t>g.height * g.width, i, offset
    cdef double* squares = scratch
    cdef double* row_sums = scratch + size
    cdef double* column_sums = scratch + 2 * size
    cdef int h, w
    for i in range(size):
        squares[i] = <double>x[i] * x[i]
    for h in range(g.height):
        _box_sums(squares, row_sums, column_sums, g, h)
        offset = <Py_ssize_t>h * g.width
        for w in range(g.width):
            scale[offset + w] = <floating>(1.0 + g.alpha_over_area * column_sums[w])
        _mul_neg_power(x + offset, scale + offset, y + offset, g.width, g.beta, g.power)


cdef void _within_backward_plane(const floating* x, const floating* y, const floating* scale,
                                 const floating* dy, floating* dx, const Within* g,
                                 double* scratch) noexcept nogil:
    cdef Py_ssize_t size = <Py_ssize_t>g.height * g.width, i, offset
    cdef double* ratios = scratch
    cdef double* row_sums = scratch + size
    cdef double* column_sums = scratch + 2 * size
    cdef double coefficient = 2 * g.alpha_over_area * g.beta
    cdef int h, w
    for i in range(size):
        ratios[i] = _ratio(dy, y, scale, i)
    for h in range(g.height):
        _box_sums(ratios, row_sums, column_sums, g, h)
        offset = <Py_ssize_t>h * g.width
        _mul_neg_power(dy + offset, scale + offset, dx + offset, g.width, g.beta, g.power)
        for w in range(g.width):
            dx[offset + w] = <floating>(dx[offset + w] - coefficient * x[offset + w] * column_sums[w])


cdef tuple _planes(const Py_ssize_t* shape):
    return (shape[0], shape[1], shape[2])


cdef Within _within(const Py_ssize_t* shape, int size, double alpha, double beta) except *:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"lrn: local_size must be odd and positive, got {size}")
    cdef Within g
    g.height, g.width, g.half = shape[1], shape[2], (size - 1) // 2
    g.alpha_over_area, g.beta = alpha / (<double>size * size), beta
    g.power = _power_kind(beta)
    return g


def lrn_within_forward(const floating[:, :, ::1] x, floating[:, :, ::1] y, floating[:, :, ::1] scale,
                       int size, double alpha, double beta, int num_threads):
    """Over planes (N * C, H, W): y = x * (1 + alpha / size^2 * box sum of x^2)^-beta.

    Writes ``scale`` (the base of the power) for the backward pass. ``y`` may be ``x``.
    """
    shape = _planes(x.shape)
    if _planes(y.shape) != shape or _planes(scale.shape) != shape:
        raise ValueError("lrn_within_forward: x, y and scale differ in shape")
    cdef Within g = _within(&x.shape[0], size, alpha, beta)
    cdef Py_ssize_t planes = x.shape[0], p, scratch_size = 2 * <Py_ssize_t>g.height * g.width + g.width
    cdef double* scratch = NULL
    cdef int failures = 0
    if planes == 0 or g.height == 0 or g.width == 0:
        return
    with nogil, parallel(num_threads=team_size(planes, num_threads)):
        scratch = <double*>malloc(scratch_size * sizeof(double))
        for p in prange(planes, schedule="static"):
            if scratch == NULL:
                failures += 1
            else:
                _within_forward_plane(&x[p, 0, 0], &y[p, 0, 0], &scale[p, 0, 0], &g, scratch)
        free(scratch)
    if failures:
        raise MemoryError("lrn_within_forward: no memory for the window sums")


def lrn_within_backward(const floating[:, :, ::1] x, const floating[:, :, ::1] y,
                        const floating[:, :, ::1] scale, const floating[:, :, ::1] dy,
                        floating[:, :, ::1] dx, int size, double alpha, double beta, int num_threads):
    """Gradient of lrn_within_forward given its x, y and scale (overwrites dx; dx may be dy)."""
    shape = _planes(x.shape)
    if _planes(y.shape) != shape or _planes(scale.shape) != shape or _planes(dy.shape) != shape \
            or _planes(dx.shape) != shape:
        raise ValueError("lrn_within_backward: x, y, scale, dy and dx differ in shape")
    cdef Within g = _within(&x.shape[0], size, alpha, beta)
    cdef Py_ssize_t planes = x.shape[0], p, scratch_size = 2 * <Py_ssize_t>g.height * g.width + g.width
    cdef double* scratch = NULL
    cdef int failures = 0
    if planes == 0 or g.height == 0 or g.width == 0:
        return
    with nogil, parallel(num_threads=team_size(planes, num_threads)):
        scratch = <double*>malloc(scratch_size * sizeof(double))
        for p in prange(planes, schedule="static"):
            if scratch == NULL:
                failures += 1
            else:
                _within_backward_plane(&x[p, 0, 0], &y[p, 0, 0], &scale[p, 0, 0], &dy[p, 0, 0],
                                       &dx[p, 0, 0], &g, scratch)
        free(scratch)
    if failures:
        raise MemoryError("lrn_within_backward: no memory for the window sums")
