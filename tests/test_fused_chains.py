"""Layers a net runs fused, BatchNorm -> Scale (-> ReLU) and Eltwise SUM -> ReLU: the fused kernels
against NumPy references, and nets that fuse against the same nets run layer by layer
(layers/normalization.py: BatchNormChain, layers/structure.py: EltwiseReLUChain,
Net._find_fused_chains)."""
import numpy as np
import pytest
from google.protobuf import text_format
from gradient_check import check_net_gradient

from minicaffe import rng
from minicaffe.blob import blob_dtype
from minicaffe.kernels import batchnorm, structure
from minicaffe.net import Net
from minicaffe.proto import minicaffe_pb2 as pb

THREADS = 2
EPS = 1e-5


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


def random(shape, dtype, seed, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(dtype)


# -- kernels ---------------------------------------------------------------------------------------

def ref_forward(x, scale, shift, relu, slope):
    """x_norm and y = ReLU(x_norm * scale + shift), in float64, the layers' definitions one by one."""
    x = x.astype(np.float64)
    mean = x.mean(axis=(0, 2), keepdims=True)
    x_norm = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=(0, 2), keepdims=True) + EPS)
    y = x_norm * (1 if scale is None else scale[:, None]) + (0 if shift is None else shift[:, None])
    if relu:
        y = np.where(y > 0, y, y * slope)
    return x_norm, y


def ref_backward(dy, x_norm, y, inv_std, scale, relu, slope):
    """(dx, scale gradient, shift gradient): ReLU's, Scale's and BatchNorm's backward in turn."""
    g = dy.astype(np.float64)
    if relu:
        g = np.where(y > 0, g, g * slope)
    scale_diff = (g * x_norm).sum(axis=(0, 2))
    shift_diff = g.sum(axis=(0, 2))
    d = g * scale[:, None]
    dx = (d - d.mean(axis=(0, 2), keepdims=True)
          - x_norm * (d * x_norm).mean(axis=(0, 2), keepdims=True)) * inv_std[:, None]
    return dx, scale_diff, shift_diff


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", [(4, 3, 10), (2, 5, 37), (2, 2, 1031), (8, 4, 1)])
@pytest.mark.parametrize("relu, slope, with_shift", [(True, 0.0, True), (True, 0.1, True), (False, 0.0, True),
                                                     (True, 0.0, False)])
def test_fused_batch_norm_scale_relu_matches_reference(dtype, layout, relu, slope, with_shift):
    x = random(layout, dtype, 1, -2, 3)
    scale = random(layout[1], dtype, 2, 0.5, 1.5)
    shift = random(layout[1], dtype, 3) if with_shift else None
    y, x_norm = x.copy(), np.empty_like(x)
    mean, variance, inv_std = np.zeros(layout[1]), np.zeros(layout[1]), np.zeros(layout[1], dtype)
    batchnorm.batch_norm_forward(y, y, x_norm, mean, variance, inv_std, EPS, THREADS, scale=scale, shift=shift,
                                 relu=relu, negative_slope=slope)
    expected_norm, expected_y = ref_forward(x, scale, shift, relu, slope)
    np.testing.assert_allclose(x_norm, expected_norm, **tolerance(dtype))
    np.testing.assert_allclose(y, expected_y, **tolerance(dtype))
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(variance, x.astype(np.float64).var(axis=(0, 2)), rtol=1e-10)

    dy = random(layout, dtype, 4)
    dx = dy.copy()
    scale_diff, shift_diff = np.full(layout[1], 0.5, dtype), np.full(layout[1], -0.5, dtype)
    batchnorm.batch_norm_backward(dx, x_norm, inv_std, dx, THREADS, scale=scale, shift=shift, scale_diff=scale_diff,
                                  shift_diff=shift_diff, relu=relu, negative_slope=slope)
    expected_dx, expected_scale_diff, expected_shift_diff = ref_backward(dy, x_norm, y, inv_std, scale, relu, slope)
    np.testing.assert_allclose(dx, expected_dx, **tolerance(dtype))
    np.testing.assert_allclose(scale_diff, 0.5 + expected_scale_diff, **tolerance(dtype))
    np.testing.assert_allclose(shift_diff, -0.5 + expected_shift_diff, **tolerance(dtype))
    # dx apart from dy: dy stays as it was.
    apart, dy_kept = np.empty_like(dy), dy.copy()
    batchnorm.batch_norm_backward(dy, x_norm, inv_std, apart, THREADS, scale=scale, shift=shift, relu=relu,
                                  negative_slope=slope)
    np.testing.assert_array_equal(dy, dy_kept)
    np.testing.assert_allclose(apart, dx, **tolerance(dtype))


