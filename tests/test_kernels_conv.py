"""im2col/col2im, convolution and matmul kernels against plain NumPy references."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from minicaffe.kernels import blas, conv, im2col, parallel


@pytest.fixture(autouse=True)
def single_threaded_blas():
    with threadpool_limits(1, "blas"):
        yield


# -- NumPy references --------------------------------------------------------------------------------

def out_size(size, kernel, pad, stride, dilation):
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def window_slices(out_h, out_w, i, j, stride, dilation):
    """Rows and columns of the padded input that kernel tap (i, j) reads for every output."""
    rows = slice(i * dilation[0], i * dilation[0] + stride[0] * (out_h - 1) + 1, stride[0])
    cols = slice(j * dilation[1], j * dilation[1] + stride[1] * (out_w - 1) + 1, stride[1])
    return rows, cols


def im2col_ref(x, kernel, pad, stride, dilation):
    c, h, w = x.shape
    oh, ow = (out_size(h, kernel[0], pad[0], stride[0], dilation[0]),
              out_size(w, kernel[1], pad[1], stride[1], dilation[1]))
    padded = np.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    col = np.empty((c, kernel[0], kernel[1], oh, ow), x.dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            rows, cols = window_slices(oh, ow, i, j, stride, dilation)
            col[:, i, j] = padded[:, rows, cols]
    return col.reshape(c * kernel[0] * kernel[1], oh * ow)


def col2im_ref(col, shape, kernel, pad, stride, dilation):
    c, h, w = shape
    oh, ow = (out_size(h, kernel[0], pad[0], stride[0], dilation[0]),
              out_size(w, kernel[1], pad[1], stride[1], dilation[1]))
    padded = np.zeros((c, h + 2 * pad[0], w + 2 * pad[1]), col.dtype)
    col = col.reshape(c, kernel[0], kernel[1], oh, ow)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            rows, cols = window_slices(oh, ow, i, j, stride, dilation)
            padded[:, rows, cols] += col[:, i, j]
    return padded[:, pad[0]:pad[0] + h, pad[1]:pad[1] + w]


def conv_ref(x, w, bias, pad, stride, dilation, group):
    """Forward by direct sums over kernel taps (einsum per tap and group), in float64."""
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    oh, ow = out_size(h, kh, pad[0], stride[0], dilation[0]), out_size(wd, kw, pad[1], stride[1], dilation[1])
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    y = np.zeros((n, m, oh, ow))
    mg = m // group
    for g in range(group):
        for i in range(kh):
            for j in range(kw):
                rows, cols = window_slices(oh, ow, i, j, stride, dilation)
                patch = padded[:, g * cg:(g + 1) * cg, rows, cols]
                y[:, g * mg:(g + 1) * mg] += np.einsum("nchw,mc->nmhw", patch,
                                                       w[g * mg:(g + 1) * mg, :, i, j])
    if bias is not None:
        y += bias[None, :, None, None]
    return y


def conv_backward_ref(x, w, dy, pad, stride, dilation, group):
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    oh, ow = dy.shape[2:]
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    dpadded = np.zeros_like(padded)
    dw = np.zeros(w.shape)
    mg = m // group
    for g in range(group):
        dy_g = dy[:, g * mg:(g + 1) * mg].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                rows, cols = window_slices(oh, ow, i, j, stride, dilation)
                patch = padded[:, g * cg:(g + 1) * cg, rows, cols]
                dw[g * mg:(g + 1) * mg, :, i, j] = np.einsum("nchw,nmhw->mc", patch, dy_g)
                dpadded[:, g * cg:(g + 1) * cg, rows, cols] += np.einsum("nmhw,mc->nchw", dy_g,
                                                                        w[g * mg:(g + 1) * mg, :, i, j])
    dx = dpadded[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + wd]
    return dx, dw, dy.sum(axis=(0, 2, 3), dtype=np.float64)


# -- im2col / col2im ---------------------------------------------------------------------------------

GEOMETRIES = [
    # channels, (h, w), kernel, pad, stride, dilation
    (3, (7, 9), (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, (8, 5), (2, 3), (0, 2), (2, 1), (1, 1)),
    (4, (11, 10), (3, 2), (2, 1), (3, 2), (2, 3)),
    (1, (5, 5), (5, 5), (0, 0), (1, 1), (1, 1)),
    (2, (6, 7), (1, 1), (0, 0), (1, 1), (1, 1)),
    (3, (4, 4), (3, 3), (3, 3), (2, 2), (1, 1)),   # padding wider than the image: whole zero rows
    (2, (9, 37), (3, 5), (1, 2), (2, 1), (1, 2)),   # rows of several vectors; only the height strided
    (5, (3, 2), (2, 2), (0, 0), (1, 1), (1, 1)),   # rows far shorter than a vector
    (3, (9, 70), (3, 5), (1, 2), (2, 2), (1, 1)),   # stride-2 rows of several vectors, partial last
    (2, (7, 61), (3, 3), (1, 1), (1, 2), (1, 2)),   # stride 2 across only, dilated
    (3, (23, 227), (11, 11), (0, 0), (4, 4), (1, 1)),  # AlexNet's conv1 geometry, stride 4
]


# Channels are split across threads; 4 threads on few channels would expose a kernel that writes
# past its own channel's rows.
@pytest.mark.parametrize("num_threads", [1, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels, size, kernel, pad, stride, dilation", GEOMETRIES)
def test_im2col_matches_reference(threads, num_threads, dtype, channels, size, kernel, pad, stride, dilation):
    threads(num_threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((channels, *size)).astype(dtype)
    expected = im2col_ref(x, kernel, pad, stride, dilation)
    for _ in range(3):
        col = np.full(expected.shape, np.nan, dtype)
        im2col.im2col(x, *kernel, *pad, *stride, *dilation, col)
        np.testing.assert_array_equal(col, expected)


@pytest.mark.parametrize("num_threads", [1, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels, size, kernel, pad, stride, dilation", GEOMETRIES)
def test_col2im_matches_reference_and_is_the_adjoint(threads, num_threads, dtype, channels, size, kernel, pad,
                                                     stride, dilation):
    threads(num_threads)
    rng = np.random.default_rng(1)
    shape = (channels, *size)
    col_shape = im2col_ref(np.zeros(shape, dtype), kernel, pad, stride, dilation).shape
    col = rng.standard_normal(col_shape).astype(dtype)
    x = np.full(shape, np.nan, dtype)
    im2col.col2im(col, *kernel, *pad, *stride, *dilation, x)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(x, col2im_ref(col, shape, kernel, pad, stride, dilation), rtol=tol, atol=tol)

    probe = rng.standard_normal(shape).astype(dtype)
    lowered = np.empty(col_shape, dtype)
    im2col.im2col(probe, *kernel, *pad, *stride, *dilation, lowered)
    np.testing.assert_allclose(np.vdot(lowered, col), np.vdot(probe, x), rtol=tol * 10)


def test_im2col_rejects_wrong_column_shape():
    x = np.zeros((2, 5, 5), np.float32)
    with pytest.raises(ValueError, match="col has shape"):
        im2col.im2col(x, 3, 3, 0, 0, 1, 1, 1, 1, np.zeros((18, 10), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        im2col.im2col(x, 7, 7, 0, 0, 1, 1, 1, 1, np.zeros((98, 1), np.float32))


def test_output_size_is_caffes():
    assert im2col.output_size(28, 5, 0, 1, 1) == 24
    assert im2col.output_size(32, 5, 2, 1, 1) == 32
    assert im2col.output_size(10, 3, 1, 2, 2) == 4


# -- convolution -------------------------------------------------------------------------------------

CONVS = [
    # x shape, (out channels, kernel), pad, stride, dilation, group
    ((4, 3, 9, 8), (6, (3, 3)), (1, 1), (1, 1), (1, 1), 1),
    ((5, 4, 10, 9), (6, (3, 2)), (2, 0), (2, 3), (1, 1), 2),
    ((3, 4, 11, 12), (4, (3, 3)), (2, 2), (1, 2), (2, 3), 4),     # depthwise, dilated
    ((4, 6, 5, 7), (9, (1, 1)), (0, 0), (1, 1), (1, 1), 3),       # pointwise: no im2col
    ((3, 5, 6, 6), (4, (1, 1)), (1, 1), (2, 2), (1, 1), 1),       # 1x1 that still needs im2col
    ((1, 2, 8, 8), (3, (5, 5)), (2, 2), (1, 1), (1, 1), 1),       # one image: split inside it
    ((2, 1, 28, 28), (4, (5, 5)), (0, 0), (1, 1), (1, 1), 1),
]


def run_forward(x, w, bias, pad, stride, dilation, group):
    y_shape = (x.shape[0], w.shape[0],
               out_size(x.shape[2], w.shape[2], pad[0], stride[0], dilation[0]),
               out_size(x.shape[3], w.shape[3], pad[1], stride[1], dilation[1]))
    y = np.full(y_shape, np.nan, x.dtype)
    workspace = np.empty(conv.conv_workspace_size(x.shape, w.shape, pad, stride, dilation, group,
                                                  x.dtype.itemsize), x.dtype)
    conv.conv_forward(x, w, bias, y, pad, stride, dilation, group, workspace)
    return y


def run_backward(x, w, dy, pad, stride, dilation, group, with_bias=True, dx_wanted=True, dw_init=None):
    dx = np.full(x.shape, np.nan, x.dtype) if dx_wanted else None
    dw = np.zeros(w.shape, x.dtype) if dw_init is None else dw_init.copy()
    db = np.zeros(w.shape[0], x.dtype) if with_bias else None
    workspace = np.empty(conv.conv_workspace_size(x.shape, w.shape, pad, stride, dilation, group,
                                                  x.dtype.itemsize), x.dtype)
    conv.conv_backward(x, w, dy, dx, dw, db, pad, stride, dilation, group, workspace)
    return dx, dw, db


def random_conv(x_shape, out, pad, stride, dilation, group, dtype, seed=0):
    rng = np.random.default_rng(seed)
    m, (kh, kw) = out
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((m, x_shape[1] // group, kh, kw)).astype(dtype)
    bias = rng.standard_normal(m).astype(dtype)
    y_shape = (x_shape[0], m, out_size(x_shape[2], kh, pad[0], stride[0], dilation[0]),
               out_size(x_shape[3], kw, pad[1], stride[1], dilation[1]))
    dy = rng.standard_normal(y_shape).astype(dtype)
    return x, w, bias, dy


def tolerance(dtype):
    return dict(rtol=2e-4, atol=2e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


def choose_path(monkeypatch, path, x_shape, out, pad, stride, dilation, itemsize):
    """Forces one of the im2col paths: a GEMM per image (with dW, or dW^T wherever its rows outnumber
    its columns), or one wide GEMM over all images or over chunks of two images."""
    if path.startswith("per_image"):
        monkeypatch.setattr(conv, "WIDE_MAX_SPATIAL", 0)
        monkeypatch.setattr(conv, "DW_TRANSPOSED_MIN_COLUMNS", 0 if path == "per_image_transposed" else 10 ** 9)
        return
    monkeypatch.setattr(conv, "WIDE_MAX_SPATIAL", 10 ** 9)
    monkeypatch.setattr(conv, "WIDE_MIN_WEIGHTS", 0)
    if path == "wide_chunks_of_2":
        m, (kh, kw) = out
        spatial = (out_size(x_shape[2], kh, pad[0], stride[0], dilation[0])
                   * out_size(x_shape[3], kw, pad[1], stride[1], dilation[1]))
        monkeypatch.setattr(conv, "COL_BUDGET_BYTES", 2 * (x_shape[1] * kh * kw + m) * spatial * itemsize)


@pytest.mark.parametrize("path", ["per_image", "per_image_transposed", "wide", "wide_chunks_of_2"])
@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, out, pad, stride, dilation, group", CONVS)
def test_conv_matches_reference(threads, monkeypatch, path, num_threads, dtype, x_shape, out, pad, stride,
                                dilation, group):
    threads(num_threads)
    choose_path(monkeypatch, path, x_shape, out, pad, stride, dilation, np.dtype(dtype).itemsize)
    x, w, bias, dy = random_conv(x_shape, out, pad, stride, dilation, group, dtype)
    tol = tolerance(dtype)

    np.testing.assert_allclose(run_forward(x, w, bias, pad, stride, dilation, group),
                               conv_ref(x, w, bias, pad, stride, dilation, group), **tol)
    np.testing.assert_allclose(run_forward(x, w, None, pad, stride, dilation, group),
                               conv_ref(x, w, None, pad, stride, dilation, group), **tol)

    dx_ref, dw_ref, db_ref = conv_backward_ref(x, w, dy, pad, stride, dilation, group)
    dw_before = np.random.default_rng(5).standard_normal(w.shape).astype(dtype)
    dx, dw, db = run_backward(x, w, dy, pad, stride, dilation, group, dw_init=dw_before)
    np.testing.assert_allclose(dx, dx_ref, **tol)
    np.testing.assert_allclose(dw, dw_before + dw_ref, **tol)   # weight gradients accumulate
    np.testing.assert_allclose(db, db_ref, **tol)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_conv_backward_computes_only_what_is_asked(threads, num_threads):
    threads(num_threads)
    args = ((1, 1), (1, 1), (1, 1), 1)
    x, w, bias, dy = random_conv((3, 2, 6, 6), (4, (3, 3)), *args, np.float64)
    dx_ref, dw_ref, db_ref = conv_backward_ref(x, w, dy, *args)
    workspace = np.empty(conv.conv_workspace_size(x.shape, w.shape, *args, 8), np.float64)

    dx = np.empty_like(x)
    conv.conv_backward(x, w, dy, dx, None, None, *args, workspace)
    np.testing.assert_allclose(dx, dx_ref, **tolerance(np.float64))
    db = np.zeros(4)
    conv.conv_backward(x, w, dy, None, None, db, *args, workspace)
    np.testing.assert_allclose(db, db_ref, **tolerance(np.float64))
    dw = np.zeros_like(w)
    conv.conv_backward(x, w, dy, None, dw, None, *args, workspace)
    np.testing.assert_allclose(dw, dw_ref, **tolerance(np.float64))


@pytest.mark.parametrize("dw_transposed_min_columns", [0, 10 ** 9])
def test_conv_inside_one_image_split_for_every_image(threads, monkeypatch, dw_transposed_min_columns):
    """Column buffers over the memory budget: every image is split across threads instead."""
    threads(2)
    monkeypatch.setattr(conv, "COL_BUDGET_BYTES", 0)
    monkeypatch.setattr(conv, "WIDE_MAX_SPATIAL", 0)
    monkeypatch.setattr(conv, "DW_TRANSPOSED_MIN_COLUMNS", dw_transposed_min_columns)
    args = ((1, 0), (1, 2), (1, 1), 2)
    x, w, bias, dy = random_conv((3, 4, 7, 8), (6, (3, 3)), *args, np.float64)
    np.testing.assert_allclose(run_forward(x, w, bias, *args), conv_ref(x, w, bias, *args),
                               **tolerance(np.float64))
    dx_ref, dw_ref, db_ref = conv_backward_ref(x, w, dy, *args)
    for got, expected in zip(run_backward(x, w, dy, *args), (dx_ref, dw_ref, db_ref)):
        np.testing.assert_allclose(got, expected, **tolerance(np.float64))


@pytest.mark.parametrize("x_shape, out, pad, stride, dilation, group", [
    ((8, 3, 12, 12), (8, (3, 3)), (1, 1), (1, 1), (1, 1), 1),
    ((5, 4, 9, 9), (4, (1, 1)), (0, 0), (1, 1), (1, 1), 2),
    ((1, 4, 9, 9), (6, (3, 3)), (0, 0), (1, 1), (1, 1), 1),
])
@pytest.mark.parametrize("path", ["per_image", "per_image_transposed", "wide"])
def test_conv_is_deterministic_for_a_thread_count(threads, monkeypatch, path, x_shape, out, pad, stride,
                                                  dilation, group):
    choose_path(monkeypatch, path, x_shape, out, pad, stride, dilation, 4)
    x, w, bias, dy = random_conv(x_shape, out, pad, stride, dilation, group, np.float32)
    results = {}
    for num_threads in (1, 2, 2, 3, 3):
        threads(num_threads)
        outputs = (run_forward(x, w, bias, pad, stride, dilation, group),
                   *run_backward(x, w, dy, pad, stride, dilation, group))
        if num_threads in results:
            for a, b in zip(results[num_threads], outputs):
                np.testing.assert_array_equal(a, b)
        results[num_threads] = outputs
    for a, b in zip(results[1], results[2]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(results[1], results[3]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


WINOGRAD_CONVS = [
    # x shape, out channels, pad
    ((3, 5, 9, 8), 6, (1, 1)),      # odd output height: partial tiles on the bottom edge
    ((2, 4, 7, 7), 3, (0, 0)),      # no padding: dx needs the adjoint's padding of 2
    ((2, 3, 6, 9), 5, (2, 1)),      # padding 2, wider output than input
    ((1, 2, 3, 4), 4, (1, 2)),      # smaller than one window
    ((2, 3, 13, 10), 4, (1, 1)),    # several 4x4 tiles per row, partial on both edges
]

# WINOGRAD_F4_MAX_COVER that makes every Winograd layer use 2x2 or 4x4 output tiles.
TILE_COVER = {2: 0.0, 4: 1e9}


def force_winograd(patch, tile, block=None):
    """Winograd on every 3x3 stride-1 convolution, with ``tile`` (None: the planner's choice)."""
    patch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 1)
    patch.setattr(conv, "WINOGRAD_MIN_TILES", 1)
    patch.setattr(conv, "WINOGRAD_MIN_SPATIAL", 1)
    if tile is not None:
        patch.setattr(conv, "WINOGRAD_F4_MAX_COVER", TILE_COVER[tile])
    if block is not None:
        patch.setattr(conv, "WINOGRAD_MIN_BLOCK", block)
        patch.setattr(conv, "WINOGRAD_BLOCK_BYTES", 0)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, out_channels, pad", WINOGRAD_CONVS)
