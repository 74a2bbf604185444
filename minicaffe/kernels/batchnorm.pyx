"""Per-channel kernels: batch normalization, and the broadcast multiply-add behind the Scale and
Bias layers, BatchNorm with global statistics, and Deconvolution's bias.

Arrays are viewed as (outer, channels, inner): an (N, C, H, W) blob normalized over axis 1 is
(N, C, H * W), and Scale's axis and num_axes give other splits. Channel c owns the rows x[o, c, :].

Reductions over a channel run as one work item per channel and sum in double, vectorized, in a fixed
order (the row loops in include/channel_rows.h), so results do not depend on the thread count. A
channel's rows stay in L2 between its reduction and its element-wise pass (at most a few hundred KB
at ResNet-50's sizes), so each kernel reads its inputs from memory about once. Element-wise passes
split the rows into chunks of about CHUNK elements.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.string cimport memcpy
from minicaffe.kernels.parallel cimport team_size

cdef enum:
    CHUNK = 16384

cdef extern from "channel_rows.h" nogil:
    void mc_shifted_moments_f(const float* x, Py_ssize_t n, double shift, double* sum, double* squares)
    void mc_shifted_moments_d(const double* x, Py_ssize_t n, double shift, double* sum, double* squares)
    void mc_sum_f(const float* x, Py_ssize_t n, double* sum)
    void mc_sum_d(const double* x, Py_ssize_t n, double* sum)
    void mc_sum_dot_f(const float* a, const float* b, Py_ssize_t n, double* sum, double* dot)
    void mc_sum_dot_d(const double* a, const double* b, Py_ssize_t n, double* sum, double* dot)
    void mc_normalize_d(const double* x, double* y, double* x_norm, Py_ssize_t n, double mean, double factor,
                        double scale, double shift)
    void mc_normalize_relu_d(const double* x, double* y, double* x_norm, Py_ssize_t n, double mean,
                             double factor, double scale, double shift, double negative_slope)
    void mc_normalize_streaming_f(const float* x, float* y, float* x_norm, Py_ssize_t n, float mean, float factor,
                                  float scale, float shift, int relu, float negative_slope)
    void mc_relu_gradient_f(const float* dy, const float* x_norm, float* g, Py_ssize_t n, float scale,
                            float shift, float negative_slope)
    void mc_relu_gradient_d(const double* dy, const double* x_norm, double* g, Py_ssize_t n, double scale,
                            double shift, double negative_slope)
    void mc_normalize_backward_f(const float* dy, const float* x_norm, float* dx, Py_ssize_t n, float scale,
                                 float mean_dy, float mean_dy_x_norm, float factor)
    void mc_normalize_backward_d(const double* dy, const double* x_norm, double* dx, Py_ssize_t n,
                                 double scale, double mean_dy, double mean_dy_x_norm, double factor)

# The row loops of channel_rows.h, for either element type.

cdef inline void _row_moments(const floating* x, Py_ssize_t n, double shift, double* total,
                              double* squares) noexcept nogil:
    if floating is float:
        mc_shifted_moments_f(x, n, shift, total, squares)
    else:
        mc_shifted_moments_d(x, n, shift, total, squares)


cdef inline void _row_sum(const floating* x, Py_ssize_t n, double* total) noexcept nogil:
    if floating is float:
        mc_sum_f(x, n, total)
    else:
        mc_sum_d(x, n, total)


cdef inline void _row_sum_dot(const floating* a, const floating* b, Py_ssize_t n, double* total,
                              double* dot) noexcept nogil:
    if floating is float:
        mc_sum_dot_f(a, b, n, total, dot)
    else:
        mc_sum_dot_d(a, b, n, total, dot)


cdef inline void _row_normalize(const floating* x, floating* y, floating* x_norm, Py_ssize_t n,
                                floating mean, floating factor, floating scale, floating shift, bint relu,
                                floating negative_slope) noexcept nogil:
    if floating is float:
        mc_normalize_streaming_f(x, y, x_norm, n, mean, factor, scale, shift, relu, negative_slope)
    else:
        if relu:
            mc_normalize_relu_d(x, y, x_norm, n, mean, factor, scale, shift, negative_slope)
        else:
            mc_normalize_d(x, y, x_norm, n, mean, factor, scale, shift)


cdef inline void _row_relu_gradient(const floating* dy, const floating* x_norm, floating* g, Py_ssize_t n,
                                    floating scale, floating shift, floating negative_slope) noexcept nogil:
    if floating is float:
        mc_relu_gradient_f(dy, x_norm, g, n, scale, shift, negative_slope)
    else:
        mc_relu_gradient_d(dy, x_norm, g, n, scale, shift, negative_slope)


cdef inline void _row_normalize_backward(const floating* dy, const floating* x_norm, floating* dx,
                                         Py_ssize_t n, floating scale, floating mean_dy,
                                         floating mean_dy_x_norm, floating factor) noexcept nogil:
    if floating is float:
        mc_normalize_backward_f(dy, x_norm, dx, n, scale, mean_dy, mean_dy_x_norm, factor)
    else:
        mc_normalize_backward_d(dy, x_norm, dx, n, scale, mean_dy, mean_dy_x_norm, factor)


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

cdef void _sum_channel(const floating* x, floating* out, const Layout* g, Py_ssize_t c) noexcept nogil:
    cdef Py_ssize_t o
    cdef double total = 0
    for o in range(g.outer):
        _row_sum(x + (o * g.channels + c) * g.inner, g.inner, &total)
    out[c] += <floating>total


def channel_sums(const floating[:, :, ::1] x, floating[::1] out, int num_threads):
    """out[c] += the sum of x[:, c, :]."""
    cdef Layout g = _layout(&x.shape[0])
    _check_channels(out.shape[0], g.channels, "channel_sums")
    cdef Py_ssize_t c
    if g.count == 0:
        return
    with nogil:
        for c in prange(g.channels, schedule="static", num_threads=team_size(g.channels, num_threads)):
            _sum_channel(&x[0, 0, 0], &out[0], &g, c)


cdef void _scale_backward_channel(const floating* dy, const floating* x, floating s, floating* dx,
                                  floating* scale_diff, floating* bias_diff, const Layout* g,
                                  Py_ssize_t c) noexcept nogil:
    cdef Py_ssize_t o, i, offset, inner = g.inner
    cdef double dot = 0, total = 0
    for o in range(g.outer):
        offset = (o * g.channels + c) * inner
        # The sums read dy before dx overwrites it (dx may be dy).
        if scale_diff != NULL:
            _row_sum_dot(dy + offset, x + offset, inner, &total, &dot)
        elif bias_diff != NULL:
            _row_sum(dy + offset, inner, &total)
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
#
# Optionally followed by the per-channel affine of a Scale layer and a ReLU, all in place: a Net runs
# BatchNorm -> Scale (-> ReLU) on one blob this way (see BatchNormChain in layers/normalization.py),
# one read of x and two writes forward, two reads and one write backward, where the layers one by
# one make eight passes over memory forward and nine backward.

cdef struct Affine:
    # The Scale layer's per-channel scale and shift (NULL: 1 and 0), and the ReLU after it.
    void* scale
    void* shift
    bint relu
    double negative_slope


cdef void _normalize_channel(const floating* x, floating* y, floating* x_norm, double* mean_out,
                             double* variance_out, floating* inv_std_out, double eps, const Affine* affine,
                             const Layout* g, Py_ssize_t c) noexcept nogil:
    cdef Py_ssize_t o, offset, inner = g.inner
    cdef double m = g.outer * inner, total = 0, squares = 0, mean_shifted, variance
    # One pass over the channel for both moments, taken about its first value rather than zero:
    # near the mean, so E(d^2) - E(d)^2 does not cancel when the mean dwarfs the spread (Caffe's
    # two-pass E((X - EX)^2) avoids this at the price of a second read).
    cdef double shift = x[c * inner]
    for o in range(g.outer):
        _row_moments(x + (o * g.channels + c) * inner, inner, shift, &total, &squares)
    mean_shifted = total / m
    variance = max(squares / m - mean_shifted * mean_shifted, 0.0)
    cdef floating mean = <floating>(shift + mean_shifted)
    cdef floating factor = <floating>(1.0 / sqrt(variance + eps))
    cdef floating s = (<floating*>affine.scale)[c] if affine.scale != NULL else 1
    cdef floating b = (<floating*>affine.shift)[c] if affine.shift != NULL else 0
    for o in range(g.outer):
        offset = (o * g.channels + c) * inner
        _row_normalize(x + offset, y + offset, x_norm + offset, inner, mean, factor, s, b, affine.relu,
                       <floating>affine.negative_slope)
    mean_out[c] = shift + mean_shifted
    variance_out[c] = variance
    inv_std_out[c] = factor


def batch_norm_forward(const floating[:, :, ::1] x, floating[:, :, ::1] y, floating[:, :, ::1] x_norm,
                       double[::1] mean, double[::1] variance, floating[::1] inv_std, double eps,
                       int num_threads, const floating[::1] scale=None, const floating[::1] shift=None,
                       bint relu=False, double negative_slope=0):
    """Normalizes each channel of x by its own statistics: x_norm = (x - mean) * inv_std, and
    y = x_norm * scale[c] + shift[c] (scale and shift None: 1 and 0), then where relu,
    y = y if y > 0 else negative_slope * y.

    Writes the channel means, the biased variances and inv_std = 1 / sqrt(variance + eps).
    ``y`` may be ``x``; ``x_norm`` is a separate copy kept for the backward pass.
    """
    cdef Layout g = _layout(&x.shape[0])
    _check_same(&x.shape[0], &y.shape[0], "batch_norm_forward")
    _check_same(&x.shape[0], &x_norm.shape[0], "batch_norm_forward")
    _check_channels(mean.shape[0], g.channels, "batch_norm_forward")
    _check_channels(variance.shape[0], g.channels, "batch_norm_forward")
    _check_channels(inv_std.shape[0], g.channels, "batch_norm_forward")
    cdef Affine affine
    affine.scale = affine.shift = NULL
    affine.relu, affine.negative_slope = relu, negative_slope
    if scale is not None:
        _check_channels(scale.shape[0], g.channels, "batch_norm_forward")
        affine.scale = <void*>&scale[0]
    if shift is not None:
        _check_channels(shift.shape[0], g.channels, "batch_norm_forward")
        affine.shift = <void*>&shift[0]
    if g.outer * g.inner == 0:
        raise ValueError("batch_norm_forward: a channel has no elements to take statistics over")
    cdef Py_ssize_t c
    with nogil:
        for c in prange(g.channels, schedule="static", num_threads=team_size(g.channels, num_threads)):
            _normalize_channel(&x[0, 0, 0], &y[0, 0, 0], &x_norm[0, 0, 0], &mean[0], &variance[0],
                               &inv_std[0], eps, &affine, &g, c)


cdef struct AffineGradient:
    # Scale's per-channel scale and shift (NULL: 1 and 0), whether a ReLU followed, and where
    # Scale's parameter gradients accumulate (NULL: not wanted).
    void* scale
    void* shift
    bint relu
    double negative_slope
    void* scale_diff
    void* shift_diff


cdef void _normalize_backward_channel(const floating* dy, const floating* x_norm, floating inv_std,
                                      floating* dx, const AffineGradient* affine, const Layout* g,
                                      Py_ssize_t c) noexcept nogil:
    cdef Py_ssize_t o, offset, inner = g.inner
    cdef double m = g.outer * inner, total = 0, dot = 0
    cdef floating s = (<floating*>affine.scale)[c] if affine.scale != NULL else 1
    cdef floating b = (<floating*>affine.shift)[c] if affine.shift != NULL else 0
    # The gradient reaching Scale's output: dy itself, or ReLU's masked dy, which goes to dx first
    # (the sums and the final pass then read it from there, a row at a time, while it is in cache).
    # ReLU's mask comes from its input recomputed from x_norm, which saves reading its output.
    cdef const floating* grad = dy
    if affine.relu:
        grad = dx
    for o in range(g.outer):
        offset = (o * g.channels + c) * inner
        if affine.relu:
            _row_relu_gradient(dy + offset, x_norm + offset, dx + offset, inner, s, b,
                               <floating>affine.negative_slope)
        _row_sum_dot(grad + offset, x_norm + offset, inner, &total, &dot)
    if affine.scale_diff != NULL:
        (<floating*>affine.scale_diff)[c] += <floating>dot
    if affine.shift_diff != NULL:
        (<floating*>affine.shift_diff)[c] += <floating>total
    cdef floating mean_dy = <floating>(s * total / m), mean_dy_x_norm = <floating>(s * dot / m)
    for o in range(g.outer):
        offset = (o * g.channels + c) * inner
        _row_normalize_backward(grad + offset, x_norm + offset, dx + offset, inner, s, mean_dy,
                                mean_dy_x_norm, inv_std)


def batch_norm_backward(const floating[:, :, ::1] dy, const floating[:, :, ::1] x_norm,
                        const floating[::1] inv_std, floating[:, :, ::1] dx, int num_threads,
                        const floating[::1] scale=None, const floating[::1] shift=None,
                        floating[::1] scale_diff=None, floating[::1] shift_diff=None, bint relu=False,
                        double negative_slope=0):
    """Gradient of batch_norm_forward, given the same scale, shift, relu and negative_slope. With no
    scale, shift or ReLU: dx = (dy - mean(dy) - x_norm * mean(dy * x_norm)) * inv_std, the means
    over each channel.

    With them, dy is first masked by ReLU's rule (on x_norm * scale + shift, recomputed exactly as
    forward computed it), the affine's gradients accumulate as Scale's do
    (scale_diff[c] += sum of dy * x_norm, shift_diff[c] += sum of dy; either may be None), and
    dy * scale[c] goes through the formula above. ``dx`` may be ``dy``.
    """
    cdef Layout g = _layout(&dy.shape[0])
    _check_same(&dy.shape[0], &x_norm.shape[0], "batch_norm_backward")
    _check_same(&dy.shape[0], &dx.shape[0], "batch_norm_backward")
    _check_channels(inv_std.shape[0], g.channels, "batch_norm_backward")
    cdef AffineGradient affine
    affine.scale = affine.shift = affine.scale_diff = affine.shift_diff = NULL
    affine.relu, affine.negative_slope = relu, negative_slope
    if scale is not None:
        _check_channels(scale.shape[0], g.channels, "batch_norm_backward")
        affine.scale = <void*>&scale[0]
    if shift is not None:
        _check_channels(shift.shape[0], g.channels, "batch_norm_backward")
        affine.shift = <void*>&shift[0]
    if scale_diff is not None:
        _check_channels(scale_diff.shape[0], g.channels, "batch_norm_backward")
        affine.scale_diff = <void*>&scale_diff[0]
    if shift_diff is not None:
        _check_channels(shift_diff.shape[0], g.channels, "batch_norm_backward")
        affine.shift_diff = <void*>&shift_diff[0]
    cdef Py_ssize_t c
    if g.count == 0:
        return
    with nogil:
        for c in prange(g.channels, schedule="static", num_threads=team_size(g.channels, num_threads)):
            _normalize_backward_channel(&dy[0, 0, 0], &x_norm[0, 0, 0], inv_std[c], &dx[0, 0, 0], &affine,
                                        &g, c)
