"""Convolution and InnerProduct layers: gradient checks, parameters, buffers and error messages."""
import numpy as np
import pytest
from google.protobuf import text_format
from threadpoolctl import threadpool_limits

from gradient_check import check_gradient, make_bottoms, setup_layer
from minicaffe import rng
from minicaffe.blob import Blob
from minicaffe.errors import LayerError
from minicaffe.kernels import parallel
from minicaffe.layer import create_layer
from minicaffe.layers import conv as conv_layer
from minicaffe.proto import minicaffe_pb2 as pb

FILLERS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


@pytest.fixture(autouse=True)
def single_threaded_blas():
    with threadpool_limits(1, "blas"):
        yield


def make_layer(text, kind="Convolution"):
    field = "convolution_param" if kind == "Convolution" else "inner_product_param"
    param = text_format.Parse(f'name: "l" type: "{kind}" {field} {{ {text} }}', pb.LayerParameter())
    return create_layer(param, pb.TRAIN)


@pytest.mark.parametrize("shape, text", [
    ((2, 3, 5, 5), "num_output: 4 kernel_size: 3 pad: 1"),
    ((2, 4, 5, 6), "num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 group: 2"),
    ((1, 2, 7, 7), "num_output: 3 kernel_size: 3 dilation: 2 pad: 2"),
    ((2, 2, 6, 7), "num_output: 2 kernel_size: 2 kernel_size: 3 stride: 2 stride: 3 dilation: 2 dilation: 1"),
    ((2, 4, 3, 3), "num_output: 3 kernel_size: 1 bias_term: false"),
    ((3, 3, 4, 4), "num_output: 3 kernel_size: 3 pad: 1 group: 3"),   # depthwise
])
def test_convolution_gradients(shape, text):
    rng.set_seed(0)
    layer = make_layer(f"{text} {FILLERS}")
    bottoms = make_bottoms([shape])
    tops = setup_layer(layer, bottoms, 1)
    check_gradient(layer, bottoms, tops)


def test_convolution_gradients_with_two_bottoms_sharing_weights():
    rng.set_seed(0)
    layer = make_layer(f"num_output: 2 kernel_size: 3 pad: 1 stride: 2 {FILLERS}")
    bottoms = make_bottoms([(1, 2, 5, 5), (1, 2, 5, 5)])
    tops = setup_layer(layer, bottoms, 2)
    check_gradient(layer, bottoms, tops)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_convolution_gradients_when_the_batch_does_not_divide_among_threads(num_threads):
    saved = parallel.num_threads()
    parallel.set_num_threads(num_threads)
    try:
        rng.set_seed(0)
        layer = make_layer(f"num_output: 3 kernel_size: 3 pad: 1 {FILLERS}")
        bottoms = make_bottoms([(2, 2, 4, 4)])
        tops = setup_layer(layer, bottoms, 1)
        check_gradient(layer, bottoms, tops)
    finally:
        parallel.set_num_threads(saved)


