"""Structural layers (Eltwise, Concat, Slice, Flatten, Reshape, Crop, Tile, Silence), reductions
(Reduction, ArgMax) and Embed: values against NumPy, float64 finite-difference gradients, memory
sharing, the Embed kernels against a NumPy reference, and the errors a user can cause."""
import numpy as np
import pytest
from google.protobuf import text_format

from gradient_check import check_gradient, make_bottoms, setup_layer
from minicaffe.blob import blob_dtype
from minicaffe.errors import LayerError
from minicaffe.kernels import structure
from minicaffe.layer import create_layer
from minicaffe.net import Net
from minicaffe.proto import minicaffe_pb2 as pb


def make_layer(text, phase=pb.TRAIN):
    return create_layer(text_format.Parse(text, pb.LayerParameter()), phase)


def run_forward(text, arrays, num_tops=1):
    """Builds the layer in float64 on bottoms holding ``arrays``, runs forward, returns (layer, bottoms, tops)."""
    layer = make_layer(text)
    bottoms = make_bottoms([a.shape for a in arrays])
    for b, a in zip(bottoms, arrays):
        b.data[...] = a
    tops = setup_layer(layer, bottoms, num_tops)
    layer.forward(bottoms, tops)
    return layer, bottoms, tops


def gradient_case(text, shapes, num_tops=1, **check):
    layer = make_layer(text)
    bottoms = make_bottoms(shapes)
    tops = setup_layer(layer, bottoms, num_tops)
    check_gradient(layer, bottoms, tops, **check)


def distinct_values(shape, seed=0):
    """Values without ties, spaced far wider than the finite-difference step."""
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n) - n / 2).reshape(shape) * 0.01


def rand(*shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=shape)


# -- Eltwise ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("params,count", [
    ("operation: SUM", 2),
    ("operation: SUM coeff: 1 coeff: -0.5 coeff: 2", 3),
    ("operation: PROD", 2),
    ("operation: PROD", 3),
])
def test_eltwise_gradient(params, count):
    gradient_case(f'name: "e" type: "Eltwise" eltwise_param {{ {params} }}', [(2, 3, 4)] * count)


@pytest.mark.parametrize("count", [2, 3])
def test_eltwise_prod_unstable_gradient(count):
    layer = make_layer('name: "e" type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }')
    bottoms = make_bottoms([(2, 3, 4)] * count, low=0.5, high=1.5)   # top / bottom needs no zeros
    check_gradient(layer, bottoms, setup_layer(layer, bottoms, 1))


def test_eltwise_max_gradient():
    layer = make_layer('name: "e" type: "Eltwise" eltwise_param { operation: MAX }')
    bottoms = make_bottoms([(2, 3, 4)] * 3)
    values = distinct_values((3, 2, 3, 4))
    for b, v in zip(bottoms, values):
        b.data[...] = v
    check_gradient(layer, bottoms, setup_layer(layer, bottoms, 1))


def test_eltwise_values():
    a, b, c = rand(2, 5, seed=1), rand(2, 5, seed=2), rand(2, 5, seed=3)
    cases = [("operation: SUM", a + b + c), ("operation: SUM coeff: 2 coeff: -1 coeff: 0.5", 2 * a - b + 0.5 * c),
             ("operation: PROD", a * b * c), ("operation: MAX", np.maximum(np.maximum(a, b), c)), ("", a + b + c)]
    for params, expected in cases:
        _, _, tops = run_forward(f'name: "e" type: "Eltwise" eltwise_param {{ {params} }}', [a, b, c])
        np.testing.assert_allclose(tops[0].data, expected, rtol=1e-12, err_msg=params)


def test_eltwise_max_ties_follow_caffe():
    # Bottoms 0 and 1 tie -> bottom 1 wins; bottom 2 must be strictly larger to win.
    a, b, c = np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 3.0]), np.array([1.0, 2.0, 3.5])
    layer, bottoms, tops = run_forward('name: "e" type: "Eltwise" eltwise_param { operation: MAX }', [a, b, c])
    np.testing.assert_array_equal(tops[0].data, [1.0, 2.0, 3.5])
    tops[0].diff[...] = [10.0, 20.0, 30.0]
    layer.backward(tops, [True] * 3, bottoms)
    np.testing.assert_array_equal(bottoms[0].diff, [0, 20, 0])
    np.testing.assert_array_equal(bottoms[1].diff, [10, 0, 0])
    np.testing.assert_array_equal(bottoms[2].diff, [0, 0, 30])


