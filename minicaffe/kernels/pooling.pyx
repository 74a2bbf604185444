"""MAX, AVE and STOCHASTIC pooling over planes, with Caffe's window arithmetic.

Arrays are 3-D: (planes, height, width), where planes = N * C. Each plane is independent, so the
planes are split statically across threads and every result is the same for any thread count.

A window starts at ``p * stride - pad``. MAX pooling clips the window to the image; AVE pooling
divides by the window size clipped to the padded image [-pad, size + pad), as Caffe does, so that
padding counts as zeros except where a window runs past the padding. STOCHASTIC pooling uses MAX
pooling's clipped windows (see its section).
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdlib cimport free, malloc
from minicaffe.kernels.parallel cimport team_size


cdef struct Geometry:
    int height, width, pooled_height, pooled_width
    int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w


cdef Geometry _geometry(const Py_ssize_t* bottom_shape, const Py_ssize_t* top_shape,
                        int kernel_h, int kernel_w, int stride_h, int stride_w,
                        int pad_h, int pad_w) except *:
    if bottom_shape[0] != top_shape[0]:
        raise ValueError("pooling: bottom and top hold different numbers of planes")
    if kernel_h < 1 or kernel_w < 1 or stride_h < 1 or stride_w < 1:
        raise ValueError("pooling: kernel and stride must be positive")
    if not (0 <= pad_h < kernel_h and 0 <= pad_w < kernel_w):
        raise ValueError("pooling: pad must be non-negative and smaller than the kernel")
    cdef Geometry g
    g.height, g.width = bottom_shape[1], bottom_shape[2]
    g.pooled_height, g.pooled_width = top_shape[1], top_shape[2]
    g.kernel_h, g.kernel_w, g.stride_h, g.stride_w = kernel_h, kernel_w, stride_h, stride_w
    g.pad_h, g.pad_w = pad_h, pad_w
    # Every window must overlap the image, else MAX pooling would have no element to pick.
    if ((g.pooled_height - 1) * stride_h - pad_h >= g.height
            or (g.pooled_width - 1) * stride_w - pad_w >= g.width):
        raise ValueError("pooling: the last window lies outside the input")
    return g


# -- MAX -------------------------------------------------------------------------------------------

cdef inline void _max_window(const floating* x, const Geometry* g, int h0, int h1, int pw,
                             floating* best_out, int* best_index_out) noexcept nogil:
    """The maximum of one window, clipped to the image, and its first position in row-major order."""
    cdef int h, w, index
    cdef int w0 = pw * g.stride_w - g.pad_w
    cdef int w1 = min(w0 + g.kernel_w, g.width)
    w0 = max(w0, 0)
    cdef int best_index = h0 * g.width + w0
    cdef floating best = x[best_index], v
    for h in range(h0, h1):
        for w in range(w0, w1):
            index = h * g.width + w
            v = x[index]
            # Strict '>' keeps the first maximum, as Caffe does; selects rather than branches,
            # because comparisons on real activations are unpredictable.
            best_index = index if v > best else best_index
            best = v if v > best else best
    best_out[0] = best
    best_index_out[0] = best_index


cdef extern from *:
    """
    /* One pooled row of MAX windows that lie inside the image: window j's tap t reads taps[t][j]
       (consecutive in j) at plane index first[t] + step * j. All taps of a window are reduced in
       registers, 16 windows at a time where AVX-512 is there (the compiler turned the same loop
       into branchy scalar code); a strict '>' over taps in row-major order keeps the first
       maximum. */
    #if defined(__AVX512F__)
    #include <immintrin.h>
    static void max_pool_row_float(const float* const* taps, const int* first, int tap_count,
                                   int step, int count, float* y, int* mask) {
        const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (int j = 0; j < count; j += 16) {
            __mmask16 live = count - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - j)) - 1);
            __m512i offsets = _mm512_mullo_epi32(_mm512_add_epi32(lanes, _mm512_set1_epi32(j)),
                                                 _mm512_set1_epi32(step));
            __m512 best = _mm512_maskz_loadu_ps(live, taps[0] + j);
            __m512i best_index = _mm512_add_epi32(offsets, _mm512_set1_epi32(first[0]));
            for (int t = 1; t < tap_count; t++) {
                __m512 v = _mm512_maskz_loadu_ps(live, taps[t] + j);
                __mmask16 larger = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
                best = _mm512_mask_mov_ps(best, larger, v);
                best_index = _mm512_mask_mov_epi32(best_index, larger,
                                                   _mm512_add_epi32(offsets, _mm512_set1_epi32(first[t])));
            }
            _mm512_mask_storeu_ps(y + j, live, best);
            _mm512_mask_storeu_epi32(mask + j, live, best_index);
        }
    }
    #define MAX_POOL_ROW_FLOAT_DONE
    #endif
    #define MAX_POOL_ROW(T)                                                                \
        static void max_pool_row_##T(const T* const* taps, const int* first, int tap_count, \
                                     int step, int count, T* y, int* mask) {               \
            for (int j = 0; j < count; j++) {                                              \
                T best = taps[0][j];                                                       \
                int best_index = first[0] + step * j;                                      \
                for (int t = 1; t < tap_count; t++) {                                      \
                    if (taps[t][j] > best) {                                               \
                        best = taps[t][j];                                                 \
                        best_index = first[t] + step * j;                                  \
                    }                                                                      \
                }                                                                          \
                y[j] = best;                                                               \
                mask[j] = best_index;                                                      \
            }                                                                              \
        }
    #ifndef MAX_POOL_ROW_FLOAT_DONE
    MAX_POOL_ROW(float)
    #endif
    MAX_POOL_ROW(double)
    """
    void max_pool_row_float(const float** taps, const int* first, int tap_count, int step,
                            int count, float* y, int* mask) noexcept nogil
    void max_pool_row_double(const double** taps, const int* first, int tap_count, int step,
                             int count, double* y, int* mask) noexcept nogil


# Window taps (kernel_h * kernel_w) up to which a pooled row's windows are reduced together.
cdef enum:
    MAX_ROW_TAPS = 64


cdef inline int _half_width(int width) noexcept nogil:
    return (width + 1) // 2


cdef void _deinterleave_rows(const floating* x, floating* rows, int height, int width) noexcept nogil:
    """Row h of the plane becomes its even columns, then its odd columns, at rows + h * 2 * half:
    at stride 2 every tap of a run of windows then reads consecutive values."""
    cdef int h, i, half = _half_width(width)
    cdef const floating* x_row
    cdef floating* even
    cdef floating* odd
    for h in range(height):
        x_row = x + <long>h * width
        even = rows + <long>h * 2 * half
        odd = even + half
        for i in range(width // 2):
            even[i] = x_row[2 * i]
            odd[i] = x_row[2 * i + 1]
        if width % 2:
            even[half - 1] = x_row[width - 1]


cdef inline const floating* _tap_values(const floating* x, const floating* rows, int h, int column,
                                        int width, int stride) noexcept nogil:
    """Where one tap's values for a run of windows inside the image lie consecutively, from image
    column ``column`` (>= 0) on: the image row itself at stride 1; at stride 2 the even or odd half
    of the split row."""
    cdef int half
    if stride == 1:
        return x + <long>h * width + column
    half = _half_width(width)
    return rows + <long>h * 2 * half + (half if column % 2 else 0) + column // 2


cdef void _max_forward_plane(const floating* x, floating* y, int* mask, const Geometry* g,
                             floating* rows) noexcept nogil:
    """At strides 1 and 2, the windows of a pooled row that lie wholly inside the image's columns
    are reduced together by max_pool_row_*, from one pointer per tap to that tap's values for
    consecutive windows. At stride 1 those are consecutive in the image row. At stride 2 they are
    every other value (strided loads measured 2-3x slower than one window at a time), so the
    plane's rows are first split into even and odd columns (``rows``, scratch of
    height * 2 * ceil(width / 2)), where they are consecutive again. Clipped windows, and every
    window at other strides or with more than MAX_ROW_TAPS taps, go one by one."""
    cdef int ph, pw, h0, h1, h, b, first_pw, end_pw, column, count, tap_count
    cdef const floating* taps[MAX_ROW_TAPS]
    cdef int first[MAX_ROW_TAPS]
    cdef floating* y_row
    cdef int* mask_row
    # Geometry in locals: the stores below could alias *g, which would stop vectorization.
    cdef int width = g.width, pad = g.pad_w, kernel = g.kernel_w, stride = g.stride_w
    # Pooled columns [first_pw, end_pw) have windows inside [0, width) (none at other strides).
    first_pw = end_pw = 0
    if (stride == 1 or stride == 2) and width >= kernel and g.kernel_h * kernel <= MAX_ROW_TAPS:
        first_pw = min((pad + stride - 1) // stride, g.pooled_width)
        end_pw = max(min((width - kernel + pad) // stride + 1, g.pooled_width), first_pw)
    if stride == 2 and end_pw > first_pw:
        _deinterleave_rows(x, rows, g.height, width)
    for ph in range(g.pooled_height):
        h0 = ph * g.stride_h - g.pad_h
        h1 = min(h0 + g.kernel_h, g.height)
        h0 = max(h0, 0)
        y_row = y + ph * g.pooled_width
        mask_row = mask + ph * g.pooled_width
        for pw in range(first_pw):
            _max_window(x, g, h0, h1, pw, &y_row[pw], &mask_row[pw])
        for pw in range(end_pw, g.pooled_width):
            _max_window(x, g, h0, h1, pw, &y_row[pw], &mask_row[pw])
        if end_pw == first_pw:
            continue
        count = end_pw - first_pw
        tap_count = 0
        for h in range(h0, h1):
            for b in range(kernel):
                # Tap b of window pw reads column stride * pw - pad + b.
                column = stride * first_pw - pad + b
                taps[tap_count] = _tap_values(x, rows, h, column, width, stride)
                first[tap_count] = h * width + column
                tap_count += 1
        if floating is float:
            max_pool_row_float(taps, first, tap_count, stride, count, y_row + first_pw, mask_row + first_pw)
        else:
            max_pool_row_double(taps, first, tap_count, stride, count, y_row + first_pw, mask_row + first_pw)


cdef int _max_backward_plane(const floating* dy, const int* mask, floating* dx,
                             int plane_size, int pooled_size) noexcept nogil:
    """Scatters dy to the argmax positions; returns how many mask entries were out of range."""
    cdef int i, bad = 0
    for i in range(plane_size):
        dx[i] = 0
    for i in range(pooled_size):
        if 0 <= mask[i] < plane_size:
            dx[mask[i]] += dy[i]
        else:
            bad += 1
    return bad


def max_pool_forward(const floating[:, :, ::1] bottom, floating[:, :, ::1] top, int[:, :, ::1] mask,
                     int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w,
                     int num_threads):
    """top = max over each window; mask = the argmax as an index into its plane (h * width + w)."""
    cdef Geometry g = _geometry(&bottom.shape[0], &top.shape[0],
                                kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w)
    if mask.shape[0] != top.shape[0] or mask.shape[1] != top.shape[1] or mask.shape[2] != top.shape[2]:
        raise ValueError("max_pool_forward: mask and top differ in shape")
    cdef Py_ssize_t planes = bottom.shape[0], p
    cdef floating* rows = NULL
    cdef size_t rows_size = <size_t>g.height * 2 * _half_width(g.width) if stride_w == 2 else 1
    cdef int failures = 0
    if planes == 0 or g.pooled_height == 0 or g.pooled_width == 0:
        return
    with nogil, parallel(num_threads=team_size(planes, num_threads)):
        rows = <floating*>malloc(rows_size * sizeof(floating))
        for p in prange(planes, schedule="static"):
            if rows == NULL:
                failures += 1
            else:
                _max_forward_plane(&bottom[p, 0, 0], &top[p, 0, 0], &mask[p, 0, 0], &g, rows)
        free(rows)
    if failures:
        raise MemoryError("max_pool_forward: no memory for the split rows")


def max_pool_backward(const floating[:, :, ::1] top_diff, const int[:, :, ::1] mask,
                      floating[:, :, ::1] bottom_diff, int num_threads):
    """bottom_diff = the top diffs routed back to each window's argmax (overwrites bottom_diff)."""
    cdef Py_ssize_t planes = bottom_diff.shape[0], p
    cdef int plane_size = bottom_diff.shape[1] * bottom_diff.shape[2]
    cdef int pooled_size = top_diff.shape[1] * top_diff.shape[2]
    cdef int bad = 0
    if (top_diff.shape[0] != planes or mask.shape[0] != planes or mask.shape[1] != top_diff.shape[1]
            or mask.shape[2] != top_diff.shape[2]):
        raise ValueError("max_pool_backward: top_diff, mask and bottom_diff do not match")
    if planes == 0 or plane_size == 0:
        return
    with nogil:
        for p in prange(planes, schedule="static", num_threads=team_size(planes, num_threads)):
            bad += _max_backward_plane(&top_diff[p, 0, 0], &mask[p, 0, 0], &bottom_diff[p, 0, 0],
                                       plane_size, pooled_size)
    if bad:
        raise ValueError(f"max_pool_backward: {bad} mask entries point outside their plane")