def test_fused_forward_is_bitwise_the_layers_one_by_one_in_float32():
    """Same float operations as BatchNorm, then Scale's channel_affine, then ReLU."""
    layout = (4, 6, 300)
    x = random(layout, np.float32, 5, -2, 3)
    scale, shift = random(6, np.float32, 6, 0.5, 1.5), random(6, np.float32, 7)
    stats = lambda: (np.zeros(6), np.zeros(6), np.zeros(6, np.float32))
    fused, fused_norm = x.copy(), np.empty_like(x)
    batchnorm.batch_norm_forward(fused, fused, fused_norm, *stats(), EPS, THREADS, scale=scale, shift=shift,
                                 relu=True)
    apart, apart_norm = x.copy(), np.empty_like(x)
    batchnorm.batch_norm_forward(apart, apart, apart_norm, *stats(), EPS, THREADS)
    batchnorm.channel_affine(apart, None, scale, shift, apart, None, THREADS)
    np.maximum(apart, 0, out=apart)
    np.testing.assert_array_equal(fused_norm, apart_norm)
    np.testing.assert_array_equal(fused, apart)


def test_backward_masks_exactly_where_forward_zeroed():
    """Backward recomputes ReLU's input t = x_norm * scale + shift: it must take the same side of 0 as
    forward did, element for element. Inputs on a grid give few distinct x_norm values v, and
    shift = -round(v * scale) puts thousands of t within a rounding error of 0."""
    layout = (8, 3, 4001)
    x = np.random.default_rng(12).integers(-3, 4, layout).astype(np.float32)
    scale = np.array([0.7, 1.3, 2.9], np.float32)
    stats = lambda: (np.zeros(3), np.zeros(3), np.zeros(3, np.float32))
    x_norm = np.empty_like(x)
    batchnorm.batch_norm_forward(x.copy(), np.empty_like(x), x_norm, *stats(), EPS, THREADS)
    shift = -(x_norm[0, :, 0] * scale)
    y = x.copy()
    mean, variance, inv_std = stats()
    batchnorm.batch_norm_forward(y, y, x_norm, mean, variance, inv_std, EPS, THREADS, scale=scale, shift=shift,
                                 relu=True)
    near_zero = np.abs(x_norm * scale[:, None] + shift[:, None]) < 1e-6
    assert near_zero.sum() > 1000
    ones, kept = np.ones_like(x), np.zeros(3, np.float32)
    batchnorm.batch_norm_backward(ones, x_norm, inv_std, ones, THREADS, scale=scale, shift=shift,
                                  shift_diff=kept, relu=True)
    np.testing.assert_array_equal(kept, (y > 0).sum(axis=(0, 2)))


