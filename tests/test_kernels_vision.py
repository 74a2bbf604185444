"""LRN, batch-norm/channel and STOCHASTIC pooling kernels against plain NumPy references, and their
independence from the thread count."""
import numpy as np
import pytest

from minicaffe.kernels import batchnorm, lrn, pooling

THREADS = 2


def tolerance(dtype):
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-13}


# -- LRN references ------------------------------------------------------------------------------

def ref_lrn_across(x, size, alpha, beta, k):
    """Caffe's CrossChannelForward: zero-padded squares summed over ``size`` channels."""
    x = x.astype(np.float64)
    half = (size - 1) // 2
    squares = np.pad(x * x, ((0, 0), (half, half), (0, 0), (0, 0)))
    window = sum(squares[:, i:i + x.shape[1]] for i in range(size))
    scale = k + alpha / size * window
    return x * scale ** -beta, scale


def ref_lrn_across_backward(x, y, scale, dy, size, alpha, beta):
    """Caffe's CrossChannelBackward: dy * scale^-beta - 2 alpha beta / size * x * window sum of
    dy * y / scale."""
    x, y, scale, dy = (a.astype(np.float64) for a in (x, y, scale, dy))
    half = (size - 1) // 2
    ratio = np.pad(dy * y / scale, ((0, 0), (half, half), (0, 0), (0, 0)))
    window = sum(ratio[:, i:i + x.shape[1]] for i in range(size))
    return dy * scale ** -beta - 2 * alpha * beta / size * x * window


def ref_ave_pool(x, kernel, pad):
    """Caffe's AVE pooling at stride 1 on planes (P, H, W): each window's sum divided by its size
    clipped to the padded image [-pad, size + pad)."""
    _, height, width = x.shape
    out = np.empty(x.shape)
    for h in range(height):
        for w in range(width):
            h0, w0 = h - pad, w - pad
            h1, w1 = min(h0 + kernel, height + pad), min(w0 + kernel, width + pad)
            area = (h1 - h0) * (w1 - w0)
            out[:, h, w] = x[:, max(h0, 0):min(h1, height), max(w0, 0):min(w1, width)].sum(axis=(1, 2)) / area
    return out


def ref_ave_pool_backward(dy, kernel, pad):
    _, height, width = dy.shape
    dx = np.zeros(dy.shape)
    for h in range(height):
        for w in range(width):
            h0, w0 = h - pad, w - pad
            h1, w1 = min(h0 + kernel, height + pad), min(w0 + kernel, width + pad)
            area = (h1 - h0) * (w1 - w0)
            dx[:, max(h0, 0):min(h1, height), max(w0, 0):min(w1, width)] += (dy[:, h, w] / area)[:, None, None]
    return dx