def test_eltwise_float32_runs():
    layer = make_layer('name: "e" type: "Eltwise" eltwise_param { operation: SUM coeff: 0.5 coeff: 3 }')
    bottoms = make_bottoms([(3, 4)] * 2, dtype=np.float32)
    tops = setup_layer(layer, bottoms, 1, dtype=np.float32)
    layer.forward(bottoms, tops)
    assert tops[0].data.dtype == np.float32
    np.testing.assert_allclose(tops[0].data, 0.5 * bottoms[0].data + 3 * bottoms[1].data, rtol=1e-6)


@pytest.mark.parametrize("params,shapes,message", [
    ("", [(2, 3), (2, 4)], r"layer 'e' \(Eltwise\): .*bottom 0 is \(2, 3\), bottom 1 is \(2, 4\)"),
    ("coeff: 1", [(2, 3), (2, 3)], "one coefficient per bottom"),
    ("operation: PROD coeff: 1 coeff: 2", [(2, 3), (2, 3)], "SUM only"),
])
def test_eltwise_errors(params, shapes, message):
    layer = make_layer(f'name: "e" type: "Eltwise" eltwise_param {{ {params} }}')
    with pytest.raises(LayerError, match=message):
        setup_layer(layer, make_bottoms(shapes), 1)


def test_eltwise_refuses_in_place_and_one_bottom():
    layer = make_layer('name: "e" type: "Eltwise"')
    bottoms = make_bottoms([(2, 3), (2, 3)])
    with pytest.raises(LayerError, match="in place"):
        layer.layer_setup(bottoms, [bottoms[0]])
    with pytest.raises(LayerError, match="at least 2 bottom"):
        setup_layer(make_layer('name: "e" type: "Eltwise"'), make_bottoms([(2, 3)]), 1)


# -- Concat and Slice ------------------------------------------------------------------------------

CONCAT_CASES = [  # (concat_param, bottom shapes, numpy axis)
    ("axis: 0", [(1, 3, 2), (2, 3, 2), (3, 3, 2)], 0),
    ("", [(2, 1, 3), (2, 4, 3)], 1),
    ("axis: 2", [(2, 3, 1), (2, 3, 2), (2, 3, 3)], 2),
    ("axis: -1", [(2, 2, 1), (2, 2, 3)], 2),
    ("concat_dim: 0", [(1, 2), (2, 2)], 0),
]


@pytest.mark.parametrize("params,shapes,axis", CONCAT_CASES)
def test_concat_values_and_gradient(params, shapes, axis):
    text = f'name: "c" type: "Concat" concat_param {{ {params} }}'
    arrays = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    layer, bottoms, tops = run_forward(text, arrays)
    np.testing.assert_array_equal(tops[0].data, np.concatenate(arrays, axis=axis))
    check_gradient(layer, bottoms, tops)


def test_concat_backward_skips_bottoms_not_propagated():
    layer, bottoms, tops = run_forward('name: "c" type: "Concat"', [rand(2, 2, seed=1), rand(2, 3, seed=2)])
    bottoms[0].diff[...] = 7
    tops[0].diff[...] = rand(2, 5, seed=3)
    layer.backward(tops, [False, True], bottoms)
    np.testing.assert_array_equal(bottoms[0].diff, 7)
    np.testing.assert_array_equal(bottoms[1].diff, tops[0].diff[:, 2:])


def test_concat_of_one_bottom_shares_it():
    layer, bottoms, tops = run_forward('name: "c" type: "Concat"', [rand(2, 3)])
    assert np.shares_memory(tops[0].data, bottoms[0].data) and np.shares_memory(tops[0].diff, bottoms[0].diff)


