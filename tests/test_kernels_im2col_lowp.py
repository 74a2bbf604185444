"""im2col on 16-bit tensors (DFP16 int16 values, BF16 uint16 bits) against a NumPy reference and
against the float32 im2col on the same values."""
import numpy as np
import pytest

from minicaffe.kernels import im2col
from test_kernels_conv import im2col_ref

# (channels, height, width, kernel, pad, stride, dilation): small and odd images, rows narrower
# and wider than one 32-lane vector, padding wider than the kernel's reach, strides and dilations
GEOMETRIES = [
    (3, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 8, 8, (1, 1), (0, 0), (1, 1), (1, 1)),
    (4, 13, 7, (5, 3), (2, 1), (2, 1), (1, 1)),
    (2, 12, 12, (3, 3), (0, 0), (1, 1), (2, 2)),
    (1, 6, 40, (3, 5), (3, 4), (1, 1), (1, 1)),
    (3, 20, 70, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 17, 33, (7, 7), (3, 3), (2, 2), (1, 1)),
    (5, 5, 5, (2, 2), (1, 0), (3, 2), (2, 1)),
    (1, 4, 96, (1, 3), (0, 1), (1, 1), (1, 3)),
]


def run_im2col(x, kernel, pad, stride, dilation, col):
    im2col.im2col(x, kernel[0], kernel[1], pad[0], pad[1], stride[0], stride[1], dilation[0], dilation[1],
                  col)
    return col


def random_values(shape, dtype, rng):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_sixteen_bit_im2col(dtype, geometry, threads):
    c, h, w, kernel, pad, stride, dilation = geometry
    rng = np.random.default_rng(c * h * w)
    x = random_values((c, h, w), dtype, rng)
    expected = im2col_ref(x, kernel, pad, stride, dilation)
    rows, cols = expected.shape
    # the columns sit inside a larger buffer whose trailing rows must stay untouched
    sentinel = np.iinfo(dtype).max
    for n in (1, 2):
        threads(n)
        buffer = np.full((rows + 2, cols), sentinel, dtype)
        col = run_im2col(x, kernel, pad, stride, dilation, buffer[:rows])
        np.testing.assert_array_equal(col, expected)
        assert np.all(buffer[rows:] == sentinel)
    # the float32 kernel lowers the same values to the same places
    as_float = run_im2col(x.astype(np.float32), kernel, pad, stride, dilation,
                          np.empty((rows, cols), np.float32))
    np.testing.assert_array_equal(col.astype(np.float32), as_float)


def test_mismatched_types_and_shapes_are_rejected():
    x = np.zeros((2, 5, 5), np.int16)
    with pytest.raises(ValueError, match="dtype mismatch"):
        im2col.im2col(x, 3, 3, 0, 0, 1, 1, 1, 1, np.empty((18, 9), np.uint16))
    with pytest.raises(ValueError, match="col has shape"):
        im2col.im2col(x, 3, 3, 0, 0, 1, 1, 1, 1, np.empty((18, 10), np.int16))
