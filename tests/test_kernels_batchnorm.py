"""batch_norm_forward / batch_norm_backward on short rows, whose ends go through the row kernels'
partial vectors (include/channel_rows.h): row lengths around the vector width of 16 floats and
ResNet-50's 7x7 and 14x14 rows, starting at every alignment, against NumPy references."""
import numpy as np
import pytest

from minicaffe.kernels import batchnorm

THREADS = 2
EPS = 1e-5
ROW_LENGTHS = [1, 7, 8, 9, 15, 16, 17, 31, 49, 64, 65, 196]


def tolerance(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


def unaligned(shape, dtype, offset, values):
    """An array of the given shape and values whose data starts offset elements past a 64-byte
    boundary, so rows start at every position within a cache line."""
    count = int(np.prod(shape))
    raw = np.empty(count + offset + 64, dtype)
    skip = (-raw.ctypes.data % 64) // raw.itemsize + offset
    view = raw[skip:skip + count].reshape(shape)
    view[...] = values
    assert view.ctypes.data % 64 == offset * raw.itemsize % 64
    return view


def reference(x, dy, scale, shift, slope):
    """Forward (x_norm, y) and backward (dx, scale_diff, shift_diff) of BatchNorm -> Scale -> ReLU in
    float64, the layers' definitions one by one."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    mean = x.mean(axis=(0, 2), keepdims=True)
    inv_std = 1 / np.sqrt(((x - mean) ** 2).mean(axis=(0, 2), keepdims=True) + EPS)
    x_norm = (x - mean) * inv_std
    t = x_norm * scale[:, None] + shift[:, None]
    y = np.where(t > 0, t, t * slope)
    g = np.where(t > 0, dy, dy * slope)
    d = g * scale[:, None]
    dx = (d - d.mean(axis=(0, 2), keepdims=True) - x_norm * (d * x_norm).mean(axis=(0, 2), keepdims=True)) * inv_std
    return x_norm, y, dx, (g * x_norm).sum(axis=(0, 2)), g.sum(axis=(0, 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inner", ROW_LENGTHS)
@pytest.mark.parametrize("slope", [0.0, 0.25])
def test_short_rows_match_reference_at_every_alignment(dtype, inner, slope):
    layout = (3, 5, inner)
    generator = np.random.default_rng(inner)
    values, gradient = generator.uniform(-2, 3, layout), generator.uniform(-1, 1, layout)
    scale = generator.uniform(0.5, 1.5, layout[1]).astype(dtype)
    shift = generator.uniform(-0.5, 0.5, layout[1]).astype(dtype)
    for offset in range(0, 16, 5):
        x = unaligned(layout, dtype, offset, values)
        x_norm = unaligned(layout, dtype, (offset + 3) % 16, 0)
        y = unaligned(layout, dtype, (offset + 7) % 16, 0)
        dy = unaligned(layout, dtype, (offset + 11) % 16, gradient)
        dx = unaligned(layout, dtype, offset, 0)
        mean, variance, inv_std = np.zeros(layout[1]), np.zeros(layout[1]), np.zeros(layout[1], dtype)
        batchnorm.batch_norm_forward(x, y, x_norm, mean, variance, inv_std, EPS, THREADS, scale=scale,
                                     shift=shift, relu=True, negative_slope=slope)
        scale_diff, shift_diff = np.zeros(layout[1], dtype), np.zeros(layout[1], dtype)
        batchnorm.batch_norm_backward(dy, x_norm, inv_std, dx, THREADS, scale=scale, shift=shift,
                                      scale_diff=scale_diff, shift_diff=shift_diff, relu=True, negative_slope=slope)
        expected = reference(x, dy, scale, shift, slope)
        for name, got, want in zip(("x_norm", "y", "dx", "scale_diff", "shift_diff"),
                                   (x_norm, y, dx, scale_diff, shift_diff), expected):
            np.testing.assert_allclose(got, want, err_msg=f"{name}, offset {offset}", **tolerance(dtype))
        exact = x.astype(np.float64)
        np.testing.assert_allclose(mean, exact.mean(axis=(0, 2)), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(variance, exact.var(axis=(0, 2)), rtol=1e-10)
        # dx apart from dy: dy stays as it was.
        np.testing.assert_array_equal(dy, gradient.astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inner", [1, 15, 17, 49, 196])
def test_short_rows_without_affine_match_reference(dtype, inner):
    layout = (4, 3, inner)
    generator = np.random.default_rng(100 + inner)
    x = generator.uniform(-2, 3, layout).astype(dtype)
    dy = generator.uniform(-1, 1, layout).astype(dtype)
    y, x_norm = np.empty_like(x), np.empty_like(x)
    mean, variance, inv_std = np.zeros(layout[1]), np.zeros(layout[1]), np.zeros(layout[1], dtype)
    batchnorm.batch_norm_forward(x, y, x_norm, mean, variance, inv_std, EPS, THREADS)
    dx = dy.copy()
    batchnorm.batch_norm_backward(dx, x_norm, inv_std, dx, THREADS)
    ones, zeros = np.ones(layout[1]), np.zeros(layout[1])
    expected_norm, _, expected_dx, _, _ = reference(x, dy, ones, zeros, 1.0)
    np.testing.assert_allclose(x_norm, expected_norm, **tolerance(dtype))
    np.testing.assert_array_equal(y, x_norm)
    np.testing.assert_allclose(dx, expected_dx, **tolerance(dtype))


def test_row_ends_stay_inside_the_row():
    """The partial vectors at a row's ends write no element outside it: rows of 7x7 floats in the
    middle of a buffer whose guard cells hold NaN."""
    layout, guard = (2, 3, 49), 40
    generator = np.random.default_rng(7)
    buffers = [np.full(2 * guard + 2 * 3 * 49, np.nan, np.float32) for _ in range(3)]
    x, y, x_norm = (b[guard:-guard].reshape(layout) for b in buffers)
    x[...] = generator.uniform(-1, 1, layout)
    mean, variance, inv_std = np.zeros(3), np.zeros(3), np.zeros(3, np.float32)
    batchnorm.batch_norm_forward(x, y, x_norm, mean, variance, inv_std, EPS, THREADS, relu=True)
    dy = y.copy()
    batchnorm.batch_norm_backward(dy, x_norm, inv_std, dy, THREADS, relu=True)
    for b in buffers:
        assert np.isnan(b[:guard]).all() and np.isnan(b[-guard:]).all()
    assert np.isfinite(dy).all() and np.isfinite(y).all()


def test_sums_of_short_rows_do_not_depend_on_the_thread_count():
    layout = (5, 7, 49)
    x = np.random.default_rng(9).uniform(-2, 3, layout).astype(np.float32)
    results = []
    for threads in (1, 2):
        y, x_norm = np.empty_like(x), np.empty_like(x)
        mean, variance, inv_std = np.zeros(7), np.zeros(7), np.zeros(7, np.float32)
        batchnorm.batch_norm_forward(x, y, x_norm, mean, variance, inv_std, EPS, threads)
        dx = np.empty_like(x)
        batchnorm.batch_norm_backward(x, x_norm, inv_std, dx, threads)
        results.append((mean, variance, y, dx))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