def test_fused_kernels_do_not_depend_on_the_thread_count():
    layout = (3, 5, 517)
    x, dy = random(layout, np.float32, 8, -2, 3), random(layout, np.float32, 9)
    scale, shift = random(5, np.float32, 10, 0.5, 1.5), random(5, np.float32, 11)
    results = []
    for threads in (1, 2, 3):
        y, x_norm, dx = x.copy(), np.empty_like(x), dy.copy()
        mean, variance, inv_std = np.zeros(5), np.zeros(5), np.zeros(5, np.float32)
        scale_diff, shift_diff = np.zeros(5, np.float32), np.zeros(5, np.float32)
        batchnorm.batch_norm_forward(y, y, x_norm, mean, variance, inv_std, EPS, threads, scale=scale,
                                     shift=shift, relu=True)
        batchnorm.batch_norm_backward(dx, x_norm, inv_std, dx, threads, scale=scale, shift=shift,
                                      scale_diff=scale_diff, shift_diff=shift_diff, relu=True)
        results.append((y, x_norm, dx, mean, variance, scale_diff, shift_diff))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_fused_kernels_reject_mismatched_per_channel_arrays():
    x = np.zeros((2, 3, 4), np.float32)
    stats = (np.zeros(3), np.zeros(3), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="3 channels"):
        batchnorm.batch_norm_forward(x, x, x.copy(), *stats, EPS, 1, scale=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="3 channels"):
        batchnorm.batch_norm_backward(x, x.copy(), stats[2], x, 1, shift=np.zeros(2, np.float32), relu=True)


# -- nets --------------------------------------------------------------------------------------------

def chain_net(bn="", scale="bias_term: true", relu='layer { name: "relu" type: "ReLU" bottom: "c" top: "c" }',
              scale_params="", conv_params="", dtype=np.float64, seed=3):
    """conv -> BatchNorm -> Scale (-> ReLU), in place on "c" -> conv -> EuclideanLoss."""
    text = f"""
        layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 3 dim: 2 dim: 5 dim: 4 }} }} }}
        layer {{ name: "target" type: "Input" top: "target" input_param {{ shape {{ dim: 3 dim: 2 dim: 5 dim: 4 }} }} }}
        layer {{ name: "conv" type: "Convolution" bottom: "data" top: "c" {conv_params}
                convolution_param {{ num_output: 3 kernel_size: 3 pad: 1 weight_filler {{ type: "gaussian" }} }} }}
        layer {{ name: "bn" type: "BatchNorm" bottom: "c" top: "c" {bn} }}
        layer {{ name: "scale" type: "Scale" bottom: "c" top: "c" {scale_params}
                scale_param {{ {scale} filler {{ type: "gaussian" }} bias_filler {{ type: "gaussian" }} }} }}
        {relu}
        layer {{ name: "conv2" type: "Convolution" bottom: "c" top: "out"
                convolution_param {{ num_output: 2 kernel_size: 1 weight_filler {{ type: "gaussian" }} }} }}
        layer {{ name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "target" top: "loss" }}
    """
    rng.set_seed(seed)
    with blob_dtype(dtype):
        net = Net(text_format.Parse(text, pb.NetParameter()), phase=pb.TRAIN)
    generator = np.random.default_rng(seed)
    net.blobs["data"].data[...] = generator.standard_normal(net.blobs["data"].shape)
    net.blobs["target"].data[...] = generator.standard_normal(net.blobs["target"].shape)
    return net


def unfused(net):
    net._chain_from, net._chain_to = {}, {}
    return net


def state(net):
    """Everything a training step leaves behind: blobs' data and diffs, parameters and their diffs."""
    arrays = {f"blob {name} data": b.data.copy() for name, b in net.blobs.items()}
    arrays.update({f"blob {name} diff": b.diff.copy() for name, b in net.blobs.items()})
    for name, blobs in net.params.items():
        for j, b in enumerate(blobs):
            arrays[f"param {name}[{j}] data"] = b.data.copy()
            arrays[f"param {name}[{j}] diff"] = b.diff.copy()
    return arrays


