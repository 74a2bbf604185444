"""Pooling, softmax and ReLU kernels against plain NumPy references, and their thread determinism."""
import math

import numpy as np
import pytest

from minicaffe.kernels import activation, pooling, softmax

THREADS = 2


def caffe_pooled_size(size, kernel, stride, pad, round_up=True):
    """Caffe's output size: float division rounded, then a last window starting in the padding dropped."""
    rounding = math.ceil if round_up else math.floor
    pooled = int(rounding((size + 2 * pad - kernel) / stride)) + 1
    if pad and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


def pooled_shape(x, kernel, stride, pad):
    return (x.shape[0], caffe_pooled_size(x.shape[1], kernel, stride, pad),
            caffe_pooled_size(x.shape[2], kernel, stride, pad))


def windows(size, pooled, kernel, stride):
    """Window bounds in padded coordinates, clipped to the padded extent ``size``."""
    return [(p * stride, min(p * stride + kernel, size)) for p in range(pooled)]


def ref_max_pool(x, kernel, stride, pad):
    """MAX pooling by padding with -inf: returns the maxima and the argmax as h * width + w."""
    planes, height, width = x.shape
    _, ph_n, pw_n = pooled_shape(x, kernel, stride, pad)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    top = np.empty((planes, ph_n, pw_n), x.dtype)
    mask = np.empty((planes, ph_n, pw_n), np.int64)
    for ph, (h0, h1) in enumerate(windows(height + 2 * pad, ph_n, kernel, stride)):
        for pw, (w0, w1) in enumerate(windows(width + 2 * pad, pw_n, kernel, stride)):
            window = padded[:, h0:h1, w0:w1].reshape(planes, -1)
            best = np.argmax(window, axis=1)  # first maximum in row-major order
            top[:, ph, pw] = window[np.arange(planes), best]
            h = h0 + best // (w1 - w0) - pad
            w = w0 + best % (w1 - w0) - pad
            mask[:, ph, pw] = h * width + w
    return top, mask


def ref_max_pool_backward(top_diff, mask, bottom_shape):
    planes = bottom_shape[0]
    bottom_diff = np.zeros((planes, bottom_shape[1] * bottom_shape[2]), top_diff.dtype)
    for p in range(planes):
        np.add.at(bottom_diff[p], mask[p].ravel(), top_diff[p].ravel())
    return bottom_diff.reshape(bottom_shape)


def ave_pool_matrix(height, width, kernel, stride, pad):
    """AVE pooling as a (pooled, pixels) matrix: zero padding, each window divided by its area
    inside the padded image."""
    ph_n = caffe_pooled_size(height, kernel, stride, pad)
    pw_n = caffe_pooled_size(width, kernel, stride, pad)
    matrix = np.zeros((ph_n, pw_n, height + 2 * pad, width + 2 * pad))
    for ph, (h0, h1) in enumerate(windows(height + 2 * pad, ph_n, kernel, stride)):
        for pw, (w0, w1) in enumerate(windows(width + 2 * pad, pw_n, kernel, stride)):
            matrix[ph, pw, h0:h1, w0:w1] = 1.0 / ((h1 - h0) * (w1 - w0))
    matrix = matrix[:, :, pad:pad + height, pad:pad + width]
    return matrix.reshape(ph_n * pw_n, height * width), (ph_n, pw_n)


POOL_CASES = [
    # (height, width, kernel, stride, pad): odd and even sizes, ceil rounding, clipped last windows.
    (7, 7, 3, 2, 1),
    (6, 6, 3, 2, 0),
    (6, 6, 3, 2, 1),
    (5, 5, 2, 2, 1),    # the ceil window that starts in the padding is dropped
    (8, 8, 2, 2, 0),
    (9, 7, 3, 3, 2),
    (5, 9, 4, 1, 0),
    (10, 12, 3, 1, 1),  # stride 1 (GoogLeNet's inception pools): whole rows of windows at once
    (5, 6, 5, 1, 2),    # stride 1 with clipped windows on both sides
    (6, 3, 4, 1, 3),    # stride 1, every window clipped (the image is narrower than the kernel)
    (32, 32, 3, 2, 0),  # stride 2 (cifar10_quick's pool1): even/odd split rows, clipped last window
    (13, 13, 3, 2, 0),  # stride 2, odd width, no clipped window
    (11, 12, 3, 2, 1),  # stride 2 with padding on both sides
    (9, 10, 4, 2, 2),   # stride 2, even kernel, taps of both parities at negative offsets
    (7, 3, 5, 2, 2),    # stride 2, the image narrower than the kernel
]