@pytest.mark.parametrize("block", [1, 5, 1000])
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_conv_matches_reference(threads, monkeypatch, num_threads, dtype, x_shape, out_channels, pad,
                                         block, tile):
    """Winograd F(2x2, 3x3) and F(4x4, 3x3) forced on small shapes; blocks of 1 and 5 tiles cross rows
    and images."""
    threads(num_threads)
    force_winograd(monkeypatch, tile, block)
    args = (pad, (1, 1), (1, 1), 1)
    x, w, bias, dy = random_conv(x_shape, (out_channels, (3, 3)), *args, dtype)
    tol = tolerance(dtype)
    np.testing.assert_allclose(run_forward(x, w, bias, *args), conv_ref(x, w, bias, *args), **tol)
    dx_ref, dw_ref, db_ref = conv_backward_ref(x, w, dy, *args)
    dw_before = np.random.default_rng(5).standard_normal(w.shape).astype(dtype)
    dx, dw, db = run_backward(x, w, dy, *args, dw_init=dw_before)
    np.testing.assert_allclose(dx, dx_ref, **tol)
    np.testing.assert_allclose(dw, dw_before + dw_ref, **tol)
    np.testing.assert_allclose(db, db_ref, **tol)


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_filter_transforms_cross_their_chunks(threads, monkeypatch, num_threads, tile):
    """The filter transforms take 64 filters at a time (MC_WINO_FILTER_CHUNK): rows of 150 input and
    133 output channels end in partial chunks, for the filters (a row over c), the adjoint's filters
    (a row over m) and the filter gradients (a row over c)."""
    threads(num_threads)
    force_winograd(monkeypatch, tile)
    args = ((1, 1), (1, 1), (1, 1), 1)
    x, w, bias, dy = random_conv((1, 150, 5, 4), (133, (3, 3)), *args, np.float64)
    tol = tolerance(np.float64)
    np.testing.assert_allclose(run_forward(x, w, bias, *args), conv_ref(x, w, bias, *args), **tol)
    dx_ref, dw_ref, _ = conv_backward_ref(x, w, dy, *args)
    dx, dw, _ = run_backward(x, w, dy, *args)
    np.testing.assert_allclose(dx, dx_ref, **tol)
    np.testing.assert_allclose(dw, dw_ref, **tol)


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_is_deterministic_for_a_thread_count(threads, monkeypatch, tile):
    threads(2)
    force_winograd(monkeypatch, tile, block=7)
    args = ((1, 1), (1, 1), (1, 1), 1)
    x, w, bias, dy = random_conv((3, 6, 11, 9), (5, (3, 3)), *args, np.float32)
    first = (run_forward(x, w, bias, *args), *run_backward(x, w, dy, *args))
    again = (run_forward(x, w, bias, *args), *run_backward(x, w, dy, *args))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


