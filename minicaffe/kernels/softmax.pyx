"""Softmax along one axis, and the multinomial logistic loss on its output (Caffe's SoftmaxWithLoss).

Arrays are viewed as (outer, channels, inner): the softmax runs over ``channels`` for every
(outer, inner) position. The work items are (outer index, tile of up to TILE inner positions), so
the inner loops walk contiguous memory both for inner == 1 (a row of class scores) and for large
inner (per-pixel softmax). Items are independent and sums run in a fixed order inside an item, so
results are the same for any thread count; the loss is summed per item, then over items serially.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.float cimport FLT_MIN
from libc.math cimport exp, expf, log
from minicaffe.kernels.parallel cimport team_size

import numpy as np

cdef enum:
    TILE = 64

# Label decoding results that are not class indices.
cdef enum:
    IGNORED = -1
    INVALID = -2

ctypedef fused label_t:
    float
    double


cdef inline floating _exp(floating v) noexcept nogil:
    if floating is float:
        return expf(v)
    else:
        return exp(v)


cdef inline int _label_class(double value, int channels, int ignore_label,
                             bint has_ignore) noexcept nogil:
    """The class a stored label names, IGNORED, or INVALID (Caffe truncates labels to int)."""
    if not (-2147483648.0 < value < 2147483648.0):
        return INVALID
    cdef int label = <int>value
    if has_ignore and label == ignore_label:
        return IGNORED
    if label < 0 or label >= channels:
        return INVALID
    return label


# -- softmax ---------------------------------------------------------------------------------------

cdef void _softmax_tile(const floating* x, floating* y, Py_ssize_t channels, Py_ssize_t inner,
                        Py_ssize_t width) noexcept nogil:
    """Softmax of the ``width`` columns starting at x (column j, channel c at c * inner + j)."""
    cdef floating peak[TILE]
    cdef floating total[TILE]
    cdef Py_ssize_t c, j
    cdef const floating* xc
    cdef floating* yc
    for j in range(width):
        peak[j] = x[j]
        total[j] = 0
    for c in range(1, channels):
        xc = x + c * inner
        for j in range(width):
            if xc[j] > peak[j]:
                peak[j] = xc[j]
    # Subtracting the column maximum keeps exp() from overflowing.
    for c in range(channels):
        xc = x + c * inner
        yc = y + c * inner
        for j in range(width):
            yc[j] = _exp(xc[j] - peak[j])
            total[j] += yc[j]
    for j in range(width):
        total[j] = 1 / total[j]
    for c in range(channels):
        yc = y + c * inner
        for j in range(width):
            yc[j] *= total[j]


cdef void _softmax_backward_tile(const floating* y, const floating* dy, floating* dx,
                                 Py_ssize_t channels, Py_ssize_t inner,
                                 Py_ssize_t width) noexcept nogil:
    cdef floating dot[TILE]
    cdef Py_ssize_t c, j, k
    for j in range(width):
        dot[j] = 0
    for c in range(channels):
        for j in range(width):
            k = c * inner + j
            dot[j] += dy[k] * y[k]
    for c in range(channels):
        for j in range(width):
            k = c * inner + j
            dx[k] = (dy[k] - dot[j]) * y[k]


def softmax_forward(const floating[:, :, ::1] x, floating[:, :, ::1] y, int num_threads):
    """y = softmax of x over axis 1. ``y`` may be ``x``."""
    cdef Py_ssize_t outer = x.shape[0], channels = x.shape[1], inner = x.shape[2]
    cdef Py_ssize_t tiles = (inner + TILE - 1) // TILE, items = outer * tiles, k, i, j0
    if y.shape[0] != outer or y.shape[1] != channels or y.shape[2] != inner:
        raise ValueError("softmax_forward: x and y differ in shape")
    if channels == 0:
        return
    with nogil:
        for k in prange(items, schedule="static", num_threads=team_size(items, num_threads)):
            i = k // tiles
            j0 = (k % tiles) * TILE
            _softmax_tile(&x[i, 0, j0], &y[i, 0, j0], channels, inner, min(<Py_ssize_t>TILE, inner - j0))


def softmax_backward(const floating[:, :, ::1] y, const floating[:, :, ::1] dy,
                     floating[:, :, ::1] dx, int num_threads):
    """dx = (dy - sum_c dy * y) * y, the softmax Jacobian applied to dy. ``dx`` may be ``dy``."""
    cdef Py_ssize_t outer = y.shape[0], channels = y.shape[1], inner = y.shape[2]
    cdef Py_ssize_t tiles = (inner + TILE - 1) // TILE, items = outer * tiles, k, i, j0
    if (dy.shape[0] != outer or dy.shape[1] != channels or dy.shape[2] != inner
            or dx.shape[0] != outer or dx.shape[1] != channels or dx.shape[2] != inner):
        raise ValueError("softmax_backward: y, dy and dx differ in shape")
    if channels == 0:
        return
    with nogil:
        for k in prange(items, schedule="static", num_threads=team_size(items, num_threads)):
            i = k // tiles
            j0 = (k % tiles) * TILE
            _softmax_backward_tile(&y[i, 0, j0], &dy[i, 0, j0], &dx[i, 0, j0], channels, inner,
                                   min(<Py_ssize_t>TILE, inner - j0))


# -- softmax loss ----------------------------------------------------------------------------------

cdef Py_ssize_t _loss_tile(const floating* prob, const label_t* labels, Py_ssize_t channels,
                           Py_ssize_t inner, Py_ssize_t width, int ignore_label, bint has_ignore,
                           double* loss, Py_ssize_t* valid) noexcept nogil:
    """Adds up -log(p[label]) over a tile; returns the first invalid column, or -1."""
    cdef Py_ssize_t j
    cdef int label
    cdef double p, total = 0
    cdef Py_ssize_t count = 0
    for j in range(width):
        label = _label_class(labels[j], <int>channels, ignore_label, has_ignore)
        if label == IGNORED:
            continue
        if label == INVALID:
            return j
        p = prob[label * inner + j]
        # Caffe clamps at FLT_MIN (in double precision too) so a zero probability costs ~87.3.
        total -= log(p if p > FLT_MIN else FLT_MIN)
        count += 1
    loss[0] = total
    valid[0] = count
    return -1


def softmax_loss_forward(const floating[:, :, ::1] prob, const label_t[:, ::1] labels,
                         int ignore_label, bint has_ignore, int num_threads):
    """Sums -log(prob[label]) over the labels that are not ignored.

    Returns (loss, valid_count, bad_position): bad_position is the flat index into ``labels`` of
    the first label that is neither ignored nor in [0, channels), or -1 when all are fine.
    """
    cdef Py_ssize_t outer = prob.shape[0], channels = prob.shape[1], inner = prob.shape[2]
    cdef Py_ssize_t tiles = (inner + TILE - 1) // TILE, items = outer * tiles, k, i, j0
    if labels.shape[0] != outer or labels.shape[1] != inner:
        raise ValueError("softmax_loss_forward: labels do not match the predictions")
    cdef double[::1] losses = np.zeros(items, dtype=np.float64)
    cdef Py_ssize_t[::1] counts = np.zeros(items, dtype=np.intp)
    cdef Py_ssize_t[::1] bad = np.full(items, -1, dtype=np.intp)
    if items and channels:
        with nogil:
            for k in prange(items, schedule="static", num_threads=team_size(items, num_threads)):
                i = k // tiles
                j0 = (k % tiles) * TILE
                bad[k] = _loss_tile(&prob[i, 0, j0], &labels[i, j0], channels, inner,
                                    min(<Py_ssize_t>TILE, inner - j0), ignore_label, has_ignore,
                                    &losses[k], &counts[k])
    cdef double loss = 0
    cdef Py_ssize_t valid = 0
    for k in range(items):
        if bad[k] >= 0:
            return 0.0, 0, (k // tiles) * inner + (k % tiles) * TILE + bad[k]
        loss += losses[k]
        valid += counts[k]
    return loss, valid, -1


cdef void _loss_backward_tile(const floating* prob, const label_t* labels, floating* dx,
                              Py_ssize_t channels, Py_ssize_t inner, Py_ssize_t width,
                              int ignore_label, bint has_ignore, floating scale) noexcept nogil:
    cdef Py_ssize_t c, j
    cdef int label
    for c in range(channels):
        for j in range(width):
            dx[c * inner + j] = prob[c * inner + j] * scale
    for j in range(width):
        label = _label_class(labels[j], <int>channels, ignore_label, has_ignore)
        if label >= 0:
            dx[label * inner + j] -= scale
        else:
            for c in range(channels):
                dx[c * inner + j] = 0


def softmax_loss_backward(const floating[:, :, ::1] prob, const label_t[:, ::1] labels,
                          floating[:, :, ::1] dx, int ignore_label, bint has_ignore, double scale,
                          int num_threads):
    """dx = scale * (prob - onehot(label)), and 0 for ignored (or invalid) labels."""
    cdef Py_ssize_t outer = prob.shape[0], channels = prob.shape[1], inner = prob.shape[2]
    cdef Py_ssize_t tiles = (inner + TILE - 1) // TILE, items = outer * tiles, k, i, j0
    if labels.shape[0] != outer or labels.shape[1] != inner:
        raise ValueError("softmax_loss_backward: labels do not match the predictions")
    if dx.shape[0] != outer or dx.shape[1] != channels or dx.shape[2] != inner:
        raise ValueError("softmax_loss_backward: prob and dx differ in shape")
    if channels == 0:
        return
    with nogil:
        for k in prange(items, schedule="static", num_threads=team_size(items, num_threads)):
            i = k // tiles
            j0 = (k % tiles) * TILE
            _loss_backward_tile(&prob[i, 0, j0], &labels[i, j0], &dx[i, 0, j0], channels, inner,
                                min(<Py_ssize_t>TILE, inner - j0), ignore_label, has_ignore,
                                <floating>scale)