@pytest.mark.parametrize("params,shapes,message", [
    ("", [(2, 3, 4), (2, 3, 5)], r"layer 'c' \(Concat\): .*every axis except 1: bottom 0 is \(2, 3, 4\), "
                                 r"bottom 1 is \(2, 3, 5\)"),
    ("", [(2, 3), (2, 3, 1)], "every axis except 1"),
    ("axis: 3", [(2, 3), (2, 3)], "concat_param.axis: axis 3 out of range"),
    ("concat_dim: 2", [(2, 3), (2, 3)], "concat_dim 2 out of range"),
    ("axis: 0 concat_dim: 0", [(2, 3), (2, 3)], "not both"),
])
def test_concat_errors(params, shapes, message):
    layer = make_layer(f'name: "c" type: "Concat" concat_param {{ {params} }}')
    with pytest.raises(LayerError, match=message):
        setup_layer(layer, make_bottoms(shapes), 1)


SLICE_CASES = [  # (slice_param, bottom shape, numpy axis, numpy split points or sections)
    ("axis: 0 slice_point: 1 slice_point: 3", (4, 3, 2), 0, [1, 3]),
    ("slice_point: 2", (2, 5, 3), 1, [2]),
    ("axis: 2 slice_point: 1 slice_point: 2 slice_point: 4", (2, 2, 6), 2, [1, 2, 4]),
    ("axis: 1", (2, 6, 2), 1, 3),
    ("slice_dim: 0", (4, 3), 0, 2),
    ("axis: -1 slice_point: 3", (2, 5), 1, [3]),
]


@pytest.mark.parametrize("params,shape,axis,split", SLICE_CASES)
def test_slice_values_and_gradient(params, shape, axis, split):
    num_tops = split if isinstance(split, int) else len(split) + 1
    layer, bottoms, tops = run_forward(f'name: "s" type: "Slice" slice_param {{ {params} }}', [rand(*shape)],
                                       num_tops)
    for top, part in zip(tops, np.split(bottoms[0].data, split, axis=axis)):
        np.testing.assert_array_equal(top.data, part)
    check_gradient(layer, bottoms, tops)


def test_slice_then_concat_is_identity():
    x = rand(3, 7, 2)
    _, _, parts = run_forward('name: "s" type: "Slice" slice_param { slice_point: 2 slice_point: 3 }', [x], 3)
    _, _, tops = run_forward('name: "c" type: "Concat"', [p.data for p in parts])
    np.testing.assert_array_equal(tops[0].data, x)


@pytest.mark.parametrize("params,num_tops,message", [
    ("slice_point: 3 slice_point: 2", 3, r"layer 's' \(Slice\): slice_point \[3, 2\] must be increasing.*"
                                         r"bottom shape \(2, 6, 3\)"),
    ("slice_point: 0", 2, "must be increasing"),
    ("slice_point: 7", 2, r"within \(0, 6\]"),
    ("slice_point: 2", 3, "1 slice_point.* for 3 tops"),
    ("", 4, r"4 tops do not evenly divide axis 1 of size 6"),
    ("axis: 1 slice_dim: 1", 2, "not both"),
])
def test_slice_errors(params, num_tops, message):
    layer = make_layer(f'name: "s" type: "Slice" slice_param {{ {params} }}')
    with pytest.raises(LayerError, match=message):
        setup_layer(layer, make_bottoms([(2, 6, 3)]), num_tops)


# -- Flatten and Reshape ---------------------------------------------------------------------------

def assert_shares_memory(top, bottom):
    assert np.shares_memory(top.data, bottom.data) and np.shares_memory(top.diff, bottom.diff)
    bottom.data.reshape(-1)[3] = 42.0
    top.diff.reshape(-1)[5] = -7.0
    assert top.data.reshape(-1)[3] == 42.0 and bottom.diff.reshape(-1)[5] == -7.0