# -- AVE -------------------------------------------------------------------------------------------

cdef inline int _ave_rows(const Geometry* g, int ph, int* h0, int* h1) noexcept nogil:
    """Clips output row ph's window to the image rows [h0, h1); returns its height in the padded
    image, the factor of Caffe's pool_size that comes from the rows."""
    cdef int start = ph * g.stride_h - g.pad_h
    cdef int end = min(start + g.kernel_h, g.height + g.pad_h)
    h0[0] = max(start, 0)
    h1[0] = min(end, g.height)
    return end - start


cdef inline int _ave_columns(const Geometry* g, int pw, int* w0, int* w1) noexcept nogil:
    cdef int start = pw * g.stride_w - g.pad_w
    cdef int end = min(start + g.kernel_w, g.width + g.pad_w)
    w0[0] = max(start, 0)
    w1[0] = min(end, g.width)
    return end - start


cdef void _ave_forward_plane(const floating* x, floating* y, const Geometry* g) noexcept nogil:
    cdef int ph, pw, h, w, h0, h1, w0, w1, rows, pool_size
    cdef floating total
    for ph in range(g.pooled_height):
        rows = _ave_rows(g, ph, &h0, &h1)
        for pw in range(g.pooled_width):
            pool_size = rows * _ave_columns(g, pw, &w0, &w1)
            total = 0
            for h in range(h0, h1):
                for w in range(w0, w1):
                    total = total + x[h * g.width + w]
            y[ph * g.pooled_width + pw] = total / pool_size