def test_caffe_output_sizes():
    # Values worked out by hand from Caffe's formula, as a check on the reference itself.
    assert caffe_pooled_size(7, 3, 2, 1) == 4
    assert caffe_pooled_size(6, 3, 2, 0) == 3
    assert caffe_pooled_size(5, 2, 2, 1) == 3
    assert caffe_pooled_size(32, 3, 2, 0) == 16   # cifar10_quick pool1
    assert caffe_pooled_size(6, 3, 2, 0, round_up=False) == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("height,width,kernel,stride,pad", POOL_CASES)
def test_max_pool_matches_reference(height, width, kernel, stride, pad, dtype):
    rng = np.random.default_rng(height * 100 + width * 10 + pad)
    x = rng.standard_normal((6, height, width)).astype(dtype)
    x[0] = 1.0  # a constant plane: ties resolve to the first element, as in Caffe
    ref_top, ref_mask = ref_max_pool(x, kernel, stride, pad)
    top = np.empty(ref_top.shape, dtype)
    mask = np.empty(ref_top.shape, np.int32)
    pooling.max_pool_forward(x, top, mask, kernel, kernel, stride, stride, pad, pad, THREADS)
    np.testing.assert_array_equal(top, ref_top)
    np.testing.assert_array_equal(mask, ref_mask)

    top_diff = rng.standard_normal(top.shape).astype(dtype)
    bottom_diff = np.full(x.shape, np.nan, dtype)  # the kernel must overwrite, not accumulate
    pooling.max_pool_backward(top_diff, mask, bottom_diff, THREADS)
    np.testing.assert_allclose(bottom_diff, ref_max_pool_backward(top_diff, ref_mask, x.shape),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("height,width,kernel,stride,pad", POOL_CASES)
def test_ave_pool_matches_reference(height, width, kernel, stride, pad, dtype):
    rng = np.random.default_rng(height * 100 + width * 10 + pad)
    x = rng.standard_normal((5, height, width)).astype(dtype)
    matrix, (ph_n, pw_n) = ave_pool_matrix(height, width, kernel, stride, pad)
    top = np.empty((5, ph_n, pw_n), dtype)
    pooling.ave_pool_forward(x, top, kernel, kernel, stride, stride, pad, pad, THREADS)
    expected = (x.reshape(5, -1).astype(np.float64) @ matrix.T).reshape(top.shape)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(top, expected, rtol=tol, atol=tol)

    top_diff = rng.standard_normal(top.shape).astype(dtype)
    bottom_diff = np.full(x.shape, np.nan, dtype)
    pooling.ave_pool_backward(top_diff, bottom_diff, kernel, kernel, stride, stride, pad, pad, THREADS)
    expected = (top_diff.reshape(5, -1).astype(np.float64) @ matrix).reshape(x.shape)
    np.testing.assert_allclose(bottom_diff, expected, rtol=tol, atol=tol)


def test_rectangular_windows():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 9))
    # kernel 2x3, stride 2x3, no pad: disjoint windows, so the maxima are block maxima.
    top = np.empty((2, 3, 3))
    mask = np.empty((2, 3, 3), np.int32)
    pooling.max_pool_forward(x, top, mask, 2, 3, 2, 3, 0, 0, THREADS)
    np.testing.assert_array_equal(top, x.reshape(2, 3, 2, 3, 3).max(axis=(2, 4)))
    pooling.ave_pool_forward(x, top, 2, 3, 2, 3, 0, 0, THREADS)
    np.testing.assert_allclose(top, x.reshape(2, 3, 2, 3, 3).mean(axis=(2, 4)), rtol=1e-12)