@pytest.mark.parametrize("params,shape,expected", [
    ("", (2, 3, 4, 5), (2, 60)),
    ("axis: 2", (2, 3, 4, 5), (2, 3, 20)),
    ("axis: 1 end_axis: 2", (2, 3, 4, 5), (2, 12, 5)),
    ("axis: 0 end_axis: -2", (2, 3, 4, 5), (24, 5)),
    ("axis: -1", (2, 3), (2, 3)),
])
def test_flatten_shapes_and_sharing(params, shape, expected):
    layer, bottoms, tops = run_forward(f'name: "f" type: "Flatten" flatten_param {{ {params} }}', [rand(*shape)])
    assert tops[0].shape == expected
    np.testing.assert_array_equal(tops[0].data, bottoms[0].data.reshape(expected))
    assert_shares_memory(tops[0], bottoms[0])
    layer.backward(tops, [True], bottoms)
    assert bottoms[0].diff.reshape(-1)[5] == -7.0   # backward leaves the shared diff alone


def test_flatten_errors():
    layer = make_layer('name: "f" type: "Flatten" flatten_param { axis: 2 end_axis: 1 }')
    with pytest.raises(LayerError, match=r"layer 'f' \(Flatten\): .*end_axis 1 comes before axis 2.*\(2, 3, 4\)"):
        setup_layer(layer, make_bottoms([(2, 3, 4)]), 1)
    layer = make_layer('name: "f" type: "Flatten" flatten_param { axis: 4 }')
    with pytest.raises(LayerError, match="flatten_param.axis: axis 4 out of range"):
        setup_layer(layer, make_bottoms([(2, 3, 4)]), 1)
    bottoms = make_bottoms([(2, 3)])
    with pytest.raises(LayerError, match="in place"):
        make_layer('name: "f" type: "Flatten"').layer_setup(bottoms, bottoms)


@pytest.mark.parametrize("params,shape,expected", [   # cases from Caffe's test_reshape_layer.cpp
    ("shape { dim: 6 dim: 2 dim: 3 dim: 5 }", (2, 3, 6, 5), (6, 2, 3, 5)),
    ("shape { dim: 0 dim: -1 }", (2, 3, 6, 5), (2, 90)),
    ("shape { dim: 0 dim: 2 dim: -1 dim: 0 }", (2, 3, 6, 5), (2, 2, 9, 5)),
    ("shape { dim: 0 dim: 3 dim: 2 dim: -1 }", (2, 3, 6, 5), (2, 3, 2, 15)),
    ("shape { dim: 1 } axis: 0 num_axes: 0", (2, 3, 6, 5), (1, 2, 3, 6, 5)),
    ("shape { dim: 1 } axis: -1 num_axes: 0", (2, 3, 6, 5), (2, 3, 6, 5, 1)),
    ("shape { dim: 3 dim: 2 } axis: 1 num_axes: 1", (2, 6, 5), (2, 3, 2, 5)),
    ("shape { dim: -1 } axis: 1 num_axes: 2", (2, 3, 6, 5), (2, 18, 5)),
    ("shape { } axis: 1 num_axes: 1", (2, 1, 6), (2, 6)),
    ("shape { dim: -1 }", (2, 3), (6,)),
])
def test_reshape_shapes_and_sharing(params, shape, expected):
    layer, bottoms, tops = run_forward(f'name: "r" type: "Reshape" reshape_param {{ {params} }}', [rand(*shape)])
    assert tops[0].shape == expected
    np.testing.assert_array_equal(tops[0].data, bottoms[0].data.reshape(expected))
    assert_shares_memory(tops[0], bottoms[0])


def test_reshape_follows_a_new_bottom_shape():
    layer, bottoms, tops = run_forward('name: "r" type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }',
                                       [rand(2, 3, 4)])
    bottoms[0].reshape((5, 2, 2))
    layer.reshape(bottoms, tops)
    assert tops[0].shape == (5, 4)
    assert_shares_memory(tops[0], bottoms[0])