# Largest error against a float64 reference, relative to the reference's largest value, and its most
# over im2col + GEMM's. F(4x4)'s transforms scale by up to 8 (A^T) and 5 (B^T) and divide by 24 (G),
# so it rounds more than F(2x2), whose coefficients are 1 and 1/2: measured 6e-6 to 1.2e-5 against
# im2col + GEMM's 2e-7 to 4e-7 on this shape (F(2x2): 3e-7 to 8e-7).
WINOGRAD_ERROR_BOUNDS = {2: (1e-5, 8), 4: (5e-5, 100)}


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_error_in_float32_is_near_the_direct_convolutions(threads, tile):
    """At a VGG-like depth (256 channels) Winograd's float32 error stays within a bounded factor of
    im2col + GEMM's, both measured against a float64 reference."""
    threads(2)
    args = ((1, 1), (1, 1), (1, 1), 1)
    x, w, bias, dy = random_conv((8, 256, 12, 12), (64, (3, 3)), *args, np.float32)
    exact = conv_ref(x, w, bias, *args)
    dx_ref, dw_ref, _ = conv_backward_ref(x, w, dy, *args)
    with pytest.MonkeyPatch.context() as patch:
        force_winograd(patch, tile)
        winograd = (run_forward(x, w, bias, *args), *run_backward(x, w, dy, *args)[:2])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 10 ** 6)
        patch.setattr(conv, "WINOGRAD_LARGE_IMAGE", 10 ** 9)
        direct = (run_forward(x, w, bias, *args), *run_backward(x, w, dy, *args)[:2])
    most, factor = WINOGRAD_ERROR_BOUNDS[tile]
    for got, baseline, reference in zip(winograd, direct, (exact, dx_ref, dw_ref)):
        assert not np.array_equal(got, baseline)    # the two algorithms really differ
        scale = np.abs(reference).max()
        winograd_error = np.abs(got - reference).max() / scale
        direct_error = np.abs(baseline - reference).max() / scale
        assert winograd_error < most
        assert winograd_error < factor * direct_error + 1e-7


