"""Layers a net runs fused, BatchNorm -> Scale (-> ReLU) and Eltwise SUM -> ReLU (-> Split): the fused
kernels against NumPy references, and nets that fuse against the same nets run layer by layer
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

def seeded_net(text, dtype, seed):
    """A TRAIN net from prototxt text, its weights and its "data" and "target" inputs drawn from seed."""
    rng.set_seed(seed)
    with blob_dtype(dtype):
        net = Net(text_format.Parse(text, pb.NetParameter()), phase=pb.TRAIN)
    generator = np.random.default_rng(seed)
    net.blobs["data"].data[...] = generator.standard_normal(net.blobs["data"].shape)
    net.blobs["target"].data[...] = generator.standard_normal(net.blobs["target"].shape)
    return net


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
    return seeded_net(text, dtype, seed)


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


# -- Eltwise SUM -> ReLU -> Split ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("coeffs, slope", [((1.0, 1.0), 0.0), ((0.5, -2.0), 0.0), ((1.0, 1.0), 0.1)])
@pytest.mark.parametrize("tops", [1, 2, 3, 5])
@pytest.mark.parametrize("two_bottoms", [True, False])
@pytest.mark.parametrize("offsets", [(0, 0, 0), (5, 5, 5), (0, 1, 2)])
def test_summed_scaled_copies_matches_reference(dtype, coeffs, slope, tops, two_bottoms, offsets):
    """The outputs at the offsets (in elements) from a 64-byte boundary: aligned alike, they take
    the streaming stores where the CPU has them, after a head loop unless at 0; unlike, plain ones."""
    n = 2048 * 17 + 9
    summands = [random(n, dtype, 30 + k) for k in range(tops)]
    y = random(n, dtype, 29)
    y[::7] = 0   # ReLU's output is 0 wherever it clipped
    dy, da, db = (aligned_array(n, dtype, offset) for offset in offsets)
    structure.summed_scaled_copies(summands, dy, y, da, coeffs[0], db if two_bottoms else None, coeffs[1], THREADS,
                                   negative_slope=slope)
    # The Split's sum, then the ReLU's gradient, in the element type, as the layers compute them.
    total = summands[0].copy()
    for s in summands[1:]:
        total = total + s
    g = np.where(y > 0, total, total * dtype(slope))
    np.testing.assert_array_equal(dy, g)
    np.testing.assert_array_equal(da, g * dtype(coeffs[0]))
    if two_bottoms:
        np.testing.assert_array_equal(db, g * dtype(coeffs[1]))


def aligned_array(n, dtype, offset):
    """An array of n NaNs whose first element lies offset elements past a 64-byte boundary."""
    raw = np.full(n + offset + 64, np.nan, dtype)
    skip = (-raw.ctypes.data % 64) // raw.itemsize
    return raw[skip + offset:skip + offset + n]


def test_summed_scaled_copies_gives_the_same_bits_for_any_thread_count():
    n = 2048 * 5 + 3
    summands = [random(n, np.float32, 34 + k) for k in range(3)]
    y = random(n, np.float32, 33)
    results = []
    for threads in (1, 2, 3):
        dy, da, db = np.empty_like(y), np.empty_like(y), np.empty_like(y)
        structure.summed_scaled_copies(summands, dy, y, da, 0.3, db, 1.7, threads, negative_slope=0.2)
        results.append((dy, da, db))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_summed_scaled_copies_rejects_mismatched_sizes():
    x = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="differ in size"):
        structure.summed_scaled_copies([x, np.zeros(9, np.float32)], x.copy(), x, x.copy(), 1.0, None, 0.0, 1)
    with pytest.raises(ValueError, match="no summands"):
        structure.summed_scaled_copies([], x.copy(), x, x.copy(), 1.0, None, 0.0, 1)


SPLIT_CONSUMERS = {   # by the number of the Split's tops
    # The net inserts a Split of "sum" with a top for conv2 and one for sum2, as in a ResNet block.
    2: """
        layer { name: "conv2" type: "Convolution" bottom: "sum" top: "b2"
                convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" } } }
        layer { name: "sum2" type: "Eltwise" bottom: "sum" bottom: "b2" top: "sum2" }
        layer { name: "loss" type: "EuclideanLoss" bottom: "sum2" bottom: "target" top: "loss" }""",
    3: """
        layer { name: "conv2" type: "Convolution" bottom: "sum" top: "b2"
                convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" } } }
        layer { name: "conv3" type: "Convolution" bottom: "sum" top: "b3"
                convolution_param { num_output: 3 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" } } }
        layer { name: "sum2" type: "Eltwise" bottom: "sum" bottom: "b2" bottom: "b3" top: "sum2" }
        layer { name: "loss" type: "EuclideanLoss" bottom: "sum2" bottom: "target" top: "loss" }""",
    4: """
        layer { name: "conv2" type: "Convolution" bottom: "sum" top: "b2"
                convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" } } }
        layer { name: "conv3" type: "Convolution" bottom: "sum" top: "b3"
                convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" } } }
        layer { name: "conv4" type: "Convolution" bottom: "sum" top: "b4"
                convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" } } }
        layer { name: "sum2" type: "Eltwise" bottom: "sum" bottom: "b2" bottom: "b3" bottom: "b4" top: "sum2" }
        layer { name: "loss" type: "EuclideanLoss" bottom: "sum2" bottom: "target" top: "loss" }""",
    # A Split written in the prototxt, with a single top.
    1: """
        layer { name: "copy" type: "Split" bottom: "sum" top: "copy" }
        layer { name: "loss" type: "EuclideanLoss" bottom: "copy" bottom: "target" top: "loss" }""",
}


def split_net(consumers=2, eltwise="", relu="", data_gradient=False, dtype=np.float32,
              shape=(2, 3, 70, 40), seed=7, consumer_layers=None):
    """Eltwise SUM (data, conv(data)) -> ReLU in place on "sum" -> a Split of "sum" (layers 4, 5, 6)
    -> the layers of SPLIT_CONSUMERS[consumers], or consumer_layers."""
    dims = " ".join(f"dim: {d}" for d in shape)
    text = f"""
        force_backward: {str(data_gradient).lower()}
        layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}
        layer {{ name: "target" type: "Input" top: "target" input_param {{ shape {{ {dims} }} }} }}
        layer {{ name: "conv" type: "Convolution" bottom: "data" top: "branch"
                convolution_param {{ num_output: 3 kernel_size: 3 pad: 1 weight_filler {{ type: "gaussian" }} }} }}
        layer {{ name: "sum" type: "Eltwise" bottom: "data" bottom: "branch" top: "sum" {eltwise} }}
        layer {{ name: "relu" type: "ReLU" bottom: "sum" top: "sum" {relu} }}
        {consumer_layers or SPLIT_CONSUMERS[consumers]}
    """
    return seeded_net(text, dtype, seed)


def assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("consumers", list(SPLIT_CONSUMERS))
@pytest.mark.parametrize("options", [
    {},
    {"eltwise": "eltwise_param { operation: SUM coeff: 0.5 coeff: -1.5 }"},
    {"relu": "relu_param { negative_slope: 0.1 }"},
    {"data_gradient": True},
    {"data_gradient": True, "eltwise": "eltwise_param { operation: SUM coeff: -0.75 coeff: 2 }"},
])
def test_a_fused_eltwise_relu_split_gives_the_layers_bits(consumers, options):
    fused, apart = split_net(consumers, **options), unfused(split_net(consumers, **options))
    chain = fused.fused_chains[0]
    assert (type(chain).__name__, chain.first, chain.last, chain.fuses_backward) == ("EltwiseReLUChain", 4, 6, True)
    assert fused.layers[6].type_name == "Split"
    assert len(chain.split_tops) == consumers
    for _ in range(2):
        for net in (fused, apart):
            net.clear_param_diffs()
            net.forward_backward()
        assert_same_bits(state(fused), state(apart))


def test_a_split_chain_nothing_backpropagates_into_fuses_forward_only():
    """propagate_down: false on both users of "sum": the three layers skip backward, conv2 still learns."""
    consumers = SPLIT_CONSUMERS[2].replace('top: "b2"', 'top: "b2" propagate_down: false').replace(
        'top: "sum2"', 'top: "sum2" propagate_down: false propagate_down: true')
    fused, apart = split_net(consumer_layers=consumers), unfused(split_net(consumer_layers=consumers))
    assert [(c.first, c.last, c.fuses_backward) for c in fused.fused_chains] == [(4, 6, False)]
    for net in (fused, apart):
        net.clear_param_diffs()
        net.forward_backward()
    assert_same_bits(state(fused), state(apart))
    assert np.any(fused.params["conv2"][0].diff != 0)


def test_the_fused_split_chain_runs_as_one_unit_each_way_and_ranges_cut_it():
    net = split_net()
    forward = [(first, last) for first, last, _ in net.forward_units()]
    backward = [(last, first) for last, first, run in net.backward_units() if run is not None]
    assert (4, 6) in forward and (6, 4) in backward
    # A range that ends inside the chain runs its layers one by one.
    assert [(f, l) for f, l, _ in net.forward_units(0, 5)][-2:] == [(4, 4), (5, 5)]
    assert [(l, f) for l, f, _ in net.backward_units(5, 0)][:2] == [(5, 5), (4, 4)]
    assert [(l, f) for l, f, _ in net.backward_units(6, 5)] == [(6, 6), (5, 5)]


@pytest.mark.parametrize("end", ["sum", "relu", "sum_relu_0_split", "loss"])
def test_ranges_that_cut_the_split_chain_give_the_layers_bits(end):
    fused, apart = split_net(data_gradient=True), unfused(split_net(data_gradient=True))
    np.testing.assert_array_equal(fused.forward(["sum"], end=end)["sum"], apart.forward(["sum"], end=end)["sum"])
    # Backward from the middle of the chain, over the layers one by one.
    for net in (fused, apart):
        net.forward()
        generator = np.random.default_rng(8)
        for name in ("sum", "sum_relu_0_split_0", "sum_relu_0_split_1"):
            net.blobs[name].diff[...] = generator.standard_normal(net.blobs[name].shape)
        net.clear_param_diffs()
        net.backward(start=end if end != "loss" else None)
    assert_same_bits(state(fused), state(apart))


def test_a_fused_eltwise_relu_split_matches_finite_differences():
    net = split_net(data_gradient=True, dtype=np.float64, shape=(2, 3, 4, 5),
                    eltwise="eltwise_param { operation: SUM coeff: 0.5 coeff: -1.5 }")
    assert [(c.first, c.last, c.fuses_backward) for c in net.fused_chains] == [(4, 6, True)]
    check_net_gradient(net, [net.blobs["data"], net.params["conv"][0], net.params["conv2"][0]], step=1e-6,
                       tolerance=1e-5, every=3)