@pytest.mark.parametrize("params,message", [
    ("shape { dim: 5 dim: 7 }", r"layer 'r' \(Reshape\): .*gives shape \(5, 7\) with 35 values, but bottom shape "
                               r"\(2, 3, 4\) has 24"),
    ("shape { dim: -1 dim: -1 }", "more than one -1"),
    ("shape { dim: 5 dim: -1 }", r"cannot infer .*\(2, 3, 4\).*not divisible by 5"),
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 }", "the 0 at position 3 has no bottom axis"),
    ("shape { dim: -2 dim: -12 }", "must be -1, 0 or positive"),
    ("shape { dim: 2 } axis: 4", "axis 4 out of range"),
    ("shape { dim: 2 } axis: 1 num_axes: 3", "runs past the end"),
    ("shape { dim: 2 } num_axes: -2", "num_axes must be -1"),
])
def test_reshape_errors(params, message):
    layer = make_layer(f'name: "r" type: "Reshape" reshape_param {{ {params} }}')
    with pytest.raises(LayerError, match=message):
        setup_layer(layer, make_bottoms([(2, 3, 4)]), 1)


def test_reshape_and_flatten_gradients_flow_through_a_net():
    """Shared diffs in a net: the loss gradient reaches the input through Flatten and Reshape."""
    text = """force_backward: true
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 } } }
    layer { name: "f" type: "Flatten" bottom: "x" top: "f" }
    layer { name: "r" type: "Reshape" bottom: "f" top: "r" reshape_param { shape { dim: 4 dim: -1 } } }
    layer { name: "sq" type: "Reduction" bottom: "r" top: "loss" loss_weight: 1
            reduction_param { operation: SUMSQ coeff: 0.5 } }"""
    with blob_dtype(np.float64):
        net = Net(text_format.Parse(text, pb.NetParameter()), phase=pb.TRAIN)
    x = rand(2, 3, 4)
    net.forward(x=x)
    np.testing.assert_allclose(net.blobs["loss"].data, 0.5 * np.sum(x * x))
    np.testing.assert_allclose(net.backward()["x"], x)


# -- Crop, Tile, Silence ---------------------------------------------------------------------------

CROP_CASES = [  # (crop_param, bottom 0 shape, bottom 1 shape, numpy window)
    ("", (2, 3, 6, 5), (1, 1, 4, 2), np.s_[:, :, 0:4, 0:2]),
    ("offset: 1", (2, 3, 6, 5), (2, 3, 4, 3), np.s_[:, :, 1:5, 1:4]),
    ("axis: 1 offset: 1 offset: 2 offset: 0", (2, 4, 6, 5), (2, 2, 3, 5), np.s_[:, 1:3, 2:5, 0:5]),
    ("axis: -1 offset: 2", (2, 3, 6), (9, 9, 3), np.s_[:, :, 2:5]),
    ("axis: 0 offset: 1", (3, 4), (2, 2), np.s_[1:3, 1:3]),
]


@pytest.mark.parametrize("params,shape,reference_shape,window", CROP_CASES)
def test_crop_values_and_gradient(params, shape, reference_shape, window):
    layer, bottoms, tops = run_forward(f'name: "cr" type: "Crop" crop_param {{ {params} }}',
                                       [rand(*shape), np.zeros(reference_shape)])
    np.testing.assert_array_equal(tops[0].data, bottoms[0].data[window])
    check_gradient(layer, bottoms, tops, check_bottoms=[0])
    tops[0].diff[...] = 1
    for b in bottoms:
        b.diff[...] = 5
    layer.backward(tops, [True, True], bottoms)
    expected = np.zeros(shape)
    expected[window] = 1
    np.testing.assert_array_equal(bottoms[0].diff, expected)    # zero outside the window
    np.testing.assert_array_equal(bottoms[1].diff, 0)           # the reference only gives a shape


@pytest.mark.parametrize("params,reference_shape,message", [
    ("offset: 3", (2, 3, 4, 4), r"layer 'cr' \(Crop\): crop of size 4 at offset 3 runs past axis 2 of bottom 0 "
                                r"\(shape \(2, 3, 6, 5\), bottom 1 shape \(2, 3, 4, 4\)\)"),
    ("", (2, 3, 7, 5), "crop of size 7 at offset 0 runs past axis 2"),
    ("offset: 1 offset: 1 offset: 1", (2, 3, 4, 4), "one offset or one per cropped axis"),
    ("axis: 4", (2, 3, 4, 4), "crop_param.axis: axis 4 out of range"),
    ("", (2, 3, 4), "fewer axes"),
])
def test_crop_errors(params, reference_shape, message):
    layer = make_layer(f'name: "cr" type: "Crop" crop_param {{ {params} }}')
    with pytest.raises(LayerError, match=message):
        setup_layer(layer, make_bottoms([(2, 3, 6, 5), reference_shape]), 1)


