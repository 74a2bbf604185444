"""Per-channel kernels: batch normalization, and the broadcast multiply-add behind the Scale and
Bias layers, BatchNorm with global statistics, and Deconvolution's bias.

Arrays are viewed as (outer, channels, inner): an (N, C, H, W) blob normalized over axis 1 is
(N, C, H * W), and Scale's axis and num_axes give other splits. Channel c owns the rows x[o, c, :].

Reductions over a channel run as one work item per channel and sum in double with eight independent
partial sums, in a fixed order, so results do not depend on the thread count. Element-wise passes
split the rows into chunks of about CHUNK elements.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.string cimport memcpy
from minicaffe.kernels.parallel cimport team_size

cdef enum:
    CHUNK = 16384


cdef inline double _lanes_total(const double* lanes) noexcept nogil:
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))


cdef inline double _row_sum(const floating* row, Py_ssize_t n) noexcept nogil:
    cdef double lanes[8]
    cdef Py_ssize_t j = 0
    cdef int lane
    for lane in range(8):
        lanes[lane] = 0
    while j + 8 <= n:
        for lane in range(8):
            lanes[lane] += row[j + lane]
        j += 8
    for lane in range(n - j):
        lanes[lane] += row[j + lane]
    return _lanes_total(lanes)


cdef inline double _row_dot(const floating* a, const floating* b, Py_ssize_t n) noexcept nogil:
    cdef double lanes[8]
    cdef Py_ssize_t j = 0
    cdef int lane
    for lane in range(8):
        lanes[lane] = 0
    while j + 8 <= n:
        for lane in range(8):
            lanes[lane] += <double>a[j + lane] * b[j + lane]
        j += 8
    for lane in range(n - j):
        lanes[lane] += <double>a[j + lane] * b[j + lane]
    return _lanes_total(lanes)


cdef inline double _row_centred_squares(const floating* row, Py_ssize_t n, double mean) noexcept nogil:
    cdef double lanes[8]
    cdef double d
    cdef Py_ssize_t j = 0
    cdef int lane
    for lane in range(8):
        lanes[lane] = 0
    while j + 8 <= n:
        for lane in range(8):
            d = row[j + lane] - mean
            lanes[lane] += d * d
        j += 8
    for lane in range(n - j):
        d = row[j + lane] - mean
        lanes[lane] += d * d
    return _lanes_total(lanes)


cdef struct Layout:
    Py_ssize_t outer, channels, inner, count


cdef Layout _layout(const Py_ssize_t* shape) noexcept:
    cdef Layout g
    g.outer, g.channels, g.inner = shape[0], shape[1], shape[2]
    g.count = g.outer * g.channels * g.inner
    return g


cdef int _check_same(const Py_ssize_t* a, const Py_ssize_t* b, what) except -1:
    if a[0] != b[0] or a[1] != b[1] or a[2] != b[2]:
        raise ValueError(f"{what}: arrays of shapes {(a[0], a[1], a[2])} and {(b[0], b[1], b[2])} differ")
    return 0


cdef int _check_channels(Py_ssize_t size, Py_ssize_t channels, what) except -1:
    if size != channels:
        raise ValueError(f"{what}: a per-channel array has {size} elements for {channels} channels")
    return 0


# -- element-wise --------------------------------------------------------------------------------

cdef void _affine_rows(const floating* x, floating* y, floating* saved, const floating* center,
                       const floating* scale, const floating* shift, const Layout* g,
                       Py_ssize_t r_begin, Py_ssize_t r_end) noexcept nogil:
    cdef Py_ssize_t r, i, c, inner = g.inner
    cdef floating m, s, b
    cdef const floating* source
    cdef floating* target
    for r in range(r_begin, r_end):
        c = r % g.channels
        # Subtracting 0, multiplying by 1 and adding 0 are exact, so absent terms need no own loops.
        m = center[c] if center != NULL else 0
        s = scale[c] if scale != NULL else 1
        b = shift[c] if shift != NULL else 0
        source = x + r * inner
        target = y + r * inner
        if saved != NULL:
            memcpy(saved + r * inner, source, inner * sizeof(floating))
        for i in range(inner):
            target[i] = (source[i] - m) * s + b


def channel_affine(const floating[:, :, ::1] x, const floating[::1] center, const floating[::1] scale,
                   const floating[::1] shift, floating[:, :, ::1] y, floating[:, :, ::1] saved,
                   int num_threads):
    """y[o, c, i] = (x[o, c, i] - center[c]) * scale[c] + shift[c]; any of center, scale and shift
    may be None (0, 1, 0).

    ``y`` may be ``x``. ``saved``, unless None, receives a copy of x read in the same pass (an
    in-place Scale layer keeps its input that way for the backward pass).
    """
    cdef Layout g = _layout(&x.shape[0])
    _check_same(&x.shape[0], &y.shape[0], "channel_affine")
    if saved is not None:
        _check_same(&x.shape[0], &saved.shape[0], "channel_affine")
    if center is not None:
        _check_channels(center.shape[0], g.channels, "channel_affine")
    if scale is not None:
        _check_channels(scale.shape[0], g.channels, "channel_affine")
    if shift is not None:
        _check_channels(shift.shape[0], g.channels, "channel_affine")
    if g.count == 0:
        return
    cdef Py_ssize_t rows = g.outer * g.channels, per_item = max(1, CHUNK // g.inner)
    cdef Py_ssize_t items = (rows + per_item - 1) // per_item, item
    cdef floating* saved_ptr = &saved[0, 0, 0] if saved is not None else NULL
    cdef const floating* center_ptr = &center[0] if center is not None else NULL
    cdef const floating* scale_ptr = &scale[0] if scale is not None else NULL
    cdef const floating* shift_ptr = &shift[0] if shift is not None else NULL
    with nogil:
        for item in prange(items, schedule="static", num_threads=team_size(items, num_threads)):
            _affine_rows(&x[0, 0, 0], &y[0, 0, 0], saved_ptr, center_ptr, scale_ptr, shift_ptr,
                         &g, item * per_item, min(rows, (item + 1) * per_item))


# -- reductions ----------------------------------------------------------------------------------

def channel_sums(const floating[:, :, ::1] x, floating[::1] out, int num_threads):
    """out[c] += the sum of x[:, c, :]."""
    cdef Layout g = _layout(&x.shape[0])
    _check_channels(out.shape[0], g.channels, "channel_sums")
    cdef Py_ssize_t c, o
    cdef double total
    if g.count == 0:
        return
    with nogil:
        for c in prange(g.channels, schedule="static", num_threads=team_size(g.channels, num_threads)):
            total = 0
            for o in range(g.outer):
                total = total + _row_sum(&x[o, c, 0], g.inner)
            out[c] += <floating>total


cdef void _scale_backward_channel(const floating* dy, const floating* x, floating s, floating* dx,
                                  floating* scale_diff, floating* bias_diff, const Layout* g,
                                  Py_ssize_t c) noexcept nogil:
    cdef Py_ssize_t o, i, offset, inner = g.inner
    cdef double dot = 0, total = 0
    for o in range(g.outer):
        offset = (o * g.channels + c) * inner
        # The sums read dy before dx overwrites it (dx may be dy).
        if scale_diff != NULL:
            dot = dot + _row_dot(dy + offset, x + offset, inner)
        if bias_diff != NULL:
            total = total + _row_sum(dy + offset, inner)
        if dx != NULL:
            for i in range(inner):
                dx[offset + i] = dy[offset + i] * s
    if scale_diff != NULL:
        scale_diff[c] += <floating>dot
    if bias_diff != NULL:
        bias_diff[c] += <floating>total


def scale_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x, const floating[::1] scale,
                   floating[:, :, ::1] dx, floating[::1] scale_diff, floating[::1] bias_diff,
                   int num_threads):
    """Gradients of y = x * scale[c] + bias[c], in one pass over each channel.

    scale_diff[c] += sum of dy * x, bias_diff[c] += sum of dy, dx = dy * scale[c] (overwritten).
    Any of dx, scale_diff and bias_diff may be None (x is read only for scale_diff). dx may be dy.
    """
    cdef Layout g = _layout(&dy.shape[0])
    _check_same(&dy.shape[0], &x.shape[0], "scale_backward")
    _check_channels(scale.shape[0], g.channels, "scale_backward")
    if dx is not None:
        _check_same(&dy.shape[0], &dx.shape[0], "scale_backward")
    if scale_diff is not None:
        _check_channels(scale_diff.shape[0], g.channels, "scale_backward")
    if bias_diff is not None:
        _check_channels(bias_diff.shape[0], g.channels, "scale_backward")
    cdef Py_ssize_t c
    if g.count == 0:
        return
    cdef floating* dx_ptr = &dx[0, 0, 0] if dx is not None else NULL
    cdef floating* scale_diff_ptr = &scale_diff[0] if scale_diff is not None else NULL
    cdef floating* bias_diff_ptr = &bias_diff[0] if bias_diff is not None else NULL
    with nogil:
        for c in prange(g.channels, schedule="static", num_threads=team_size(g.channels, num_threads)):
            _scale_backward_channel(&dy[0, 0, 0], &x[0, 0, 0], scale[c], dx_ptr, scale_diff_ptr,
                                    bias_diff_ptr, &g, c)


# -- batch normalization with batch statistics ---------------------------------------------------

cdef void _normalize_channel(const floating* x, floating* y, floating* x_norm, double* mean_out,
                             double* variance_out, floating* inv_std_out, double eps, const Layout* g,
                             Py_ssize_t c) noexcept nogil:
    cdef Py_ssize_t o, i, offset, inner = g.inner
    cdef double m = g.outer * inner, total = 0, squares = 0, mean, variance
    cdef floating shift, factor, v
    for o in range(g.outer):
        total = total + _row_sum(x + (o * g.channels + c) * inner, inner)
    mean = total / m
    # Two passes, as Caffe's E((X - EX)^2): no cancellation when the mean dwarfs the spread.
    for o in range(g.outer):
        squares = squares + _row_centred_squares(x + (o * g.channels + c) * inner, inner, mean)
    variance = squares / m
    shift = <floating>mean
    factor = <floating>(1.0 / sqrt(variance + eps))
    for o in range(g.outer):
        offset = (o * g.channels + c) * inner
        for i in range(inner):
            v = (x[offset + i] - shift) * factor
            y[offset + i] = v
            x_norm[offset + i] = v
    mean_out[c] = mean
    variance_out[c] = variance
    inv_std_out[c] = factor


def batch_norm_forward(const floating[:, :, ::1] x, floating[:, :, ::1] y, floating[:, :, ::1] x_norm,
                       double[::1] mean, double[::1] variance, floating[::1] inv_std, double eps,
                       int num_threads):
    """Normalizes each channel of x by its own statistics: y = x_norm = (x - mean) * inv_std.

    Writes the channel means, the biased variances and inv_std = 1 / sqrt(variance + eps).
    ``y`` may be ``x``; ``x_norm`` is a separate copy kept for the backward pass.
    """
    cdef Layout g = _layout(&x.shape[0])
    _check_same(&x.shape[0], &y.shape[0], "batch_norm_forward")
    _check_same(&x.shape[0], &x_norm.shape[0], "batch_norm_forward")
    _check_channels(mean.shape[0], g.channels, "batch_norm_forward")
    _check_channels(variance.shape[0], g.channels, "batch_norm_forward")
    _check_channels(inv_std.shape[0], g.channels, "batch_norm_forward")
    if g.outer * g.inner == 0:
        raise ValueError("batch_norm_forward: a channel has no elements to take statistics over")
    cdef Py_ssize_t c
    with nogil:
        for c in prange(g.channels, schedule="static", num_threads=team_size(g.channels, num_threads)):
            _normalize_channel(&x[0, 0, 0], &y[0, 0, 0], &x_norm[0, 0, 0], &mean[0], &variance[0],
                               &inv_std[0], eps, &g, c)


cdef void _normalize_backward_channel(const floating* dy, const floating* x_norm, floating inv_std,
                                      floating* dx, const Layout* g, Py_ssize_t c) noexcept nogil:
    cdef Py_ssize_t o, i, offset, inner = g.inner
    cdef double m = g.outer * inner, total = 0, dot = 0
    cdef floating mean_dy, mean_dy_y
    for o in range(g.outer):
        offset = (o * g.channels + c) * inner
        total = total + _row_sum(dy + offset, inner)
        dot = dot + _row_dot(dy + offset, x_norm + offset, inner)
    mean_dy = <floating>(total / m)
    mean_dy_y = <floating>(dot / m)
    for o in range(g.outer):
        offset = (o * g.channels + c) * inner
        for i in range(inner):
            dx[offset + i] = (dy[offset + i] - mean_dy - x_norm[offset + i] * mean_dy_y) * inv_std


def batch_norm_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x_norm,
                        const floating[::1] inv_std, floating[:, :, ::1] dx, int num_threads):
    """Gradient of batch_norm_forward: dx = (dy - mean(dy) - x_norm * mean(dy * x_norm)) * inv_std,
    the means over each channel. ``dx`` may be ``dy``."""
    cdef Layout g = _layout(&dy.shape[0])
    _check_same(&dy.shape[0], &x_norm.shape[0], "batch_norm_backward")
    _check_same(&dy.shape[0], &dx.shape[0], "batch_norm_backward")
    _check_channels(inv_std.shape[0], g.channels, "batch_norm_backward")
    cdef Py_ssize_t c
    if g.count == 0:
        return
    with nogil:
        for c in prange(g.channels, schedule="static", num_threads=team_size(g.channels, num_threads)):
            _normalize_backward_channel(&dy[0, 0, 0], &x_norm[0, 0, 0], inv_std[c], &dx[0, 0, 0], &g, c)
