"""Deconvolution, LRN, BatchNorm, Scale, Bias and STOCHASTIC pooling layers: gradient checks (float64
finite differences), Caffe's semantics against NumPy, buffers, and the errors a user can cause."""
import tracemalloc

import numpy as np
import pytest
from google.protobuf import text_format
from threadpoolctl import threadpool_limits

from gradient_check import check_gradient, check_net_gradient, make_bottoms, setup_layer
from minicaffe import rng
from minicaffe.blob import blob_dtype
from minicaffe.errors import LayerError
from minicaffe.layer import create_layer
from minicaffe.layers import conv as conv_layer
from minicaffe.net import Net
from minicaffe.proto import minicaffe_pb2 as pb
from test_kernels_vision import ref_lrn_across, ref_lrn_within, ref_stochastic_test

FILLERS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


@pytest.fixture(autouse=True)
def single_threaded_blas():
    with threadpool_limits(1, "blas"):
        yield


def make_layer(text, phase=pb.TRAIN):
    return create_layer(text_format.Parse(text, pb.LayerParameter()), phase)


def assert_one_line_naming(info, name, type_name):
    assert str(info.value).startswith(f"layer '{name}' ({type_name}): ") and "\n" not in str(info.value)


# -- Deconvolution ---------------------------------------------------------------------------------

def deconv(text):
    return make_layer(f'name: "up" type: "Deconvolution" convolution_param {{ {text} }}')


def ref_deconvolution(x, w, b, stride, pad, dilation, group):
    """Scatters every input pixel times its filter into the output, then crops the padding."""
    n, channels, height, width = x.shape
    _, per_group, kh, kw = w.shape
    full = np.zeros((n, per_group * group, (height - 1) * stride[0] + dilation[0] * (kh - 1) + 1,
                     (width - 1) * stride[1] + dilation[1] * (kw - 1) + 1))
    in_group = channels // group
    for g in range(group):
        xs = x[:, g * in_group:(g + 1) * in_group].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                h0, w0 = i * dilation[0], j * dilation[1]
                full[:, g * per_group:(g + 1) * per_group,
                     h0:h0 + (height - 1) * stride[0] + 1:stride[0],
                     w0:w0 + (width - 1) * stride[1] + 1:stride[1]] += np.einsum(
                         "nchw,cm->nmhw", xs, w[g * in_group:(g + 1) * in_group, :, i, j])
    out = full[:, :, pad[0]:full.shape[2] - pad[0], pad[1]:full.shape[3] - pad[1]]
    return out + (b[None, :, None, None] if b is not None else 0)


@pytest.mark.parametrize("shape, text", [
    ((2, 3, 3, 3), "num_output: 2 kernel_size: 3"),
    ((2, 4, 3, 4), "num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2"),
    ((1, 2, 3, 3), "num_output: 3 kernel_h: 2 kernel_w: 3 stride_h: 3 stride_w: 2 pad_h: 1 pad_w: 0"),
    ((2, 2, 3, 4), "num_output: 2 kernel_size: 3 dilation: 2 stride: 2 pad: 1"),
    ((2, 4, 3, 3), "num_output: 3 kernel_size: 1 bias_term: false"),
    ((1, 3, 2, 3), "num_output: 3 kernel_size: 4 stride: 2 pad: 1 group: 3"),   # depthwise upsampling
])
def test_deconvolution_gradients(shape, text):
    rng.set_seed(0)
    layer = deconv(f"{text} {FILLERS}")
    bottoms = make_bottoms([shape])
    tops = setup_layer(layer, bottoms, 1)
    check_gradient(layer, bottoms, tops)


def test_deconvolution_gradients_with_two_bottoms_sharing_weights():
    rng.set_seed(0)
    layer = deconv(f"num_output: 2 kernel_size: 3 stride: 2 {FILLERS}")
    bottoms = make_bottoms([(1, 2, 3, 3), (1, 2, 3, 3)])
    tops = setup_layer(layer, bottoms, 2)
    check_gradient(layer, bottoms, tops)