@pytest.mark.parametrize("params,shape,axis,tiles", [
    ("tiles: 3", (2, 3, 2), 1, 3),
    ("axis: 0 tiles: 2", (2, 3), 0, 2),
    ("axis: -1 tiles: 4", (2, 2, 3), 2, 4),
])
def test_tile_values_and_gradient(params, shape, axis, tiles):
    layer, bottoms, tops = run_forward(f'name: "t" type: "Tile" tile_param {{ {params} }}', [rand(*shape)])
    reps = [1] * len(shape)
    reps[axis] = tiles
    # Caffe tiles the whole block from the axis on, which is np.tile along that axis.
    np.testing.assert_array_equal(tops[0].data, np.tile(bottoms[0].data, reps))
    check_gradient(layer, bottoms, tops)


@pytest.mark.parametrize("params,message", [("", "tiles must be given"), ("tiles: 0", "tiles must be given"),
                                            ("tiles: 2 axis: 3", "tile_param.axis: axis 3 out of range")])
def test_tile_errors(params, message):
    layer = make_layer(f'name: "t" type: "Tile" tile_param {{ {params} }}')
    with pytest.raises(LayerError, match=message):
        setup_layer(layer, make_bottoms([(2, 3)]), 1)


def test_silence_zeroes_bottom_diffs():
    layer = make_layer('name: "s" type: "Silence"')
    bottoms = make_bottoms([(2, 3), (4,)])
    setup_layer(layer, bottoms, 0)
    layer.forward(bottoms, [])
    for b in bottoms:
        b.diff[...] = 3
    layer.backward([], [True, False], bottoms)
    np.testing.assert_array_equal(bottoms[0].diff, 0)
    np.testing.assert_array_equal(bottoms[1].diff, 3)
    with pytest.raises(LayerError, match="exactly 0 top"):
        setup_layer(make_layer('name: "s" type: "Silence"'), make_bottoms([(2,)]), 1)


# -- Reduction -------------------------------------------------------------------------------------

def ref_reduction(x, operation, axis, coeff):
    rows = x.reshape(int(np.prod(x.shape[:axis])), -1)
    reduced = {"SUM": rows.sum(1), "ASUM": np.abs(rows).sum(1), "SUMSQ": (rows ** 2).sum(1),
               "MEAN": rows.mean(1)}[operation]
    return (coeff * reduced).reshape(x.shape[:axis])