def test_winograd_tile_follows_the_output_size(threads, monkeypatch):
    """4x4 tiles on a 12x12 output (no padding), 2x2 on 14x14 (4x4 tiles would cover 16x16): the two
    give different float32 results, each the same as when forced."""
    threads(1)
    args = ((1, 1), (1, 1), (1, 1), 1)
    for size, tile in ((12, 4), (14, 2)):
        x, w, bias, _ = random_conv((4, 8, size, size), (8, (3, 3)), *args, np.float32)
        results = {}
        for forced in (None, 2, 4):
            with pytest.MonkeyPatch.context() as patch:
                force_winograd(patch, forced)
                results[forced] = run_forward(x, w, bias, *args)
        assert not np.array_equal(results[2], results[4])
        np.testing.assert_array_equal(results[None], results[tile])


def test_conv_rejects_inconsistent_shapes():
    x = np.zeros((2, 4, 6, 6), np.float32)
    w = np.zeros((6, 2, 3, 3), np.float32)
    y = np.zeros((2, 6, 4, 4), np.float32)
    args = ((0, 0), (1, 1), (1, 1))
    workspace = np.zeros(conv.conv_workspace_size(x.shape, w.shape, *args, 2, 4), np.float32)
    with pytest.raises(ValueError, match="group"):
        conv.conv_forward(x, w, None, y, *args, 1, workspace)
    with pytest.raises(ValueError, match="output has shape"):
        conv.conv_forward(x, w, None, np.zeros((2, 6, 5, 5), np.float32), *args, 2, workspace)
    with pytest.raises(ValueError, match="workspace"):
        conv.conv_forward(x, w, None, y, *args, 2, workspace[:1])
    with pytest.raises(ValueError, match="bias"):
        conv.conv_forward(x, w, np.zeros(5, np.float32), y, *args, 2, workspace)