cdef void _ave_backward_plane(const floating* dy, floating* dx, const Geometry* g) noexcept nogil:
    cdef int i, ph, pw, h, w, h0, h1, w0, w1, rows
    cdef floating share
    for i in range(g.height * g.width):
        dx[i] = 0
    for ph in range(g.pooled_height):
        rows = _ave_rows(g, ph, &h0, &h1)
        for pw in range(g.pooled_width):
            share = dy[ph * g.pooled_width + pw] / (rows * _ave_columns(g, pw, &w0, &w1))
            for h in range(h0, h1):
                for w in range(w0, w1):
                    dx[h * g.width + w] += share


def ave_pool_forward(const floating[:, :, ::1] bottom, floating[:, :, ::1] top,
                     int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w,
                     int num_threads):
    """top = the mean over each window, padding counted as zeros (Caffe's AVE pooling)."""
    cdef Geometry g = _geometry(&bottom.shape[0], &top.shape[0],
                                kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w)
    cdef Py_ssize_t planes = bottom.shape[0], p
    if planes == 0 or g.pooled_height == 0 or g.pooled_width == 0:
        return
    with nogil:
        for p in prange(planes, schedule="static", num_threads=team_size(planes, num_threads)):
            _ave_forward_plane(&bottom[p, 0, 0], &top[p, 0, 0], &g)