def test_convolution_float32_forward_matches_direct_sum():
    rng.set_seed(0)
    layer = make_layer(f"num_output: 4 kernel_size: 3 pad: 1 stride: 2 group: 2 {FILLERS}")
    bottom = make_bottoms([(3, 4, 7, 6)], dtype=np.float32)
    tops = setup_layer(layer, bottom, 1, dtype=np.float32)
    layer.forward(bottom, tops)
    x = np.pad(bottom[0].data.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    w, b = layer.blobs[0].data, layer.blobs[1].data
    expected = np.zeros((3, 4, 4, 3))
    for oh in range(4):
        for ow in range(3):
            window = x[:, :, 2 * oh:2 * oh + 3, 2 * ow:2 * ow + 3]
            for g in range(2):
                expected[:, 2 * g:2 * g + 2, oh, ow] = np.einsum(
                    "ncij,mcij->nm", window[:, 2 * g:2 * g + 2], w[2 * g:2 * g + 2])
    np.testing.assert_allclose(tops[0].data, expected + b[None, :, None, None], rtol=1e-5, atol=1e-5)


def test_convolution_blobs_fillers_and_defaults():
    rng.set_seed(3)
    layer = make_layer("num_output: 6 kernel_size: 5 group: 2 weight_filler { type: \"xavier\" }")
    tops = setup_layer(layer, make_bottoms([(2, 4, 9, 9)]), 1)
    assert tops[0].shape == (2, 6, 5, 5)
    assert [b.shape for b in layer.blobs] == [(6, 2, 5, 5), (6,)]
    assert np.all(np.abs(layer.blobs[0].data) <= np.sqrt(3 / 50)) and np.any(layer.blobs[0].data != 0)
    np.testing.assert_array_equal(layer.blobs[1].data, 0)   # no bias_filler: constant 0
    rng.set_seed(3)
    again = make_layer("num_output: 6 kernel_size: 5 group: 2 weight_filler { type: \"xavier\" }")
    setup_layer(again, make_bottoms([(2, 4, 9, 9)]), 1)
    np.testing.assert_array_equal(again.blobs[0].data, layer.blobs[0].data)


def test_convolution_keeps_its_buffers_across_iterations():
    layer = make_layer(f"num_output: 4 kernel_size: 3 {FILLERS}")
    bottoms = make_bottoms([(2, 3, 6, 6)])
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    layer.backward(tops, [True], bottoms)
    scratch = conv_layer._scratch.buffers[np.dtype(np.float64)]
    top_buffer = tops[0].data.__array_interface__["data"][0]
    for _ in range(3):
        layer.reshape(bottoms, tops)
        layer.forward(bottoms, tops)
        layer.backward(tops, [True], bottoms)
    assert conv_layer._scratch.buffers[np.dtype(np.float64)] is scratch
    assert tops[0].data.__array_interface__["data"][0] == top_buffer


def test_convolution_follows_a_new_input_shape():
    layer = make_layer(f"num_output: 2 kernel_size: 3 {FILLERS}")
    bottoms = make_bottoms([(1, 3, 5, 5)])
    tops = setup_layer(layer, bottoms, 1)
    bottoms[0].reshape((4, 3, 8, 7))
    layer.reshape(bottoms, tops)
    assert tops[0].shape == (4, 2, 6, 5)
    check_gradient(layer, bottoms, tops, max_checks=30)


@pytest.mark.parametrize("text, shape, message", [
    ("num_output: 4", (1, 3, 5, 5), "needs kernel_size, or kernel_h and kernel_w"),
    ("num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 3, 5, 5),
     "give kernel_size or kernel_h/kernel_w, not both"),
    ("num_output: 4 kernel_size: 3 kernel_size: 3 kernel_size: 3", (1, 3, 5, 5),
     "a 2-D convolution takes one or two"),
    ("num_output: 4 kernel_h: 3", (1, 3, 5, 5), "kernel size must be positive, got 3 x 0"),
    ("num_output: 4 kernel_size: 3 stride: 0", (1, 3, 5, 5), "stride must be positive"),
    ("num_output: 4 kernel_size: 3 dilation: 0", (1, 3, 5, 5), "dilation must be positive"),
    ("num_output: 0 kernel_size: 3", (1, 3, 5, 5), "num_output must be positive"),
    ("num_output: 4 kernel_size: 3 group: 2", (1, 3, 5, 5),
     "group 2 must divide both the input channels \\(3\\)"),
    ("num_output: 3 kernel_size: 3 group: 2", (1, 4, 5, 5), "and num_output \\(3\\)"),
    ("num_output: 4 kernel_size: 3 axis: 2", (1, 3, 5, 5), "axis 2 is not supported"),
    ("num_output: 4 kernel_size: 3", (1, 3, 5, 5, 5), "only 2-D convolution is supported"),
    ("num_output: 4 kernel_size: 7", (1, 3, 5, 5), "does not fit bottom shape \\(1, 3, 5, 5\\)"),
    ("num_output: 4 kernel_size: 3 weight_filler { type: \"gausian\" }", (1, 3, 5, 5),
     "weight_filler: unknown filler type 'gausian'"),
])
def test_convolution_errors(text, shape, message):
    layer = make_layer(text)
    with pytest.raises(LayerError, match=message) as info:
        setup_layer(layer, make_bottoms([shape]), 1)
    assert str(info.value).startswith("layer 'l' (Convolution): ") and "\n" not in str(info.value)


def test_convolution_rejects_inputs_that_no_longer_fit_its_weights():
    layer = make_layer("num_output: 4 kernel_size: 3")
    bottoms = make_bottoms([(1, 3, 5, 5)])
    tops = setup_layer(layer, bottoms, 1)
    bottoms[0].reshape((1, 2, 5, 5))
    with pytest.raises(LayerError,
                       match=r"bottom shape \(1, 2, 5, 5\) does not fit weight shape \(4, 3, 3, 3\)"):
        layer.reshape(bottoms, tops)
    two = make_bottoms([(1, 3, 5, 5), (1, 3, 6, 6)])
    layer = make_layer("num_output: 4 kernel_size: 3")
    with pytest.raises(LayerError, match=r"bottom 0 is \(1, 3, 5, 5\), bottom 1 is \(1, 3, 6, 6\)"):
        setup_layer(layer, two, 2)
    with pytest.raises(LayerError, match="one top per bottom"):
        setup_layer(make_layer("num_output: 4 kernel_size: 3"), two, 1)


# -- InnerProduct ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, text", [
    ((3, 2, 2, 2), "num_output: 4"),
    ((2, 3, 4), "num_output: 5 axis: 2"),
    ((2, 3, 4), "num_output: 3 axis: -1 transpose: true"),
    ((4, 6), "num_output: 3 bias_term: false"),
    ((2, 3, 2), "num_output: 2 transpose: true bias_term: false axis: 1"),
])
def test_inner_product_gradients(shape, text):
    rng.set_seed(0)
    layer = make_layer(f"{text} {FILLERS}", "InnerProduct")
    bottoms = make_bottoms([shape])
    tops = setup_layer(layer, bottoms, 1)
    check_gradient(layer, bottoms, tops)