# -- matmul ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, n, k", [(64, 500, 800), (500, 64, 800), (3, 7, 5), (1, 300, 1000),
                                     (257, 33, 129)])
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_matches_numpy(threads, num_threads, dtype, m, n, k, trans_a, trans_b):
    threads(num_threads)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    c0 = rng.standard_normal((m, n)).astype(dtype)
    c = c0.copy()
    blas.matmul(a, b, c, trans_a, trans_b, alpha=0.5, beta=2.0)
    opa = a.T if trans_a else a
    opb = b.T if trans_b else b
    expected = 0.5 * (opa.astype(np.float64) @ opb.astype(np.float64)) + 2.0 * c0
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-10)
    np.testing.assert_allclose(c, expected, **tol)


def test_matmul_on_row_strided_and_read_only_views():
    rng = np.random.default_rng(0)
    big = rng.standard_normal((40, 50))
    a, b = big[:10, :20], big[10:30, 5:12]
    c = np.zeros((12, 7))[2:12]
    blas.matmul(a, b, c)
    np.testing.assert_allclose(c, a @ b, rtol=1e-12)
    a.flags.writeable = False
    blas.matmul(a, b, c, beta=1.0)
    np.testing.assert_allclose(c, 2 * (a @ b), rtol=1e-12)


def test_matmul_rejects_bad_shapes():
    with pytest.raises(ValueError, match="op\\(A\\)"):
        blas.matmul(np.zeros((3, 4)), np.zeros((5, 6)), np.zeros((3, 6)))
    with pytest.raises(ValueError, match="contiguous"):
        blas.matmul(np.zeros((3, 8))[:, ::2], np.zeros((4, 6)), np.zeros((3, 6)))
    with pytest.raises(ValueError, match="overlap"):
        blas.matmul(np.broadcast_to(np.zeros(4), (3, 4)), np.zeros((4, 6)), np.zeros((3, 6)))
    with pytest.raises(ValueError, match="overlap"):
        blas.matmul(np.zeros((3, 4))[::-1], np.zeros((4, 6)), np.zeros((3, 6)))


def test_thread_count_setting(threads):
    assert parallel.num_threads() >= 1
    threads(3)
    assert parallel.num_threads() == (3 if parallel.openmp_enabled() else 1)
    with pytest.raises(ValueError):
        parallel.set_num_threads(0)