def assert_same_state(a, b, dtype):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], err_msg=key, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("options", [
    {},
    {"relu": ""},
    {"scale": "bias_term: false"},
    {"relu": 'layer { name: "relu" type: "ReLU" bottom: "c" top: "c" relu_param { negative_slope: 0.2 } }'},
    {"scale_params": "param { lr_mult: 0 } param { lr_mult: 0 }"},
])
def test_a_fused_chain_trains_as_the_layers_one_by_one(dtype, options):
    fused, apart = chain_net(dtype=dtype, **options), unfused(chain_net(dtype=dtype, **options))
    assert [(c.first, c.last) for c in fused.fused_chains] == [(3, 4 if options.get("relu") == "" else 5)]
    for _ in range(2):   # the running statistics carry over
        for net in (fused, apart):
            net.clear_param_diffs()
            net.forward_backward()
        assert_same_state(state(fused), state(apart), dtype)


def test_a_fused_chain_frees_scale_of_its_input_copy():
    net = chain_net()
    net.forward_backward()
    assert net.layer_dict["scale"].saved is None


def test_layer_done_callbacks_come_in_the_same_order_fused_or_not():
    calls = {}
    for name, net in (("fused", chain_net()), ("apart", unfused(chain_net()))):
        calls[name] = []
        net.forward_backward(on_layer_done=lambda i, layer, log=calls[name]: log.append(i))
    assert calls["fused"] == calls["apart"] == [6, 4, 3, 2]


def test_ranges_that_cut_a_chain_run_its_layers_one_by_one():
    fused, apart = chain_net(), unfused(chain_net())
    for end in ("bn", "scale", "relu", "loss"):
        np.testing.assert_allclose(fused.forward(["c"], end=end)["c"], apart.forward(["c"], end=end)["c"],
                                   rtol=1e-12, atol=1e-12)
    # A whole forward, then backward from the middle of the chain: Scale's own backward must find
    # its input where the fused forward left it.
    for net in (fused, apart):
        net.forward()
        net.blobs["c"].diff[...] = np.random.default_rng(5).standard_normal(net.blobs["c"].shape)
        net.clear_param_diffs()
        net.backward(start="scale")
    assert_same_state(state(fused), state(apart), np.float64)


def test_a_fused_chain_matches_finite_differences():
    net = chain_net()
    assert [c.fuses_backward for c in net.fused_chains] == [True]
    check_net_gradient(net, [net.params["conv"][0], *net.params["scale"]], step=1e-6, tolerance=1e-5, every=3)


@pytest.mark.parametrize("options", [
    {"bn": "batch_norm_param { use_global_stats: true }"},
    {"scale": "bias_term: true axis: 0 num_axes: 1"},
])
def test_chains_that_do_not_qualify_are_not_fused(options):
    assert chain_net(**options).fused_chains == []


def test_a_relu_with_a_negative_slope_stays_out_of_the_chain():
    """In place, its backward masks by its output's sign, which a negative slope flips."""
    relu = 'layer { name: "relu" type: "ReLU" bottom: "c" top: "c" relu_param { negative_slope: -0.5 } }'
    fused, apart = chain_net(relu=relu), unfused(chain_net(relu=relu))
    assert [(c.first, c.last) for c in fused.fused_chains] == [(3, 4)]
    for net in (fused, apart):
        net.clear_param_diffs()
        net.forward_backward()
    assert_same_state(state(fused), state(apart), np.float64)


def test_a_chain_whose_bottom_takes_no_gradient_fuses_forward_only():
    """A frozen first convolution: nothing wants BatchNorm's input gradient, so the layers run their
    own backward (Scale still learns), while forward stays fused."""
    frozen = 'param { lr_mult: 0 } param { lr_mult: 0 }'
    fused, apart = chain_net(conv_params=frozen), unfused(chain_net(conv_params=frozen))
    assert [(c.first, c.fuses_backward) for c in fused.fused_chains] == [(3, False)]
    for net in (fused, apart):
        net.clear_param_diffs()
        net.forward_backward()
    assert_same_state(state(fused), state(apart), np.float64)