@pytest.mark.parametrize("operation", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis,coeff", [(0, 1.0), (1, 1.0), (1, -2.5), (0, 0.5), (-1, 3.0)])
def test_reduction_values_and_gradient(operation, axis, coeff):
    text = f'name: "red" type: "Reduction" reduction_param {{ operation: {operation} axis: {axis} coeff: {coeff} }}'
    x = rand(2, 3, 4)
    layer, bottoms, tops = run_forward(text, [x])
    canonical = axis % 3
    assert tops[0].shape == x.shape[:canonical]
    np.testing.assert_allclose(tops[0].data, ref_reduction(x, operation, canonical, coeff), rtol=1e-12)
    check_gradient(layer, bottoms, tops, kink=0.0, kink_range=1e-3)


def test_reduction_error():
    layer = make_layer('name: "red" type: "Reduction" reduction_param { axis: 3 }')
    with pytest.raises(LayerError, match=r"layer 'red' \(Reduction\): reduction_param.axis: axis 3 out of range"):
        setup_layer(layer, make_bottoms([(2, 3, 4)]), 1)


# -- ArgMax ----------------------------------------------------------------------------------------

def ref_argmax(x, top_k, axis):
    """Indices of the top_k largest values along ``axis``, larger index first on ties (Caffe's
    descending sort of (value, index) pairs), written as a plain loop over the other positions."""
    moved = np.moveaxis(x, axis, -1)
    indices = np.zeros(moved.shape[:-1] + (top_k,), dtype=np.int64)
    for position in np.ndindex(moved.shape[:-1]):
        pairs = sorted(((v, j) for j, v in enumerate(moved[position])), reverse=True)
        indices[position] = [j for _, j in pairs[:top_k]]
    return np.moveaxis(indices, -1, axis)


@pytest.mark.parametrize("top_k", [1, 3])
def test_argmax_over_each_sample(top_k):
    x = np.round(rand(3, 2, 2, 2) * 4) / 4     # plenty of ties
    _, _, tops = run_forward(f'name: "am" type: "ArgMax" argmax_param {{ top_k: {top_k} }}', [x])
    assert tops[0].shape == (3, 1, top_k, 1)
    expected = ref_argmax(x.reshape(3, -1), top_k, 1)
    np.testing.assert_array_equal(tops[0].data.reshape(3, top_k), expected)

    _, _, tops = run_forward(f'name: "am" type: "ArgMax" argmax_param {{ top_k: {top_k} out_max_val: true }}', [x])
    assert tops[0].shape == (3, 2, top_k, 1)
    np.testing.assert_array_equal(tops[0].data[:, 0, :, 0], expected)
    np.testing.assert_array_equal(tops[0].data[:, 1, :, 0], np.take_along_axis(x.reshape(3, -1), expected, 1))


@pytest.mark.parametrize("axis,top_k", [(1, 1), (1, 2), (0, 1), (-1, 3)])
@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_along_an_axis(axis, top_k, out_max_val):
    x = np.round(rand(3, 4, 5) * 3) / 3
    params = f"axis: {axis} top_k: {top_k} out_max_val: {str(out_max_val).lower()}"
    _, _, tops = run_forward(f'name: "am" type: "ArgMax" argmax_param {{ {params} }}', [x])
    indices = ref_argmax(x, top_k, axis)
    expected = np.take_along_axis(x, indices, axis) if out_max_val else indices
    np.testing.assert_array_equal(tops[0].data, expected)


def test_argmax_of_a_2d_bottom_is_3d():
    _, _, tops = run_forward('name: "am" type: "ArgMax"', [np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.1]])])
    assert tops[0].shape == (2, 1, 1)
    np.testing.assert_array_equal(tops[0].data.ravel(), [1, 1])


@pytest.mark.parametrize("params,message", [
    ("top_k: 25", r"layer 'am' \(ArgMax\): top_k 25 exceeds the 24 values per sample of bottom shape \(2, 3, 8\)"),
    ("top_k: 4 axis: 1", "top_k 4 exceeds the 3 values along argmax_param.axis"),
    ("top_k: 0", "top_k must be at least 1"),
    ("axis: 3", "argmax_param.axis: axis 3 out of range"),
])
def test_argmax_errors(params, message):
    layer = make_layer(f'name: "am" type: "ArgMax" argmax_param {{ {params} }}')
    with pytest.raises(LayerError, match=message):
        setup_layer(layer, make_bottoms([(2, 3, 8)]), 1)


def test_argmax_has_no_backward():
    layer, bottoms, tops = run_forward('name: "am" type: "ArgMax"', [rand(2, 3)])
    assert not layer.allow_force_backward(0)
    with pytest.raises(LayerError, match="no backward"):
        layer.backward(tops, [True], bottoms)


# -- Embed -----------------------------------------------------------------------------------------

EMBED = ('name: "emb" type: "Embed" embed_param {{ num_output: 5 input_dim: 7 bias_term: {bias} '
         'weight_filler {{ type: "gaussian" std: 1 }} bias_filler {{ type: "gaussian" std: 1 }} }}')


def embed_layer(indices, bias=True, dtype=np.float64):
    layer = make_layer(EMBED.format(bias=str(bias).lower()))
    bottoms = make_bottoms([indices.shape], dtype=dtype)
    bottoms[0].data[...] = indices
    tops = setup_layer(layer, bottoms, 1, dtype=dtype)
    return layer, bottoms, tops


