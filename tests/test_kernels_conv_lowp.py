"""conv_lowp's forward, backward-data and backward-weights against exact NumPy references.

Operands are small integers, so every sum is an exact integer in INT32, in FP32 and in BF16 products:
the kernels must then match an int64 reference bit for bit, whatever the path (weights packed once,
backward-data as the convolution of dy with the flipped weights, or W^T @ dy with col2im),
the chunking, the GEMM variant and the thread count. Where stride and dilation along the width are 1,
the GEMM packs x (and dy, for the flipped backward-data) straight from a zero-padded copy instead of
an im2col column matrix; the cases include odd output widths (pairs of outputs straddle two rows),
output rows shorter and longer than a 32-column panel, and strides and dilations along the height.
"""
import numpy as np
import pytest

from minicaffe.kernels import conv_lowp, lowp_gemm, parallel

# (x shape, w shape, pad, stride, dilation, group), and the backward-data method it must take.
CASES = [
    ((2, 4, 7, 6), (6, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1, "flipped"),
    ((3, 6, 9, 8), (4, 3, 3, 2), (1, 0), (1, 1), (1, 1), 2, "flipped"),       # groups, 3x2 kernel
    ((2, 3, 9, 9), (2, 3, 3, 3), (2, 1), (1, 1), (2, 2), 1, "flipped"),       # dilation
    ((2, 4, 16, 16), (4, 4, 5, 5), (2, 2), (1, 1), (1, 1), 1, "flipped"),     # CIFAR-10 quick's kernel
    ((2, 2, 6, 6), (8, 2, 3, 3), (1, 1), (1, 1), (1, 1), 1, "columns"),       # dy has more to lower
    ((2, 4, 6, 6), (3, 4, 3, 3), (3, 3), (1, 1), (1, 1), 1, "columns"),       # padding beyond the kernel
    ((3, 4, 9, 9), (4, 2, 3, 3), (1, 1), (2, 2), (1, 1), 2, "columns"),       # stride
    ((2, 8, 5, 5), (5, 8, 1, 1), (0, 0), (1, 1), (1, 1), 1, "pointwise"),
    ((2, 3, 7, 37), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1, "flipped"),       # odd rows of 37 outputs
    ((2, 5, 6, 34), (3, 5, 3, 2), (0, 1), (2, 1), (1, 1), 1, "columns"),       # stride along the height
    ((2, 3, 11, 20), (4, 3, 3, 3), (2, 1), (1, 1), (2, 1), 1, "flipped"),      # dilation along the height
    ((2, 2, 5, 34), (3, 2, 3, 3), (1, 1), (1, 1), (1, 1), 1, "flipped"),       # 32 outputs in one row
    ((2, 3, 8, 8), (2, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1, "flipped"),        # 32 outputs in 4 rows
]


def packs_from_image(case):
    _, w_shape, pad, stride, dil, _, _ = case
    pointwise = w_shape[2:] == (1, 1) and pad == (0, 0) and stride == (1, 1)
    return not pointwise and stride[1] == 1 and dil[1] == 1


def out_size(size, k, pad, stride, dil):
    return (size + 2 * pad - (dil * (k - 1) + 1)) // stride + 1


def windows(x_shape, w_shape, pad, stride, dil):
    """Yields (kernel tap i, j, padded-input slice of the outputs' window pixels) for every tap."""
    oh = out_size(x_shape[2], w_shape[2], pad[0], stride[0], dil[0])
    ow = out_size(x_shape[3], w_shape[3], pad[1], stride[1], dil[1])
    for i in range(w_shape[2]):
        for j in range(w_shape[3]):
            rows = slice(i * dil[0], i * dil[0] + stride[0] * (oh - 1) + 1, stride[0])
            cols = slice(j * dil[1], j * dil[1] + stride[1] * (ow - 1) + 1, stride[1])
            yield i, j, rows, cols


def reference(x, w, dy, pad, stride, dil, group):
    """(y, dx, dw) in int64: y = conv(x, w); dx, dw the adjoints against dy."""
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    mg = m // group
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    dxp = np.zeros_like(xp)
    y = np.zeros(dy.shape, np.int64)
    dw = np.zeros(w.shape, np.int64)
    for g in range(group):
        ci, mo = slice(g * cg, (g + 1) * cg), slice(g * mg, (g + 1) * mg)
        for i, j, rows, cols in windows(x.shape, w.shape, pad, stride, dil):
            patch = xp[:, ci, rows, cols]
            y[:, mo] += np.einsum("nchw,mc->nmhw", patch, w[mo, :, i, j])
            dxp[:, ci, rows, cols] += np.einsum("nmhw,mc->nchw", dy[:, mo], w[mo, :, i, j])
            dw[mo, :, i, j] += np.einsum("nmhw,nchw->mc", dy[:, mo], patch)
    return y, dxp[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + wd], dw


def operands(case, seed, high):
    x_shape, w_shape, pad, stride, dil, group, _ = case
    r = np.random.default_rng(seed)
    oh = out_size(x_shape[2], w_shape[2], pad[0], stride[0], dil[0])
    ow = out_size(x_shape[3], w_shape[3], pad[1], stride[1], dil[1])
    x = r.integers(-high, high + 1, x_shape)
    w = r.integers(-high, high + 1, w_shape)
    dy = r.integers(-high, high + 1, (x_shape[0], w_shape[0], oh, ow))
    return x, w, dy


def as_bf16(a):
    """Small integers as BF16 bit patterns (exact: they have at most 8 significant bits)."""
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def run(case, x16, w16, dy16, k_chunk=0, debug_overflow=False, threads=None):
    x_shape, w_shape, pad, stride, dil, group, method = case
    geometry = (pad, stride, dil, group)
    assert conv_lowp.conv_lowp_backward_data_method(x_shape, w_shape, *geometry) == method
    workspace = np.empty(conv_lowp.conv_lowp_workspace_bytes(x_shape, w_shape, *geometry, threads=threads),
                         np.uint8)
    y = np.empty(dy16.shape, np.float32)
    dx = np.full(x_shape, np.nan, np.float32)    # overwritten
    dw = np.ones(w_shape, np.float32)            # accumulated into
    bias = np.arange(w_shape[0], dtype=np.float32)
    events = conv_lowp.conv_forward_lowp(x16, w16, bias, y, 0.5, *geometry, k_chunk, debug_overflow, workspace)
    events += conv_lowp.conv_backward_lowp(x16, w16, dy16, dx, dw, 0.25, 2.0, *geometry, k_chunk,
                                           debug_overflow, workspace)
    return y, dx, dw, events


def expected(case, x, w, dy):
    y, dx, dw = reference(x, w, dy, *case[2:6])
    return (0.5 * y + np.arange(w.shape[0])[None, :, None, None], 0.25 * dx, 1 + 2.0 * dw)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", lowp_gemm.supported_variants()["s16"])
@pytest.mark.parametrize("k_chunk", [0, 7, 66])
def test_dfp16_matches_exact_reference(case, variant, k_chunk):
    x, w, dy = operands(case, 0, 60)
    with lowp_gemm.forced_variant("s16", variant):
        got = run(case, *(a.astype(np.int16) for a in (x, w, dy)), k_chunk=k_chunk)
    for name, actual, want in zip(("y", "dx", "dw"), got, expected(case, x, w, dy)):
        np.testing.assert_array_equal(actual, want, err_msg=name)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", lowp_gemm.supported_variants()["bf16"])
def test_bf16_matches_exact_reference(case, variant):
    x, w, dy = operands(case, 1, 16)
    with lowp_gemm.forced_variant("bf16", variant):
        got = run(case, as_bf16(x), as_bf16(w), as_bf16(dy))
    for name, actual, want in zip(("y", "dx", "dw"), got, expected(case, x, w, dy)):
        np.testing.assert_array_equal(actual, want, err_msg=name)


# CASES[8] with 7 images: weight-gradient blocks of several images, split over 1, 2 or 3 threads.
@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[8], ((7,) + CASES[8][0][1:],) + CASES[8][1:]])
def test_results_do_not_depend_on_the_thread_count(case):
    x, w, dy = operands(case, 2, 30000)
    operands16 = [a.astype(np.int16) for a in (x, w, dy)]
    previous = parallel.num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            parallel.set_num_threads(threads)
            results.append(run(case, *operands16, k_chunk=64, threads=threads))
    finally:
        parallel.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0][:3], other[:3]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", CASES)