@pytest.mark.parametrize("text, stride, pad, dilation, group", [
    ("num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2", (2, 2), (1, 1), (1, 1), 2),
    ("num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 3 dilation: 2", (1, 3), (0, 0), (2, 2), 1),
    ("num_output: 5 kernel_size: 1", (1, 1), (0, 0), (1, 1), 1),
])
def test_deconvolution_matches_a_direct_transposed_convolution(text, stride, pad, dilation, group):
    rng.set_seed(1)
    layer = deconv(f"{text} {FILLERS}")
    bottoms = make_bottoms([(3, 4, 5, 6)], dtype=np.float32)
    tops = setup_layer(layer, bottoms, 1, dtype=np.float32)
    layer.forward(bottoms, tops)
    expected = ref_deconvolution(bottoms[0].data, layer.blobs[0].data, layer.blobs[1].data, stride, pad,
                                 dilation, group)
    assert tops[0].shape == expected.shape
    np.testing.assert_allclose(tops[0].data, expected, rtol=1e-5, atol=1e-5)


def test_deconvolution_is_the_adjoint_of_convolution():
    """<deconv(x), y> = <x, conv(y)> with the same weights: the weight layouts line up as Caffe's."""
    rng.set_seed(2)
    geometry = "kernel_size: 3 stride: 2 pad: 1 dilation: 1 group: 2 bias_term: false"
    up = deconv(f"num_output: 6 {geometry} {FILLERS}")
    x = make_bottoms([(2, 4, 4, 5)], seed=3)
    up_top = setup_layer(up, x, 1)
    down = make_layer(f'name: "down" type: "Convolution" convolution_param {{ num_output: 4 {geometry} }}')
    y = make_bottoms([up_top[0].shape], seed=4)
    down_top = setup_layer(down, y, 1)
    assert down.blobs[0].shape == up.blobs[0].shape == (4, 3, 3, 3)
    down.blobs[0].data[...] = up.blobs[0].data
    up.forward(x, up_top)
    down.forward(y, down_top)
    assert down_top[0].shape == x[0].shape
    np.testing.assert_allclose(np.vdot(up_top[0].data, y[0].data), np.vdot(x[0].data, down_top[0].data),
                               rtol=1e-12)


def test_deconvolution_shapes_blobs_and_bilinear_upsampling():
    layer = deconv('num_output: 3 kernel_size: 4 stride: 2 pad: 1 group: 3 bias_term: false '
                   'weight_filler { type: "bilinear" }')
    bottoms = make_bottoms([(1, 3, 5, 7)])
    tops = setup_layer(layer, bottoms, 1)
    assert tops[0].shape == (1, 3, 10, 14)          # (5 - 1) * 2 - 2 + 4
    assert [b.shape for b in layer.blobs] == [(3, 1, 4, 4)]
    bottoms[0].data[...] = 2.0
    layer.forward(bottoms, tops)
    # Bilinear upsampling of a constant image is that constant away from the borders.
    np.testing.assert_allclose(tops[0].data[:, :, 1:-1, 1:-1], 2.0)
    layer = deconv(f"num_output: 4 kernel_size: 3 stride: 3 dilation: 2 group: 2 {FILLERS}")
    tops = setup_layer(layer, make_bottoms([(2, 6, 2, 3)]), 1)
    assert tops[0].shape == (2, 4, 8, 11)           # (H - 1) * 3 + 2 * (3 - 1) + 1
    assert [b.shape for b in layer.blobs] == [(6, 2, 3, 3), (4,)]


def test_deconvolution_keeps_its_buffers_across_iterations():
    layer = deconv(f"num_output: 4 kernel_size: 3 stride: 2 {FILLERS}")
    bottoms = make_bottoms([(2, 3, 4, 4)])
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


@pytest.mark.parametrize("text, shape, message", [
    ("num_output: 4 kernel_size: 3 group: 2", (1, 3, 5, 5), "group 2 must divide both the input channels \\(3\\)"),
    ("num_output: 4", (1, 3, 5, 5), "needs kernel_size"),
    ("num_output: 4 kernel_size: 3 pad: 3", (1, 3, 1, 1), "does not fit bottom shape \\(1, 3, 1, 1\\)"),
    ("num_output: 0 kernel_size: 3", (1, 3, 5, 5), "num_output must be positive"),
    ("num_output: 4 kernel_size: 3", (1, 3, 5), "needs a 4-D bottom"),
])
def test_deconvolution_errors(text, shape, message):
    with pytest.raises(LayerError, match=message) as info:
        setup_layer(deconv(text), make_bottoms([shape]), 1)
    assert_one_line_naming(info, "up", "Deconvolution")


def test_deconvolution_rejects_inputs_that_no_longer_fit_its_weights():
    layer = deconv("num_output: 4 kernel_size: 3 group: 2")
    bottoms = make_bottoms([(1, 6, 3, 3)])
    tops = setup_layer(layer, bottoms, 1)
    bottoms[0].reshape((1, 4, 3, 3))
    with pytest.raises(LayerError, match=r"bottom shape \(1, 4, 3, 3\) does not fit weight shape "
                                         r"\(6, 2, 3, 3\) with group 2: expected 6 channels"):
        layer.reshape(bottoms, tops)