@pytest.mark.parametrize("bias", [True, False])
def test_embed_values_and_weight_gradient(bias):
    indices = np.array([[0, 3, 6], [3, 3, 1]], dtype=float)     # repeated rows accumulate
    layer, bottoms, tops = embed_layer(indices, bias)
    assert [b.shape for b in layer.blobs] == [(7, 5), (5,)][:2 if bias else 1]
    layer.forward(bottoms, tops)
    expected = layer.blobs[0].data[indices.astype(int)] + (layer.blobs[1].data if bias else 0)
    np.testing.assert_allclose(tops[0].data, expected, rtol=1e-14)
    assert tops[0].shape == (2, 3, 5)
    check_gradient(layer, bottoms, tops, check_bottoms=[])


def test_embed_backward_accumulates_into_weight_rows():
    layer, bottoms, tops = embed_layer(np.array([2.0, 5.0, 2.0]), bias=True)
    layer.forward(bottoms, tops)
    for p in layer.blobs:
        p.diff[...] = 1.0
    tops[0].diff[...] = np.arange(15.0).reshape(3, 5)
    layer.backward(tops, [False], bottoms)
    expected = np.ones((7, 5))
    expected[2] += tops[0].diff[0] + tops[0].diff[2]
    expected[5] += tops[0].diff[1]
    np.testing.assert_array_equal(layer.blobs[0].diff, expected)
    np.testing.assert_array_equal(layer.blobs[1].diff, 1 + tops[0].diff.sum(0))
    with pytest.raises(LayerError, match="cannot back-propagate to its input indices"):
        layer.backward(tops, [True], bottoms)
    assert not layer.allow_force_backward(0)


@pytest.mark.parametrize("bad,shown", [(7.0, "7.0"), (-1.0, "-1.0"), (2.5, "2.5"), (np.nan, "nan")])
def test_embed_rejects_bad_indices(bad, shown):
    layer, bottoms, tops = embed_layer(np.array([[1.0, 2.0], [0.0, bad]]))
    with pytest.raises(LayerError, match=rf"layer 'emb' \(Embed\): input {shown} at position \(1, 1\) of bottom "
                                         rf"'bottom0' is not an index in \[0, input_dim=7\)"):
        layer.forward(bottoms, tops)


@pytest.mark.parametrize("params,message", [("num_output: 0 input_dim: 3", "num_output must be positive"),
                                            ("num_output: 3", "input_dim must be positive")])
def test_embed_parameter_errors(params, message):
    with pytest.raises(LayerError, match=message):
        setup_layer(make_layer(f'name: "emb" type: "Embed" embed_param {{ {params} }}'), make_bottoms([(2,)]), 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 3])
def test_embed_kernels_match_numpy(dtype, threads):
    rng = np.random.default_rng(4)
    rows, width, count = 11, 40, 300
    indices = rng.integers(0, rows, count).astype(dtype)
    weight = rng.standard_normal((rows, width)).astype(dtype)
    top = np.zeros((count, width), dtype)
    structure.embed_gather(indices, weight, top, threads)
    np.testing.assert_array_equal(top, weight[indices.astype(int)])

    top_diff = rng.standard_normal((count, width)).astype(dtype)
    weight_diff = rng.standard_normal((rows, width)).astype(dtype)
    expected = weight_diff.astype(np.float64)
    np.add.at(expected, indices.astype(int), top_diff.astype(np.float64))
    structure.embed_scatter_add(indices, top_diff, weight_diff, threads)
    np.testing.assert_allclose(weight_diff, expected, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_embed_index_check_kernel():
    assert structure.first_invalid_index(np.array([0.0, 3.0, 4.0]), 5) == -1
    assert structure.first_invalid_index(np.array([0.0, 5.0, 4.0]), 5) == 1
    assert structure.first_invalid_index(np.array([0.0, 1.0, 0.5]), 5) == 2
    assert structure.first_invalid_index(np.array([np.inf], np.float32), 5) == 0
    assert structure.first_invalid_index(np.array([-0.0]), 5) == -1