# -- Eltwise SUM -> ReLU ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("coeffs, slope", [((1.0, 1.0), 0.0), ((0.5, -2.0), 0.0), ((1.0, 1.0), 0.1)])
def test_fused_eltwise_relu_kernels_match_reference(dtype, coeffs, slope):
    n = 16384 * 2 + 9
    a, b, dy = random(n, dtype, 20), random(n, dtype, 21), random(n, dtype, 22)
    y = np.empty_like(a)
    structure.weighted_sum(a, coeffs[0], b, coeffs[1], y, THREADS, relu=True, negative_slope=slope)
    t = coeffs[0] * a.astype(np.float64) + coeffs[1] * b.astype(np.float64)
    np.testing.assert_allclose(y, np.where(t > 0, t, t * slope), **tolerance(dtype))
    g = np.where(y > 0, dy, dy * dtype(slope))
    da, db, dy_in_place = np.empty_like(a), np.empty_like(a), dy.copy()
    structure.scaled_copies(dy_in_place, da, coeffs[0], db, coeffs[1], THREADS, relu_output=y, negative_slope=slope)
    np.testing.assert_array_equal(dy_in_place, g)
    np.testing.assert_array_equal(da, g * dtype(coeffs[0]))
    np.testing.assert_array_equal(db, g * dtype(coeffs[1]))
    only, dy_in_place = np.empty_like(a), dy.copy()
    structure.scaled_copies(dy_in_place, only, coeffs[1], None, 0.0, THREADS, relu_output=y, negative_slope=slope)
    np.testing.assert_array_equal(only, g * dtype(coeffs[1]))


def residual_net(eltwise="", relu="", data_gradient=False, seed=6):
    """Eltwise SUM (data, conv(data)) -> ReLU in place -> conv -> EuclideanLoss (a Split feeds data to both)."""
    text = f"""
        force_backward: {str(data_gradient).lower()}
        layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 3 dim: 70 dim: 40 }} }} }}
        layer {{ name: "target" type: "Input" top: "target" input_param {{ shape {{ dim: 2 dim: 2 dim: 70 dim: 40 }} }} }}
        layer {{ name: "conv" type: "Convolution" bottom: "data" top: "branch"
                convolution_param {{ num_output: 3 kernel_size: 3 pad: 1 weight_filler {{ type: "gaussian" }} }} }}
        layer {{ name: "sum" type: "Eltwise" bottom: "data" bottom: "branch" top: "sum" {eltwise} }}
        layer {{ name: "relu" type: "ReLU" bottom: "sum" top: "sum" {relu} }}
        layer {{ name: "conv2" type: "Convolution" bottom: "sum" top: "out"
                convolution_param {{ num_output: 2 kernel_size: 1 weight_filler {{ type: "gaussian" }} }} }}
        layer {{ name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "target" top: "loss" }}
    """
    rng.set_seed(seed)
    with blob_dtype(np.float32):
        net = Net(text_format.Parse(text, pb.NetParameter()), phase=pb.TRAIN)
    generator = np.random.default_rng(seed)
    net.blobs["data"].data[...] = generator.standard_normal(net.blobs["data"].shape)
    net.blobs["target"].data[...] = generator.standard_normal(net.blobs["target"].shape)
    return net


@pytest.mark.parametrize("options", [
    {},
    {"eltwise": "eltwise_param { operation: SUM coeff: 0.5 coeff: -1.5 }"},
    {"relu": "relu_param { negative_slope: 0.1 }"},
    {"data_gradient": True},
])
def test_a_fused_eltwise_relu_gives_the_layers_bits(options):
    fused, apart = residual_net(**options), unfused(residual_net(**options))
    assert [(type(c).__name__, c.first, c.last) for c in fused.fused_chains] == [("EltwiseReLUChain", 4, 5)]
    for net in (fused, apart):
        net.clear_param_diffs()
        net.forward_backward()
    a, b = state(fused), state(apart)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("options", [
    {"eltwise": "eltwise_param { operation: PROD }"},
    {"eltwise": "eltwise_param { operation: MAX }"},
    {"relu": "relu_param { negative_slope: -0.1 }"},
])
def test_eltwise_relu_pairs_that_do_not_qualify_are_not_fused(options):
    assert residual_net(**options).fused_chains == []