def test_packing_from_the_image_is_taken_where_it_applies(case):
    assert conv_lowp.conv_lowp_packs_from_image(*case[:6]) == packs_from_image(case)


@pytest.mark.parametrize("case", [c for c in CASES if packs_from_image(c)])
@pytest.mark.parametrize("kind", ["s16", "bf16"])
def test_packing_from_the_image_matches_im2col_bit_for_bit(case, kind):
    # Large operands: FP32 rounds the sums, so the two paths must add the same products in the same order.
    x, w, dy = operands(case, 3, 30000)
    operands16 = [a.astype(np.int16) if kind == "s16" else as_bf16(a) for a in (x, w, dy)]
    results = []
    try:
        for packing in (True, False):
            conv_lowp.set_image_packing(packing)
            assert conv_lowp.conv_lowp_packs_from_image(*case[:6]) == packing
            results.append(run(case, *operands16, k_chunk=66))
    finally:
        conv_lowp.set_image_packing(True)
    for name, packed, lowered in zip(("y", "dx", "dw"), *results):
        np.testing.assert_array_equal(packed, lowered, err_msg=name)


def test_flipped_backward_data_counts_overflow_and_chunking_prevents_it():
    # 9 products of 32767^2 overflow INT32 in one sum; chunks of 2 products cannot.
    case = ((1, 1, 5, 5), (1, 1, 3, 3), (1, 1), (1, 1), (1, 1), 1, "flipped")
    x = np.zeros((1, 1, 5, 5), np.int64)
    w = np.full((1, 1, 3, 3), 32767)
    dy = np.full((1, 1, 5, 5), 32767)
    x16, w16, dy16 = (a.astype(np.int16) for a in (x, w, dy))
    _, _, _, events = run(case, x16, w16, dy16, k_chunk=0, debug_overflow=True)
    assert events > 0
    _, dx, _, events = run(case, x16, w16, dy16, k_chunk=2, debug_overflow=True)
    assert events == 0
    np.testing.assert_allclose(dx, expected(case, x, w, dy)[1], rtol=1e-6)


def test_workspace_too_small_is_refused():
    case = CASES[0]
    x, w, dy = (a.astype(np.int16) for a in operands(case, 0, 5))
    with pytest.raises(ValueError, match="workspace"):
        conv_lowp.conv_backward_lowp(x, w, dy, np.empty(x.shape, np.float32), None, 1.0, 1.0, *case[2:6], 0,
                                     False, np.empty(16, np.uint8))