# -- LRN -------------------------------------------------------------------------------------------

def lrn_layer(text=""):
    return make_layer(f'name: "norm" type: "LRN" lrn_param {{ {text} }}')


@pytest.mark.parametrize("shape, text", [
    ((2, 7, 3, 4), "local_size: 5 alpha: 0.8 beta: 0.75 k: 2"),
    ((2, 3, 2, 3), "local_size: 3 alpha: 2 beta: 0.6"),
    ((1, 4, 2, 2), "local_size: 7 alpha: 0.5 beta: 1"),
    ((2, 2, 4, 5), "local_size: 3 alpha: 0.9 beta: 0.75 norm_region: WITHIN_CHANNEL"),
    ((1, 2, 3, 4), "local_size: 5 alpha: 1.5 beta: 0.5 norm_region: WITHIN_CHANNEL"),
])
def test_lrn_gradients(shape, text):
    layer = lrn_layer(text)
    bottoms = make_bottoms([shape], low=-2, high=2)
    tops = setup_layer(layer, bottoms, 1)
    check_gradient(layer, bottoms, tops)


def test_lrn_values_follow_caffe():
    bottoms = make_bottoms([(2, 6, 3, 3)], dtype=np.float32, low=-3, high=3)
    layer = lrn_layer()                              # defaults: local_size 5, alpha 1, beta 0.75, k 1
    tops = setup_layer(layer, bottoms, 1, dtype=np.float32)
    layer.forward(bottoms, tops)
    np.testing.assert_allclose(tops[0].data, ref_lrn_across(bottoms[0].data, 5, 1.0, 0.75, 1.0)[0], rtol=1e-5)
    # WITHIN_CHANNEL takes no k, as Caffe's composition of Power, Pooling and Eltwise layers.
    layer = lrn_layer("local_size: 3 alpha: 0.5 norm_region: WITHIN_CHANNEL k: 7")
    tops = setup_layer(layer, bottoms, 1, dtype=np.float32)
    layer.forward(bottoms, tops)
    expected = ref_lrn_within(bottoms[0].data.reshape(12, 3, 3), 3, 0.5, 0.75)[0].reshape(2, 6, 3, 3)
    np.testing.assert_allclose(tops[0].data, expected, rtol=1e-5)


def test_lrn_errors():
    with pytest.raises(LayerError, match="local_size must be odd, got 4") as info:
        setup_layer(lrn_layer("local_size: 4"), make_bottoms([(1, 3, 2, 2)]), 1)
    assert_one_line_naming(info, "norm", "LRN")
    with pytest.raises(LayerError, match=r"needs a 4-D bottom .* got shape \(3, 2\)"):
        setup_layer(lrn_layer(), make_bottoms([(3, 2)]), 1)
    bottoms = make_bottoms([(1, 3, 2, 2)])
    with pytest.raises(LayerError, match="cannot run in place"), blob_dtype(np.float64):
        lrn_layer().layer_setup(bottoms, bottoms)


# -- BatchNorm -------------------------------------------------------------------------------------

def batch_norm(text="", phase=pb.TRAIN):
    return make_layer(f'name: "bn" type: "BatchNorm" batch_norm_param {{ {text} }}', phase)


def fill_statistics(layer, seed=5):
    generator = np.random.default_rng(seed)
    channels = layer.blobs[0].count
    layer.blobs[0].data[...] = generator.standard_normal(channels) * 3
    layer.blobs[1].data[...] = generator.uniform(1, 6, channels)
    layer.blobs[2].data[...] = 3.0


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (6, 4), (3, 2, 5)])
@pytest.mark.parametrize("text, phase", [("", pb.TRAIN), ("", pb.TEST), ("use_global_stats: true", pb.TRAIN)])
def test_batch_norm_gradients(shape, text, phase):
    layer = batch_norm(text, phase)
    bottoms = make_bottoms([shape], low=-2, high=3)
    tops = setup_layer(layer, bottoms, 1)
    fill_statistics(layer)
    sentinels = [np.full(b.shape, 7.0) for b in layer.blobs]
    for blob, sentinel in zip(layer.blobs, sentinels):
        blob.diff[...] = sentinel
    # The statistics are not parameters of the output's gradient: check the bottom only, ...
    check_gradient(layer, bottoms, tops, check_params=False)
    for blob in layer.blobs:
        blob.diff[...] = 7.0
    layer.forward(bottoms, tops)
    tops[0].diff[...] = 1.0
    layer.backward(tops, [True], bottoms)
    # ... and backward leaves their diffs alone, so no solver can move them.
    for blob, sentinel in zip(layer.blobs, sentinels):
        np.testing.assert_array_equal(blob.diff, sentinel)