@pytest.mark.parametrize("transpose", [False, True])
def test_inner_product_matches_numpy_in_float32(transpose):
    rng.set_seed(0)
    layer = make_layer(f"num_output: 7 transpose: {str(transpose).lower()} {FILLERS}", "InnerProduct")
    bottoms = make_bottoms([(5, 2, 3, 3)], dtype=np.float32)
    tops = setup_layer(layer, bottoms, 1, dtype=np.float32)
    assert tops[0].shape == (5, 7)
    assert layer.blobs[0].shape == ((18, 7) if transpose else (7, 18))
    layer.forward(bottoms, tops)
    w = layer.blobs[0].data.astype(np.float64)
    x = bottoms[0].data.reshape(5, 18).astype(np.float64)
    expected = x @ (w if transpose else w.T) + layer.blobs[1].data
    np.testing.assert_allclose(tops[0].data, expected, rtol=1e-5, atol=1e-5)


def test_inner_product_keeps_its_top_shape_before_axis():
    layer = make_layer("num_output: 5 axis: 2", "InnerProduct")
    tops = setup_layer(layer, make_bottoms([(2, 3, 4, 6)]), 1)
    assert tops[0].shape == (2, 3, 5)
    assert layer.blobs[0].shape == (5, 24)


@pytest.mark.parametrize("text, shape, message", [
    ("num_output: 0", (2, 3), "num_output must be positive"),
    ("num_output: 2 axis: 3", (2, 3), "axis 3 out of range for a blob of shape \\(2, 3\\)"),
    ("num_output: 2 weight_filler { type: \"bilinear\" }", (2, 3),
     "weight_filler: bilinear needs a 4-D blob"),
])
def test_inner_product_errors(text, shape, message):
    with pytest.raises(LayerError, match=message) as info:
        setup_layer(make_layer(text, "InnerProduct"), make_bottoms([shape]), 1)
    assert str(info.value).startswith("layer 'l' (InnerProduct): ") and "\n" not in str(info.value)


def test_inner_product_rejects_inputs_that_no_longer_fit_its_weights():
    layer = make_layer("num_output: 2", "InnerProduct")
    bottoms = make_bottoms([(2, 3, 4)])
    tops = setup_layer(layer, bottoms, 1)
    bottoms[0].reshape((2, 3, 5))
    with pytest.raises(LayerError, match=r"bottom shape \(2, 3, 5\) flattens from axis 1 to 15 inputs, "
                                         r"but weight shape \(2, 12\) takes 12"):
        layer.reshape(bottoms, tops)


def test_inner_product_batch_size_change_reuses_weights():
    layer = make_layer(f"num_output: 3 {FILLERS}", "InnerProduct")
    bottoms = make_bottoms([(2, 4)])
    tops = setup_layer(layer, bottoms, 1)
    bottoms[0].reshape((5, 4))
    bottoms[0].data[...] = np.random.default_rng(0).uniform(-1, 1, (5, 4))
    layer.reshape(bottoms, tops)
    assert tops[0].shape == (5, 3)
    check_gradient(layer, bottoms, tops)