def test_global_pooling_is_the_plane_max_and_mean():
    x = np.random.default_rng(4).standard_normal((7, 5, 3)).astype(np.float32)
    top = np.empty((7, 1, 1), np.float32)
    mask = np.empty((7, 1, 1), np.int32)
    pooling.max_pool_forward(x, top, mask, 5, 3, 1, 1, 0, 0, THREADS)
    np.testing.assert_array_equal(top.ravel(), x.reshape(7, -1).max(axis=1))
    np.testing.assert_array_equal(mask.ravel(), x.reshape(7, -1).argmax(axis=1))
    pooling.ave_pool_forward(x, top, 5, 3, 1, 1, 0, 0, THREADS)
    np.testing.assert_allclose(top.ravel(), x.reshape(7, -1).mean(axis=1), rtol=1e-6)


def test_pooling_rejects_bad_geometry_and_masks():
    x = np.zeros((1, 4, 4))
    with pytest.raises(ValueError, match="outside the input"):
        pooling.max_pool_forward(x, np.zeros((1, 2, 2)), np.zeros((1, 2, 2), np.int32),
                                 1, 1, 4, 4, 0, 0, THREADS)
    with pytest.raises(ValueError, match="pad"):
        pooling.ave_pool_forward(x, np.zeros((1, 2, 2)), 2, 2, 2, 2, 2, 2, THREADS)
    with pytest.raises(ValueError, match="mask"):
        pooling.max_pool_backward(np.ones((1, 2, 2)), np.full((1, 2, 2), 16, np.int32),
                                  np.zeros((1, 4, 4)), THREADS)


# -- softmax ---------------------------------------------------------------------------------------

def ref_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def as_3d(shape, axis):
    return (int(np.prod(shape[:axis])), shape[axis], int(np.prod(shape[axis + 1:])))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((2, 3, 4, 5), 0), ((2, 3, 4, 5), 1), ((2, 3, 4, 5), 2),
                                        ((2, 3, 4, 5), 3), ((3, 10), 1), ((2, 4, 150), 1)])
def test_softmax_matches_reference(shape, axis, dtype):
    rng = np.random.default_rng(len(shape) + axis)
    x = (rng.standard_normal(shape) * 5).astype(dtype)
    x.flat[0] = 500  # exp(500) overflows float32 and float64 without the max subtraction
    dims = as_3d(shape, axis)
    y = np.empty(shape, dtype)
    softmax.softmax_forward(x.reshape(dims), y.reshape(dims), THREADS)
    ref = ref_softmax(x.astype(np.float64), axis)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(y, ref, rtol=tol * 10, atol=tol)

    dy = rng.standard_normal(shape).astype(dtype)
    dx = np.empty(shape, dtype)
    softmax.softmax_backward(y.reshape(dims), dy.reshape(dims), dx.reshape(dims), THREADS)
    y64 = y.astype(np.float64)
    expected = (dy - (dy * y64).sum(axis=axis, keepdims=True)) * y64
    np.testing.assert_allclose(dx, expected, rtol=tol * 10, atol=tol)


def test_softmax_in_place():
    x = np.random.default_rng(5).standard_normal((4, 7, 3))
    expected = ref_softmax(x, 1)
    softmax.softmax_forward(x, x, THREADS)
    np.testing.assert_allclose(x, expected, rtol=1e-13)


def ref_softmax_loss(prob, labels, ignore_label):
    """Summed -log p[label] over kept labels, their count, and the gradient of the sum."""
    outer, channels, inner = prob.shape
    loss, count = 0.0, 0
    grad = prob.astype(np.float64).copy()
    for i in range(outer):
        for j in range(inner):
            label = int(labels[i, j])
            if label == ignore_label:
                grad[i, :, j] = 0
                continue
            loss -= np.log(max(prob[i, label, j], np.finfo(np.float32).tiny))
            grad[i, label, j] -= 1
            count += 1
    return loss, count, grad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 5, 1), (3, 4, 70)])