def test_batch_norm_running_statistics_follow_caffe_over_three_iterations():
    layer = batch_norm("moving_average_fraction: 0.9 eps: 0.001")
    bottoms = make_bottoms([(4, 3, 2, 2)], dtype=np.float32)
    tops = setup_layer(layer, bottoms, 1, dtype=np.float32)
    fraction, eps = np.float32(0.9), np.float32(0.001)
    mean_sum, variance_sum, weight = np.zeros(3), np.zeros(3), 0.0
    generator = np.random.default_rng(6)
    for _ in range(3):
        x = generator.normal(2.0, 3.0, size=(4, 3, 2, 2)).astype(np.float32)
        bottoms[0].data[...] = x
        layer.forward(bottoms, tops)
        x64 = x.astype(np.float64)
        mean = x64.mean(axis=(0, 2, 3))
        variance = x64.var(axis=(0, 2, 3))
        np.testing.assert_allclose(tops[0].data, (x64 - mean[:, None, None]) / np.sqrt(variance + eps)[:, None, None],
                                   rtol=1e-5, atol=1e-5)
        m = 4 * 2 * 2
        weight = weight * fraction + 1
        mean_sum = mean_sum * fraction + mean
        variance_sum = variance_sum * fraction + variance * m / (m - 1)
        np.testing.assert_allclose(layer.blobs[2].data, [weight], rtol=1e-6)
        np.testing.assert_allclose(layer.blobs[0].data, mean_sum, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.blobs[1].data, variance_sum, rtol=1e-5)
    # A TEST-phase layer with these blobs normalizes by the estimates: the sums over their weight.
    test_layer = batch_norm("eps: 0.001", pb.TEST)
    test_top = setup_layer(test_layer, bottoms, 1, dtype=np.float32)
    for mine, trained in zip(test_layer.blobs, layer.blobs):
        mine.data[...] = trained.data
    test_layer.forward(bottoms, test_top)
    mean_estimate, variance_estimate = mean_sum / weight, variance_sum / weight
    expected = (bottoms[0].data - mean_estimate[:, None, None]) / np.sqrt(variance_estimate + eps)[:, None, None]
    np.testing.assert_allclose(test_top[0].data, expected, rtol=1e-5, atol=1e-5)


def test_batch_norm_blobs_defaults_and_frozen_statistics():
    layer = batch_norm(phase=pb.TEST)
    setup_layer(layer, make_bottoms([(2, 5, 3)]), 1)
    assert layer.use_global_stats and layer.eps == pytest.approx(1e-5)
    assert layer.moving_average_fraction == pytest.approx(0.999)
    assert [b.shape for b in layer.blobs] == [(5,), (5,), (1,)]
    assert all(not b.data.any() for b in layer.blobs)
    assert [spec.lr_mult for spec in layer.param.param] == [0, 0, 0]
    train = batch_norm()
    setup_layer(train, make_bottoms([(2, 5)]), 1)
    assert not train.use_global_stats
    given = make_layer('name: "bn" type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 0 decay_mult: 0 }')
    setup_layer(given, make_bottoms([(2, 5)]), 1)
    assert [(s.lr_mult, s.decay_mult) for s in given.param.param] == [(0, 1), (0, 0), (0, 1)]
    learned = make_layer('name: "bn" type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 1 }')
    with pytest.raises(LayerError, match="param 1 has lr_mult 1: the mean, variance and scale factor are "
                                         "statistics") as info:
        setup_layer(learned, make_bottoms([(2, 5)]), 1)
    assert_one_line_naming(info, "bn", "BatchNorm")


def test_batch_norm_in_a_net_is_not_learned():
    net = Net(text_format.Parse("""
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 2 dim: 2 } } }
        layer { name: "bn" type: "BatchNorm" bottom: "data" top: "data" }
        layer { name: "scale" type: "Scale" bottom: "data" top: "data" scale_param { bias_term: true } }
        layer { name: "loss" type: "EuclideanLoss" bottom: "data" bottom: "data" top: "loss" }
    """, pb.NetParameter()), phase=pb.TRAIN)
    bn_blobs = [id(b) for b in net.params["bn"]]
    rates = {id(b): rate for b, rate in zip(net.learnable_params, net.params_lr)}
    assert [rates[i] for i in bn_blobs] == [0, 0, 0]
    assert [rates[id(b)] for b in net.params["scale"]] == [1, 1]


