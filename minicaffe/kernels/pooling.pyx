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


cdef inline void _max_tap(const floating* x_row, int column, floating* y_row, int* mask_row,
                          int count) noexcept nogil:
    """One window tap for ``count`` pooled columns at stride 1: y[j] = max(y[j], x_row[j]), the mask
    taking index column + j where the tap is strictly larger."""
    cdef int j
    cdef floating v, best
    for j in range(count):
        v = x_row[j]
        best = y_row[j]
        mask_row[j] = column + j if v > best else mask_row[j]
        y_row[j] = v if v > best else best


cdef void _max_forward_plane(const floating* x, floating* y, int* mask,
                             const Geometry* g) noexcept nogil:
    """At stride 1 (GoogLeNet's inception pools), windows wholly inside the image's columns are
    reduced together, one pooled row at a time: each tap of the window, in row-major order, updates
    the whole row of running maxima (a loop over pw that vectorizes); a strict '>' keeps the first
    maximum. Clipped windows, and every window at larger strides (measured: strided row loads made
    that path 2-3x slower than one window at a time), go one by one."""
    cdef int ph, pw, h0, h1, h, b, first_pw, end_pw
    cdef floating* y_row
    cdef int* mask_row
    cdef const floating* x_row
    # Geometry in locals: the stores below could alias *g, which would stop vectorization.
    cdef int width = g.width, pad = g.pad_w, kernel = g.kernel_w
    # Pooled columns [first_pw, end_pw) have windows inside [0, width) (none unless stride 1).
    first_pw = end_pw = 0
    if g.stride_w == 1 and width >= kernel:
        first_pw = min(pad, g.pooled_width)
        end_pw = max(min(width - kernel + pad + 1, g.pooled_width), first_pw)
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
        # Window columns start at pw - pad, inside the row for pw >= first_pw.
        x_row = x + <long>h0 * width + first_pw - pad
        for pw in range(end_pw - first_pw):
            y_row[first_pw + pw] = x_row[pw]
            mask_row[first_pw + pw] = h0 * width + first_pw - pad + pw
        for h in range(h0, h1):
            x_row = x + <long>h * width + first_pw - pad
            for b in range(1 if h == h0 else 0, kernel):
                _max_tap(x_row + b, h * width + first_pw - pad + b, y_row + first_pw, mask_row + first_pw,
                         end_pw - first_pw)


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
    if planes == 0 or g.pooled_height == 0 or g.pooled_width == 0:
        return
    with nogil:
        for p in prange(planes, schedule="static", num_threads=team_size(planes, num_threads)):
            _max_forward_plane(&bottom[p, 0, 0], &top[p, 0, 0], &mask[p, 0, 0], &g)


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