def ave_pool_backward(const floating[:, :, ::1] top_diff, floating[:, :, ::1] bottom_diff,
                      int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w,
                      int num_threads):
    """bottom_diff = each top diff spread evenly over its window (overwrites bottom_diff)."""
    cdef Geometry g = _geometry(&bottom_diff.shape[0], &top_diff.shape[0],
                                kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w)
    cdef Py_ssize_t planes = bottom_diff.shape[0], p
    if planes == 0 or g.height == 0 or g.width == 0:
        return
    with nogil:
        for p in prange(planes, schedule="static", num_threads=team_size(planes, num_threads)):
            _ave_backward_plane(&top_diff[p, 0, 0], &bottom_diff[p, 0, 0], &g)


# -- STOCHASTIC ------------------------------------------------------------------------------------
# Zeiler and Fergus's stochastic pooling, as Caffe's GPU kernels (Caffe has no CPU version). Training
# picks one element per window with probability proportional to its value; testing outputs the
# probability-weighted mean sum(x^2) / sum(x). Windows are MAX pooling's, clipped to the image:
# Caffe's kernels ignore pad, and the two agree whenever pad is 0.

cdef inline void _window(const Geometry* g, int ph, int pw, int* h0, int* h1, int* w0,
                         int* w1) noexcept nogil:
    cdef int start = ph * g.stride_h - g.pad_h
    h0[0], h1[0] = max(start, 0), min(start + g.kernel_h, g.height)
    start = pw * g.stride_w - g.pad_w
    w0[0], w1[0] = max(start, 0), min(start + g.kernel_w, g.width)