def test_in_place_batch_norm_scale_relu_chain_gradient():
    """ResNet's in-place BatchNorm -> Scale -> ReLU: each layer overwrites what the previous one
    produced, so BatchNorm must keep its normalized output and Scale its input."""
    rng.set_seed(4)
    with blob_dtype(np.float64):
        net = Net(text_format.Parse("""
            layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 2 dim: 3 dim: 3 } } }
            layer { name: "target" type: "Input" top: "target" input_param { shape { dim: 4 dim: 2 dim: 3 dim: 3 } } }
            layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
                    convolution_param { num_output: 2 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" } } }
            layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
            layer { name: "scale" type: "Scale" bottom: "conv" top: "conv"
                    scale_param { bias_term: true filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
            layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
            layer { name: "loss" type: "EuclideanLoss" bottom: "conv" bottom: "target" top: "loss" }
        """, pb.NetParameter()), phase=pb.TRAIN)
    generator = np.random.default_rng(12)
    net.blobs["data"].data[...] = generator.standard_normal(net.blobs["data"].shape)
    net.blobs["target"].data[...] = generator.standard_normal(net.blobs["target"].shape)
    check_net_gradient(net, [net.params["conv"][0], *net.params["scale"]], step=1e-6, tolerance=1e-5)


def test_batch_norm_in_place_equals_out_of_place():
    bottoms = make_bottoms([(3, 2, 2, 3)], seed=7)
    copy = make_bottoms([(3, 2, 2, 3)], seed=7)
    apart, inplace = batch_norm(), batch_norm()
    tops = setup_layer(apart, bottoms, 1)
    with blob_dtype(np.float64):
        inplace.layer_setup(copy, copy)
    apart.forward(bottoms, tops)
    inplace.forward(copy, copy)
    np.testing.assert_array_equal(copy[0].data, tops[0].data)
    diff = np.random.default_rng(8).standard_normal(tops[0].shape)
    tops[0].diff[...] = diff
    copy[0].diff[...] = diff
    apart.backward(tops, [True], bottoms)
    inplace.backward(copy, [True], copy)
    np.testing.assert_allclose(copy[0].diff, bottoms[0].diff, rtol=1e-12, atol=1e-14)


def test_batch_norm_rejects_a_new_channel_count():
    layer = batch_norm()
    bottoms = make_bottoms([(2, 3, 2)])
    tops = setup_layer(layer, bottoms, 1)
    bottoms[0].reshape((2, 4, 2))
    with pytest.raises(LayerError, match=r"bottom shape \(2, 4, 2\) has 4 channels \(axis 1\), the statistics 3"):
        layer.reshape(bottoms, tops)


# -- Scale and Bias --------------------------------------------------------------------------------

def scale_layer(text=""):
    return make_layer(f'name: "sc" type: "Scale" scale_param {{ {text} }}')


def bias_layer(text=""):
    return make_layer(f'name: "bi" type: "Bias" bias_param {{ {text} }}')


GAUSSIAN = 'filler { type: "gaussian" std: 1 }'
SCALE_CASES = [
    # (bottom shapes, scale_param, the learned or given operand's shape)
    ([(2, 3, 4, 2)], f"bias_term: true {GAUSSIAN} bias_filler {{ type: 'gaussian' }}", (3,)),
    ([(2, 3, 4)], f"axis: 0 num_axes: -1 {GAUSSIAN}", (2, 3, 4)),
    ([(2, 3, 4)], f"num_axes: 0 bias_term: true {GAUSSIAN} bias_filler {{ type: 'gaussian' }}", ()),
    ([(2, 3, 4, 5)], f"axis: -2 num_axes: 2 {GAUSSIAN}", (4, 5)),
    ([(2, 3, 4, 5)], f"axis: 2 {GAUSSIAN}", (4,)),
    ([(2, 3, 4), (3,)], "", (3,)),
    ([(2, 3, 4), (2, 3)], "axis: 0 bias_term: true bias_filler { type: 'gaussian' }", (2, 3)),
    ([(2, 3, 4), ()], "axis: 2", ()),
    ([(2, 3, 4, 2), (4, 2)], "axis: -2", (4, 2)),
]