def test_softmax_loss_matches_reference(shape, dtype):
    rng = np.random.default_rng(shape[2])
    prob = ref_softmax(rng.standard_normal(shape), 1).astype(dtype)
    prob[0, :, 0] = 0  # a zero probability is clamped at FLT_MIN as Caffe does
    labels = rng.integers(0, shape[1], size=(shape[0], shape[2])).astype(np.float32)
    labels[1, 0] = 3
    ref_loss, ref_count, ref_grad = ref_softmax_loss(prob, labels, ignore_label=3)
    loss, count, bad = softmax.softmax_loss_forward(prob, labels, 3, True, THREADS)
    assert bad == -1 and count == ref_count
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    dx = np.empty(shape, dtype)
    softmax.softmax_loss_backward(prob, labels, dx, 3, True, 0.25, THREADS)
    np.testing.assert_allclose(dx, 0.25 * ref_grad, rtol=1e-6, atol=1e-7)


def test_softmax_loss_reports_first_bad_label():
    prob = np.full((3, 4, 2), 0.25)
    labels = np.array([[0, 1], [2, 4], [-1, 9]], dtype=np.float64)
    assert softmax.softmax_loss_forward(prob, labels, 0, False, THREADS)[2] == 3
    # Ignoring 4 leaves -1 (flat position 4) as the first bad label.
    assert softmax.softmax_loss_forward(prob, labels, 4, True, THREADS)[2] == 4
    labels[1, 1] = np.nan
    assert softmax.softmax_loss_forward(prob, labels, 0, False, THREADS)[2] == 3


# -- ReLU ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_relu_matches_reference(slope, dtype):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(40000).astype(dtype)  # several chunks, the last one partial
    x[:3] = [0.0, np.nan, -np.inf if slope == 0 else -1.0]
    y = np.empty_like(x)
    activation.relu_forward(x, y, slope, THREADS)
    with np.errstate(invalid="ignore"):  # -inf * 0
        expected = np.where(x > 0, x, x * dtype(slope))
    expected[2] = 0 if slope == 0 else -slope
    np.testing.assert_array_equal(y, expected)  # NaN stays NaN
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx = np.empty_like(x)
    activation.relu_backward(x, dy, dx, slope, THREADS)
    np.testing.assert_array_equal(dx, np.where(x > 0, dy, dy * dtype(slope)))


def test_relu_in_place():
    x = np.random.default_rng(7).standard_normal(1000)
    expected = np.where(x > 0, x, 0.2 * x)
    activation.relu_forward(x, x, 0.2, THREADS)
    np.testing.assert_array_equal(x, expected)
    dy = np.ones_like(x)
    activation.relu_backward(x, dy, dy, 0.2, THREADS)
    np.testing.assert_array_equal(dy, np.where(expected > 0, 1.0, 0.2))


# -- determinism -----------------------------------------------------------------------------------

def run_all_kernels(num_threads):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((16, 13, 13)).astype(np.float32)
    outputs = []
    top = np.empty((16, 7, 7), np.float32)
    mask = np.empty(top.shape, np.int32)
    pooling.max_pool_forward(x, top, mask, 3, 3, 2, 2, 1, 1, num_threads)
    dx = np.empty_like(x)
    pooling.max_pool_backward(top, mask, dx, num_threads)
    outputs += [top.copy(), dx.copy()]
    pooling.ave_pool_forward(x, top, 3, 3, 2, 2, 1, 1, num_threads)
    pooling.ave_pool_backward(top, dx, 3, 3, 2, 2, 1, 1, num_threads)
    outputs += [top.copy(), dx.copy()]
    scores = x.reshape(8, 26, 13)
    prob = np.empty_like(scores)
    softmax.softmax_forward(scores, prob, num_threads)
    softmax.softmax_backward(prob, scores, dx.reshape(scores.shape), num_threads)
    labels = rng.integers(0, 26, size=(8, 13)).astype(np.float32)
    loss = softmax.softmax_loss_forward(prob, labels, 0, True, num_threads)
    outputs += [prob, dx.copy(), np.array(loss[:2])]
    flat = rng.standard_normal(100000).astype(np.float32)
    activation.relu_forward(flat, flat, 0.1, num_threads)
    outputs.append(flat)
    return outputs


def test_kernels_are_deterministic_across_thread_counts():
    reference = run_all_kernels(1)
    for num_threads in (2, 3):
        for a, b in zip(reference, run_all_kernels(num_threads)):
            np.testing.assert_array_equal(a, b)