def ref_lrn_within(x, size, alpha, beta):
    """Caffe's WITHIN_CHANNEL composition: Power(x, 2) -> Pooling AVE (pad (size-1)/2, stride 1)
    -> Power(shift 1, scale alpha, power -beta) -> Eltwise PROD with x. Returns y and the power base."""
    x = x.astype(np.float64)
    base = 1 + alpha * ref_ave_pool(x * x, size, (size - 1) // 2)
    return x * base ** -beta, base


def ref_lrn_within_backward(x, dy, size, alpha, beta):
    """The chain rule back through the same composition, layer by layer."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    pad = (size - 1) // 2
    base = 1 + alpha * ref_ave_pool(x * x, size, pad)
    d_power = dy * x                                                  # Eltwise PROD, into the power branch
    d_pooled = d_power * -beta * base ** (-beta - 1) * alpha          # Power
    d_squares = ref_ave_pool_backward(d_pooled, size, pad)            # Pooling AVE
    return dy * base ** -beta + d_squares * 2 * x                     # PROD's other branch + Power(x, 2)


def random(shape, dtype, seed, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, size=shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, size, beta", [
    ((2, 7, 3, 4), 5, 0.75),
    ((2, 3, 23, 25), 3, 0.5),      # a plane larger than one work block (512 pixels)
    ((1, 4, 5, 5), 1, 1.0),
    ((2, 3, 2, 3), 7, 0.6),        # a window wider than the channels; the generic pow
    ((1, 1, 3, 3), 3, 0.75),
])
def test_lrn_across_matches_reference(dtype, shape, size, beta):
    alpha, k = 0.7, 1.5
    x = random(shape, dtype, 0, -2, 2)
    dy = random(shape, dtype, 1)
    y, scale, dx = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    lrn.lrn_across_forward(x, y, scale, size, alpha, beta, k, THREADS)
    expected_y, expected_scale = ref_lrn_across(x, size, alpha, beta, k)
    np.testing.assert_allclose(scale, expected_scale, **tolerance(dtype))
    np.testing.assert_allclose(y, expected_y, **tolerance(dtype))
    lrn.lrn_across_backward(x, y, scale, dy, dx, size, alpha, beta, k, THREADS)
    np.testing.assert_allclose(dx, ref_lrn_across_backward(x, y, scale, dy, size, alpha, beta),
                               **tolerance(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, size, beta", [
    ((3, 6, 7), 3, 0.75),
    ((2, 5, 4), 5, 0.5),           # the window is larger than the plane in one direction
    ((1, 9, 9), 1, 1.0),
    ((2, 4, 6), 3, 0.6),
])
def test_lrn_within_matches_caffe_composition(dtype, shape, size, beta):
    alpha = 0.9
    x = random(shape, dtype, 2, -2, 2)
    dy = random(shape, dtype, 3)
    y, scale, dx = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    lrn.lrn_within_forward(x, y, scale, size, alpha, beta, THREADS)
    expected_y, expected_base = ref_lrn_within(x, size, alpha, beta)
    np.testing.assert_allclose(scale, expected_base, **tolerance(dtype))
    np.testing.assert_allclose(y, expected_y, **tolerance(dtype))
    lrn.lrn_within_backward(x, y, scale, dy, dx, size, alpha, beta, THREADS)
    np.testing.assert_allclose(dx, ref_lrn_within_backward(x, dy, size, alpha, beta), **tolerance(dtype))
    # In place (dx is dy) gives the same gradient.
    lrn.lrn_within_backward(x, y, scale, dy, dy, size, alpha, beta, THREADS)
    np.testing.assert_array_equal(dy, dx)


def test_lrn_results_do_not_depend_on_the_thread_count():
    x = random((3, 6, 20, 30), np.float32, 4, 0, 3)
    dy = random(x.shape, np.float32, 5)
    results = []
    for threads in (1, 2, 3):
        y, scale, dx = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        lrn.lrn_across_forward(x, y, scale, 5, 1e-2, 0.75, 1.0, threads)
        lrn.lrn_across_backward(x, y, scale, dy, dx, 5, 1e-2, 0.75, 1.0, threads)
        planes = (-1, 20, 30)
        wy, wscale, wdx = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        lrn.lrn_within_forward(x.reshape(planes), wy.reshape(planes), wscale.reshape(planes), 3, 1e-2, 0.75,
                               threads)
        lrn.lrn_within_backward(x.reshape(planes), wy.reshape(planes), wscale.reshape(planes),
                                dy.reshape(planes), wdx.reshape(planes), 3, 1e-2, 0.75, threads)
        results.append((y, dx, wy, wdx))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_lrn_kernels_reject_bad_arguments():
    x = np.zeros((1, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match="local_size must be odd"):
        lrn.lrn_across_forward(x, x.copy(), x.copy(), 4, 1.0, 0.75, 1.0, 1)
    with pytest.raises(ValueError, match="differ in shape"):
        lrn.lrn_across_forward(x, np.zeros((1, 3, 2, 3), np.float32), x.copy(), 3, 1.0, 0.75, 1.0, 1)
    planes = x.reshape(3, 2, 2)
    with pytest.raises(ValueError, match="differ in shape"):
        lrn.lrn_within_backward(planes, planes, planes, planes, np.zeros((3, 2, 1), np.float32), 3, 1.0,
                                0.75, 1)


# -- channel kernels ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", [(2, 3, 5), (4, 6, 1), (1, 1, 40000), (3, 2, 9000)])
@pytest.mark.parametrize("terms", [(True, True, True), (False, True, False), (False, False, True)])
def test_channel_affine_matches_broadcasting(dtype, layout, terms):
    x = random(layout, dtype, 6)
    center, scale, shift = (random(layout[1], dtype, 7 + i) if used else None for i, used in enumerate(terms))
    y, saved = np.empty_like(x), np.empty_like(x)
    batchnorm.channel_affine(x, center, scale, shift, y, saved, THREADS)
    expected = x.astype(np.float64)
    if center is not None:
        expected = expected - center[:, None]
    if scale is not None:
        expected = expected * scale[:, None]
    if shift is not None:
        expected = expected + shift[:, None]
    np.testing.assert_allclose(y, expected, **tolerance(dtype))
    np.testing.assert_array_equal(saved, x)
    batchnorm.channel_affine(x, center, scale, shift, x, None, THREADS)   # in place
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", [(2, 3, 5), (5, 4, 1), (2, 2, 1037)])
def test_channel_sums_accumulate(dtype, layout):
    x = random(layout, dtype, 10)
    out = np.full(layout[1], 0.5, dtype)
    batchnorm.channel_sums(x, out, THREADS)
    np.testing.assert_allclose(out, 0.5 + x.astype(np.float64).sum(axis=(0, 2)), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", [(2, 3, 5), (6, 4, 1), (1, 1, 77), (3, 2, 1030)])
def test_scale_backward_matches_reference(dtype, layout):
    dy, x = random(layout, dtype, 11), random(layout, dtype, 12)
    scale = random(layout[1], dtype, 13)
    dx = np.empty_like(x)
    scale_diff, bias_diff = np.full(layout[1], 1.0, dtype), np.full(layout[1], -1.0, dtype)
    batchnorm.scale_backward(dy, x, scale, dx, scale_diff, bias_diff, THREADS)
    dy64 = dy.astype(np.float64)
    np.testing.assert_allclose(dx, dy64 * scale[:, None], **tolerance(dtype))
    np.testing.assert_allclose(scale_diff, 1.0 + (dy64 * x).sum(axis=(0, 2)), **tolerance(dtype))
    np.testing.assert_allclose(bias_diff, -1.0 + dy64.sum(axis=(0, 2)), **tolerance(dtype))
    # dx may be dy, and every output is optional.
    only_bias = np.zeros(layout[1], dtype)
    batchnorm.scale_backward(dy, x, scale, None, None, only_bias, THREADS)
    np.testing.assert_allclose(only_bias, dy64.sum(axis=(0, 2)), **tolerance(dtype))
    batchnorm.scale_backward(dy, x, scale, dy, None, None, THREADS)
    np.testing.assert_array_equal(dy, dx)


def ref_batch_norm(x, eps):
    x = x.astype(np.float64)
    mean = x.mean(axis=(0, 2))
    variance = ((x - mean[:, None]) ** 2).mean(axis=(0, 2))
    inv_std = 1 / np.sqrt(variance + eps)
    return (x - mean[:, None]) * inv_std[:, None], mean, variance, inv_std


def ref_batch_norm_backward(dy, y, inv_std):
    dy = dy.astype(np.float64)
    return (dy - dy.mean(axis=(0, 2), keepdims=True)
            - y * (dy * y).mean(axis=(0, 2), keepdims=True)) * inv_std[:, None]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", [(4, 3, 10), (16, 5, 1), (2, 2, 1031), (1, 3, 7)])
def test_batch_norm_matches_reference(dtype, layout):
    x = random(layout, dtype, 14, -3, 5)
    dy = random(layout, dtype, 15)
    y, x_norm, dx = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    mean, variance = np.zeros(layout[1]), np.zeros(layout[1])
    inv_std = np.zeros(layout[1], dtype)
    batchnorm.batch_norm_forward(x, y, x_norm, mean, variance, inv_std, 1e-5, THREADS)
    expected, expected_mean, expected_variance, expected_inv_std = ref_batch_norm(x, 1e-5)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(variance, expected_variance, rtol=1e-12)
    np.testing.assert_allclose(inv_std, expected_inv_std, **tolerance(dtype))
    np.testing.assert_allclose(y, expected, **tolerance(dtype))
    np.testing.assert_array_equal(x_norm, y)
    batchnorm.batch_norm_backward(dy, x_norm, inv_std, dx, THREADS)
    np.testing.assert_allclose(dx, ref_batch_norm_backward(dy, x_norm, inv_std), **tolerance(dtype))
    batchnorm.batch_norm_backward(dy, x_norm, inv_std, dy, THREADS)       # dx is dy
    np.testing.assert_array_equal(dy, dx)
    batchnorm.batch_norm_forward(x, x, x_norm, mean, variance, inv_std, 1e-5, THREADS)   # in place
    np.testing.assert_array_equal(x, y)


def test_batch_norm_statistics_stay_accurate_in_float32():
    """A large mean with a small spread: float32 sums would lose the variance entirely."""
    rng = np.random.default_rng(16)
    exact = 1000.0 + rng.standard_normal((64, 2, 1024)) * 0.01
    x = exact.astype(np.float32)
    y, x_norm = np.empty_like(x), np.empty_like(x)
    mean, variance, inv_std = np.zeros(2), np.zeros(2), np.zeros(2, np.float32)
    batchnorm.batch_norm_forward(x, y, x_norm, mean, variance, inv_std, 0.0, THREADS)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2)), rtol=1e-13)
    np.testing.assert_allclose(variance, x64.var(axis=(0, 2)), rtol=1e-9)


def test_channel_kernels_do_not_depend_on_the_thread_count():
    x = random((5, 7, 333), np.float32, 17)
    dy = random(x.shape, np.float32, 18)
    scale = random(7, np.float32, 19)
    results = []
    for threads in (1, 2, 3):
        y, x_norm, dx, affine = np.empty_like(x), np.empty_like(x), np.empty_like(x), np.empty_like(x)
        mean, variance, inv_std = np.zeros(7), np.zeros(7), np.zeros(7, np.float32)
        sums, scale_diff = np.zeros(7, np.float32), np.zeros(7, np.float32)
        batchnorm.batch_norm_forward(x, y, x_norm, mean, variance, inv_std, 1e-5, threads)
        batchnorm.batch_norm_backward(dy, x_norm, inv_std, dx, threads)
        batchnorm.channel_affine(x, None, scale, scale, affine, None, threads)
        batchnorm.channel_sums(dy, sums, threads)
        batchnorm.scale_backward(dy, x, scale, None, scale_diff, None, threads)
        results.append((y, dx, affine, sums, scale_diff, mean, variance))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_channel_kernels_reject_mismatched_arrays():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="3 channels"):
        batchnorm.channel_sums(x, np.zeros(4, np.float32), 1)
    with pytest.raises(ValueError, match="differ"):
        batchnorm.channel_affine(x, None, None, None, np.zeros((2, 3, 5), np.float32), None, 1)
    with pytest.raises(ValueError, match="no elements"):
        empty = np.zeros((0, 3, 4), np.float32)
        batchnorm.batch_norm_forward(empty, empty, empty, np.zeros(3), np.zeros(3), np.zeros(3, np.float32),
                                     1e-5, 1)


# -- STOCHASTIC pooling ----------------------------------------------------------------------------

def stochastic_windows(height, width, pooled_h, pooled_w, kernel, stride, pad):
    """Each output's window as (h0, h1, w0, w1), clipped to the image as MAX pooling's."""
    for ph in range(pooled_h):
        for pw in range(pooled_w):
            h0, w0 = ph * stride - pad, pw * stride - pad
            yield ph, pw, max(h0, 0), min(h0 + kernel, height), max(w0, 0), min(w0 + kernel, width)


def ref_stochastic_train(x, uniforms, kernel, stride, pad):
    planes, height, width = x.shape
    top = np.empty(uniforms.shape, x.dtype)
    mask = np.empty(uniforms.shape, np.int64)
    for p in range(planes):
        for ph, pw, h0, h1, w0, w1 in stochastic_windows(height, width, *uniforms.shape[1:], kernel, stride, pad):
            values = x[p, h0:h1, w0:w1].ravel()
            running = np.cumsum(values)
            reached = np.nonzero(running >= uniforms[p, ph, pw] * running[-1])[0]
            pick = reached[0] if reached.size else values.size - 1
            mask[p, ph, pw] = (h0 + pick // (w1 - w0)) * width + w0 + pick % (w1 - w0)
            top[p, ph, pw] = values[pick]
    return top, mask


def ref_stochastic_test(x, pooled_shape, kernel, stride, pad):
    _, height, width = x.shape
    x = x.astype(np.float64)
    top = np.zeros(pooled_shape)
    for ph, pw, h0, h1, w0, w1 in stochastic_windows(height, width, *pooled_shape[1:], kernel, stride, pad):
        window = x[:, h0:h1, w0:w1]
        total, squares = window.sum(axis=(1, 2)), (window ** 2).sum(axis=(1, 2))
        top[:, ph, pw] = np.where(total > 0, squares / np.where(total > 0, total, 1), 0)
    return top


def ref_stochastic_test_backward(x, dy, kernel, stride, pad):
    _, height, width = x.shape
    x, dx = x.astype(np.float64), np.zeros(x.shape)
    for ph, pw, h0, h1, w0, w1 in stochastic_windows(height, width, *dy.shape[1:], kernel, stride, pad):
        window = x[:, h0:h1, w0:w1]
        total = window.sum(axis=(1, 2))[:, None, None]
        squares = (window ** 2).sum(axis=(1, 2))[:, None, None]
        positive = total > 0
        safe = np.where(positive, total, 1)
        grad = np.where(positive, (2 * window * safe - squares) / safe ** 2, 0)
        dx[:, h0:h1, w0:w1] += grad * dy[:, ph, pw][:, None, None]
    return dx


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel, stride, pad, pooled", [(2, 2, 0, (3, 3)), (3, 2, 1, (4, 4)), (3, 1, 0, (4, 4))])
def test_stochastic_pooling_matches_reference(dtype, kernel, stride, pad, pooled):
    x = random((4, 6, 6), dtype, 20, 0, 1)
    x[0, :3, :3] = 0                                       # windows with nothing to sample from
    x[1, 0, 0] = -0.5                                      # a negative value: a window may not reach the draw
    uniforms = np.random.default_rng(21).random((4, *pooled))
    uniforms[2] = 0.999999
    top, mask = np.empty(uniforms.shape, dtype), np.empty(uniforms.shape, np.int32)
    args = (kernel, kernel, stride, stride, pad, pad, THREADS)
    pooling.stochastic_pool_forward_train(x, top, mask, uniforms, *args)
    expected_top, expected_mask = ref_stochastic_train(x, uniforms, kernel, stride, pad)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_array_equal(top, expected_top)
    pooling.stochastic_pool_forward_test(x, top, *args)
    np.testing.assert_allclose(top, ref_stochastic_test(x, top.shape, kernel, stride, pad), **tolerance(dtype))
    dy, dx = random(top.shape, dtype, 22), np.empty_like(x)
    pooling.stochastic_pool_backward_test(x, dy, dx, *args)
    np.testing.assert_allclose(dx, ref_stochastic_test_backward(x, dy, kernel, stride, pad), **tolerance(dtype))


def test_stochastic_sampling_frequencies_follow_the_values():
    x = np.array([[[1.0, 2.0], [3.0, 4.0]]] * 4000)
    uniforms = np.random.default_rng(23).random((4000, 1, 1))
    top, mask = np.empty((4000, 1, 1)), np.empty((4000, 1, 1), np.int32)
    pooling.stochastic_pool_forward_train(x, top, mask, uniforms, 2, 2, 2, 2, 0, 0, THREADS)
    frequencies = np.bincount(mask.ravel(), minlength=4) / 4000
    np.testing.assert_allclose(frequencies, [0.1, 0.2, 0.3, 0.4], atol=0.025)
    np.testing.assert_array_equal(top.ravel(), x.reshape(4000, 4)[np.arange(4000), mask.ravel()])


def test_stochastic_pooling_does_not_depend_on_the_thread_count():
    x = random((6, 9, 9), np.float32, 24, 0, 1)
    uniforms = np.random.default_rng(25).random((6, 4, 4))
    results = []
    for threads in (1, 2, 3):
        top, test_top = np.empty((6, 4, 4), np.float32), np.empty((6, 4, 4), np.float32)
        mask = np.empty((6, 4, 4), np.int32)
        pooling.stochastic_pool_forward_train(x, top, mask, uniforms, 3, 3, 2, 2, 0, 0, threads)
        pooling.stochastic_pool_forward_test(x, test_top, 3, 3, 2, 2, 0, 0, threads)
        results.append((top, mask, test_top))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