def broadcast(operand, bottom_shape, axis):
    """The operand reshaped to broadcast against the bottom, from ``axis`` (0 for a scalar)."""
    axis = 0 if operand.ndim == 0 else axis % len(bottom_shape)
    return operand.reshape((1,) * axis + operand.shape + (1,) * (len(bottom_shape) - axis - operand.ndim))


@pytest.mark.parametrize("shapes, text, operand_shape", SCALE_CASES)
def test_scale_gradients(shapes, text, operand_shape):
    rng.set_seed(0)
    layer = scale_layer(text)
    bottoms = make_bottoms(shapes)
    tops = setup_layer(layer, bottoms, 1)
    assert (layer.blobs[0].shape if len(shapes) == 1 else shapes[1]) == operand_shape
    check_gradient(layer, bottoms, tops)


@pytest.mark.parametrize("shapes, text, operand_shape", SCALE_CASES)
def test_scale_forward_broadcasts_as_caffe(shapes, text, operand_shape):
    rng.set_seed(1)
    layer = scale_layer(text)
    bottoms = make_bottoms(shapes)
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    axis = layer.param.scale_param.axis
    scale = layer.blobs[0].data if len(shapes) == 1 else bottoms[1].data
    expected = bottoms[0].data * broadcast(scale, shapes[0], axis)
    if layer.bias_term:
        assert layer.blobs[-1].shape == operand_shape
        expected = expected + broadcast(layer.blobs[-1].data, shapes[0], axis)
    np.testing.assert_allclose(tops[0].data, expected, rtol=1e-12)


def test_scale_default_fillers_are_identity():
    layer = scale_layer("bias_term: true")
    bottoms = make_bottoms([(2, 3, 2)])
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    np.testing.assert_array_equal(tops[0].data, bottoms[0].data)
    assert [b.shape for b in layer.blobs] == [(3,), (3,)]


@pytest.mark.parametrize("text, shapes", [
    (f"bias_term: true {GAUSSIAN} bias_filler {{ type: 'gaussian' }}", [(2, 3, 4)]),
    ("axis: 0", [(2, 3, 4), (2, 3)]),
])
def test_scale_in_place_equals_out_of_place(text, shapes):
    rng.set_seed(2)
    apart = scale_layer(text)
    bottoms = make_bottoms(shapes, seed=9)
    tops = setup_layer(apart, bottoms, 1)
    rng.set_seed(2)
    inplace = scale_layer(text)
    copy = make_bottoms(shapes, seed=9)
    with blob_dtype(np.float64):
        inplace.layer_setup(copy, [copy[0]])
    apart.forward(bottoms, tops)
    inplace.forward(copy, [copy[0]])
    np.testing.assert_array_equal(copy[0].data, tops[0].data)
    diff = np.random.default_rng(10).standard_normal(tops[0].shape)
    tops[0].diff[...] = diff
    copy[0].diff[...] = diff
    down = [True] * len(shapes)
    apart.backward(tops, down, bottoms)
    inplace.backward([copy[0]], down, copy)
    for a, b in zip(bottoms, copy):
        np.testing.assert_allclose(b.diff, a.diff, rtol=1e-12)
    for a, b in zip(apart.blobs, inplace.blobs):
        np.testing.assert_allclose(b.diff, a.diff, rtol=1e-12)


BIAS_CASES = [
    ([(2, 3, 4, 2)], f"{GAUSSIAN}", (3,)),
    ([(2, 3, 4)], f"axis: 0 num_axes: -1 {GAUSSIAN}", (2, 3, 4)),
    ([(2, 3, 4)], f"num_axes: 0 {GAUSSIAN}", ()),
    ([(2, 3, 4, 5)], f"axis: -2 num_axes: 2 {GAUSSIAN}", (4, 5)),
    ([(2, 3, 4), (3, 4)], "", (3, 4)),
    ([(2, 3, 4), ()], "axis: 2", ()),
]


@pytest.mark.parametrize("shapes, text, operand_shape", BIAS_CASES)
def test_bias_gradients_and_values(shapes, text, operand_shape):
    rng.set_seed(3)
    layer = bias_layer(text)
    bottoms = make_bottoms(shapes)
    tops = setup_layer(layer, bottoms, 1)
    bias = layer.blobs[0] if len(shapes) == 1 else bottoms[1]
    assert bias.shape == operand_shape
    layer.forward(bottoms, tops)
    np.testing.assert_allclose(tops[0].data, bottoms[0].data + broadcast(bias.data, shapes[0],
                                                                         layer.param.bias_param.axis))
    check_gradient(layer, bottoms, tops)