cdef inline int _sample_window(const floating* x, int width, int h0, int h1, int w0, int w1,
                               double uniform, floating* prefix) noexcept nogil:
    """The first position whose running sum reaches uniform * (window sum), as Caffe's search; the
    last position if none does (negative values can do that).

    The running sums are those of the one pass that also gives the total, kept in ``prefix``, so
    they equal Caffe's second-pass sums exactly. The search then selects, from the back, rather
    than branching on where the draw lands, which is random."""
    cdef int h, w, n = 0, chosen = (h1 - 1) * width + w1 - 1
    cdef floating total = 0, threshold
    for h in range(h0, h1):
        for w in range(w0, w1):
            total += x[h * width + w]
            prefix[n] = total
            n += 1
    threshold = <floating>(uniform * total)
    for h in range(h1 - 1, h0 - 1, -1):
        for w in range(w1 - 1, w0 - 1, -1):
            n -= 1
            chosen = h * width + w if prefix[n] >= threshold else chosen
    return chosen


cdef void _stochastic_train_plane(const floating* x, floating* y, int* mask, const double* uniforms,
                                  const Geometry* g, floating* prefix) noexcept nogil:
    cdef int ph, pw, h0, h1, w0, w1, i, chosen
    for ph in range(g.pooled_height):
        for pw in range(g.pooled_width):
            _window(g, ph, pw, &h0, &h1, &w0, &w1)
            i = ph * g.pooled_width + pw
            chosen = _sample_window(x, g.width, h0, h1, w0, w1, uniforms[i], prefix)
            mask[i] = chosen
            y[i] = x[chosen]


cdef inline void _window_moments(const floating* x, int width, int h0, int h1, int w0, int w1,
                                 double* total, double* squares) noexcept nogil:
    cdef int h, w
    cdef double v
    total[0] = 0
    squares[0] = 0
    for h in range(h0, h1):
        for w in range(w0, w1):
            v = x[h * width + w]
            total[0] += v
            squares[0] += v * v


cdef void _stochastic_test_plane(const floating* x, floating* y, const Geometry* g) noexcept nogil:
    cdef int ph, pw, h0, h1, w0, w1
    cdef double total, squares
    for ph in range(g.pooled_height):
        for pw in range(g.pooled_width):
            _window(g, ph, pw, &h0, &h1, &w0, &w1)
            _window_moments(x, g.width, h0, h1, w0, w1, &total, &squares)
            # A window with no positive mass outputs 0, as Caffe's.
            y[ph * g.pooled_width + pw] = <floating>(squares / total if total > 0 else 0)