def test_bias_in_place_and_default_filler():
    layer = bias_layer()
    bottoms = make_bottoms([(2, 3, 2)])
    with blob_dtype(np.float64):
        layer.layer_setup(bottoms, bottoms)
    np.testing.assert_array_equal(layer.blobs[0].data, 0)
    layer.blobs[0].data[...] = [1, 2, 3]
    before = bottoms[0].data.copy()
    layer.forward(bottoms, bottoms)
    np.testing.assert_allclose(bottoms[0].data, before + np.array([1, 2, 3])[:, None])
    bottoms[0].diff[...] = 1.0
    layer.backward(bottoms, [True], bottoms)
    np.testing.assert_array_equal(bottoms[0].diff, 1.0)
    np.testing.assert_array_equal(layer.blobs[0].diff, [4, 4, 4])


@pytest.mark.parametrize("make, name, type_name", [(scale_layer, "sc", "Scale"), (bias_layer, "bi", "Bias")])
@pytest.mark.parametrize("text, shapes, message", [
    ("num_axes: -2", [(2, 3)], "num_axes must be non-negative, or -1"),
    ("axis: 1 num_axes: 3", [(2, 3, 4)], r"axis 1 with num_axes 3 extends past bottom shape \(2, 3, 4\)"),
    ("axis: 3", [(2, 3, 4)], r"axis 3 is out of range for bottom shape \(2, 3, 4\)"),
    ("", [(2, 3, 4), (4,)], r"shape \(4,\) does not match bottom shape \(2, 3, 4\) from axis 1"),
    ("axis: 1", [(2, 3, 4), (3, 4, 1)], r"shape \(3, 4, 1\) does not match bottom shape \(2, 3, 4\) from axis 1"),
])
def test_scale_and_bias_errors(make, name, type_name, text, shapes, message):
    with pytest.raises(LayerError, match=message) as info:
        setup_layer(make(text), make_bottoms(shapes), 1)
    assert_one_line_naming(info, name, type_name)


def test_scale_and_bias_reject_a_second_bottom_that_changes_shape():
    layer = scale_layer("bias_term: true")
    bottoms = make_bottoms([(2, 3, 4), (3,)])
    tops = setup_layer(layer, bottoms, 1)
    bottoms[1].reshape((3, 4))
    with pytest.raises(LayerError, match=r"bias shape \(3,\) does not match scale shape \(3, 4\)"):
        layer.reshape(bottoms, tops)


# -- STOCHASTIC pooling ----------------------------------------------------------------------------

def stochastic(text="kernel_size: 3 stride: 2", phase=pb.TRAIN):
    return make_layer(f'name: "pool" type: "Pooling" pooling_param {{ pool: STOCHASTIC {text} }}', phase)


class FixedDraws:
    """Stands in for the layer's generator: the same draws every forward, so the sample holds."""

    def __init__(self, values):
        self.values = values

    def random(self, out):
        out[...] = self.values


@pytest.mark.parametrize("text", ["kernel_size: 3 stride: 2", "kernel_size: 2 stride: 1 pad: 1"])
def test_stochastic_pooling_train_gradient_with_the_sample_held(text):
    layer = stochastic(text)
    bottoms = make_bottoms([(2, 2, 5, 5)], low=0.5, high=1.5)
    tops = setup_layer(layer, bottoms, 1)
    layer.sampler = FixedDraws(np.random.default_rng(11).random(layer.uniforms.shape))
    layer.forward(bottoms, tops)
    sample = layer.mask.copy()
    check_gradient(layer, bottoms, tops)
    np.testing.assert_array_equal(layer.mask, sample)
    # Each output is its sampled input, and the gradient goes there alone.
    planes = bottoms[0].data.reshape(4, -1)
    np.testing.assert_array_equal(tops[0].data.reshape(4, -1),
                                  np.take_along_axis(planes, sample.reshape(4, -1), axis=1))


def test_stochastic_pooling_train_draws_anew_each_iteration_and_repeats_with_the_seed():
    def masks(seed):
        rng.set_seed(seed)
        layer = stochastic("kernel_size: 2 stride: 2")
        bottoms = make_bottoms([(4, 3, 8, 8)], low=0, high=1)
        tops = setup_layer(layer, bottoms, 1)
        found = []
        for _ in range(2):
            layer.forward(bottoms, tops)
            found.append(layer.mask.copy())
        return found

    first, second = masks(5)
    assert (first != second).any()
    again = masks(5)
    np.testing.assert_array_equal(again[0], first)
    np.testing.assert_array_equal(again[1], second)


def test_stochastic_pooling_test_phase_values_and_gradient():
    layer = stochastic("kernel_size: 3 stride: 2", pb.TEST)
    bottoms = make_bottoms([(2, 2, 5, 6)], low=0.1, high=1.0)
    tops = setup_layer(layer, bottoms, 1)
    assert tops[0].shape == (2, 2, 2, 3)
    layer.forward(bottoms, tops)
    np.testing.assert_allclose(tops[0].data.reshape(4, 2, 3),
                               ref_stochastic_test(bottoms[0].data.reshape(4, 5, 6), (4, 2, 3), 3, 2, 0),
                               rtol=1e-12)
    check_gradient(layer, bottoms, tops)


def test_stochastic_pooling_has_no_mask_top():
    with pytest.raises(LayerError, match="only MAX pooling has a second top"):
        setup_layer(stochastic(), make_bottoms([(1, 1, 4, 4)]), 2)


@pytest.mark.parametrize("text", [
    f'type: "Convolution" convolution_param {{ num_output: 3 kernel_size: 3 {FILLERS} }}',
    f'type: "Deconvolution" convolution_param {{ num_output: 3 kernel_size: 3 stride: 2 {FILLERS} }}',
    f'type: "Scale" scale_param {{ bias_term: true {GAUSSIAN} }}',
    f'type: "Bias" bias_param {{ {GAUSSIAN} }}',
])
def test_parameters_the_solver_does_not_learn_get_no_gradient(text):
    """A parameter with lr_mult 0 (param_propagate_down false) keeps its diff; the bottom's gradient
    is the same either way."""
    layer = make_layer(f'name: "l" {text}')
    bottoms = make_bottoms([(2, 4, 3, 3)])
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    tops[0].diff[...] = np.random.default_rng(13).standard_normal(tops[0].shape)
    layer.backward(tops, [True], bottoms)
    learned = bottoms[0].diff.copy()
    layer.param_propagate_down = [False] * len(layer.blobs)
    for blob in layer.blobs:
        blob.diff[...] = 7.0
    layer.backward(tops, [True], bottoms)
    np.testing.assert_array_equal(bottoms[0].diff, learned)
    for blob in layer.blobs:
        np.testing.assert_array_equal(blob.diff, 7.0)


# -- buffers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, shapes, phase, in_place", [
    ('type: "BatchNorm"', [(8, 16, 6, 6)], pb.TRAIN, True),
    ('type: "BatchNorm"', [(8, 16, 6, 6)], pb.TEST, False),
    ('type: "Scale" scale_param { bias_term: true }', [(8, 16, 6, 6)], pb.TRAIN, True),
    ('type: "Scale"', [(8, 16, 6, 6), (16,)], pb.TRAIN, False),
    ('type: "Bias"', [(8, 16, 6, 6)], pb.TRAIN, False),
    ('type: "LRN"', [(8, 16, 6, 6)], pb.TRAIN, False),
    ('type: "LRN" lrn_param { norm_region: WITHIN_CHANNEL }', [(8, 16, 6, 6)], pb.TRAIN, False),
    ('type: "Deconvolution" convolution_param { num_output: 8 kernel_size: 3 stride: 2 }', [(8, 16, 6, 6)],
     pb.TRAIN, False),
    ('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }', [(8, 16, 6, 6)],
     pb.TRAIN, False),
    ('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }', [(8, 16, 6, 6)],
     pb.TEST, False),
])
def test_layers_allocate_nothing_once_shaped(text, shapes, phase, in_place):
    """After the first pass, reshape (same shapes), forward and backward allocate no arrays: each
    blob here holds 36 KB, and what is allowed is a few views' bookkeeping."""
    layer = make_layer(f'name: "l" {text}', phase)
    bottoms = make_bottoms(shapes, low=0, high=1)
    if in_place:
        with blob_dtype(np.float64):
            layer.layer_setup(bottoms, bottoms)
        tops = bottoms
    else:
        tops = setup_layer(layer, bottoms, 1)
    down = [True] * len(bottoms)
    layer.forward(bottoms, tops)
    layer.backward(tops, down, bottoms)
    tracemalloc.start()
    try:
        layer.reshape(bottoms, tops)
        layer.forward(bottoms, tops)
        layer.backward(tops, down, bottoms)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8192, f"{peak} bytes allocated"