cdef void _stochastic_test_backward_plane(const floating* x, const floating* dy, floating* dx,
                                          const Geometry* g) noexcept nogil:
    """d/dx_j of sum(x^2) / sum(x) is (2 x_j sum(x) - sum(x^2)) / sum(x)^2."""
    cdef int i, ph, pw, h, w, h0, h1, w0, w1
    cdef double total, squares, weight
    for i in range(g.height * g.width):
        dx[i] = 0
    for ph in range(g.pooled_height):
        for pw in range(g.pooled_width):
            _window(g, ph, pw, &h0, &h1, &w0, &w1)
            _window_moments(x, g.width, h0, h1, w0, w1, &total, &squares)
            if total <= 0:
                continue
            weight = dy[ph * g.pooled_width + pw] / (total * total)
            for h in range(h0, h1):
                for w in range(w0, w1):
                    dx[h * g.width + w] += <floating>(weight * (2 * x[h * g.width + w] * total - squares))


def stochastic_pool_forward_train(const floating[:, :, ::1] bottom, floating[:, :, ::1] top,
                                  int[:, :, ::1] mask, const double[:, :, ::1] uniforms,
                                  int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h,
                                  int pad_w, int num_threads):
    """Samples one element per window, with probability proportional to its (non-negative) value.

    ``uniforms`` holds one draw from [0, 1) per output. top = the sampled value, mask = its index
    into the plane (h * width + w), which max_pool_backward routes the gradient through.
    """
    cdef Geometry g = _geometry(&bottom.shape[0], &top.shape[0],
                                kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w)
    for other in ((mask.shape[0], mask.shape[1], mask.shape[2]),
                  (uniforms.shape[0], uniforms.shape[1], uniforms.shape[2])):
        if other != (top.shape[0], top.shape[1], top.shape[2]):
            raise ValueError("stochastic_pool_forward_train: mask, uniforms and top differ in shape")
    cdef Py_ssize_t planes = bottom.shape[0], p
    cdef floating* prefix = NULL
    cdef int failures = 0
    if planes == 0 or g.pooled_height == 0 or g.pooled_width == 0:
        return
    with nogil, parallel(num_threads=team_size(planes, num_threads)):
        prefix = <floating*>malloc(<size_t>kernel_h * kernel_w * sizeof(floating))
        for p in prange(planes, schedule="static"):
            if prefix == NULL:
                failures += 1
            else:
                _stochastic_train_plane(&bottom[p, 0, 0], &top[p, 0, 0], &mask[p, 0, 0],
                                        &uniforms[p, 0, 0], &g, prefix)
        free(prefix)
    if failures:
        raise MemoryError("stochastic_pool_forward_train: no memory for the running sums")


def stochastic_pool_forward_test(const floating[:, :, ::1] bottom, floating[:, :, ::1] top,
                                 int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h,
                                 int pad_w, int num_threads):
    """top = sum(x^2) / sum(x) over each window (0 where the sum is not positive)."""
    cdef Geometry g = _geometry(&bottom.shape[0], &top.shape[0],
                                kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w)
    cdef Py_ssize_t planes = bottom.shape[0], p
    if planes == 0 or g.pooled_height == 0 or g.pooled_width == 0:
        return
    with nogil:
        for p in prange(planes, schedule="static", num_threads=team_size(planes, num_threads)):
            _stochastic_test_plane(&bottom[p, 0, 0], &top[p, 0, 0], &g)


def stochastic_pool_backward_test(const floating[:, :, ::1] bottom, const floating[:, :, ::1] top_diff,
                                  floating[:, :, ::1] bottom_diff, int kernel_h, int kernel_w,
                                  int stride_h, int stride_w, int pad_h, int pad_w, int num_threads):
    """Gradient of stochastic_pool_forward_test (overwrites bottom_diff)."""
    cdef Geometry g = _geometry(&bottom.shape[0], &top_diff.shape[0],
                                kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w)
    if (bottom_diff.shape[0], bottom_diff.shape[1], bottom_diff.shape[2]) != \
            (bottom.shape[0], bottom.shape[1], bottom.shape[2]):
        raise ValueError("stochastic_pool_backward_test: bottom and bottom_diff differ in shape")
    cdef Py_ssize_t planes = bottom.shape[0], p
    if planes == 0 or g.height == 0 or g.width == 0:
        return
    with nogil:
        for p in prange(planes, schedule="static", num_threads=team_size(planes, num_threads)):
            _stochastic_test_backward_plane(&bottom[p, 0, 0], &top_diff[p, 0, 0], &bottom_diff[p, 0, 0], &g)
