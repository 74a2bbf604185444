"""Activation layers (Sigmoid, TanH, AbsVal, BNLL, ELU, Power, Exp, Log, Threshold, Clip, PReLU, ReLU)
and Dropout: forward values against NumPy formulas, float64 gradient checks out of place and in place,
the activation kernels against NumPy references, the dropout mask's determinism, and the errors."""
import collections
import tracemalloc

import numpy as np
import pytest
from google.protobuf import text_format

from gradient_check import check_gradient, make_bottoms, setup_layer
from minicaffe import rng
from minicaffe.blob import Blob, blob_dtype
from minicaffe.errors import LayerError
from minicaffe.kernels import activation
from minicaffe.layer import create_layer
from minicaffe.proto import minicaffe_pb2 as pb
from minicaffe.solvers import get_solver

SHAPE = (2, 3, 4, 5)
HAS_SCALE_TRAIN = "scale_train" in pb.DropoutParameter.DESCRIPTOR.fields_by_name


def make_layer(type_name, params="", phase=pb.TRAIN):
    text = f'name: "act" type: "{type_name}" {params}'
    return create_layer(text_format.Parse(text, pb.LayerParameter()), phase)


def away_from(values, kinks, margin=1e-3):
    """Moves inputs off the points where the function has no derivative."""
    for kink in kinks:
        near = np.abs(values - kink) < margin
        values[near] = kink + np.where(values[near] >= kink, margin, -margin)
    return values


Case = collections.namedtuple("Case", "type params reference low high kinks")


def f32(value):
    """A parameter as the float32 proto field holds it."""
    return float(np.float32(value))


def elu(alpha):
    return lambda x: np.where(x > 0, x, alpha * (np.exp(x) - 1))


CASES = [
    Case("ReLU", "relu_param { negative_slope: 0.1 }", lambda x: np.where(x > 0, x, f32(0.1) * x),
         -1, 1, [0]),
    Case("Sigmoid", "", lambda x: 1 / (1 + np.exp(-x)), -4, 4, []),
    Case("TanH", "", np.tanh, -2, 2, []),
    Case("AbsVal", "", np.abs, -1, 1, [0]),
    Case("BNLL", "", lambda x: np.log1p(np.exp(x)), -5, 5, []),
    Case("ELU", "", elu(1.0), -2, 2, []),
    Case("ELU", "elu_param { alpha: 0.3 }", elu(f32(0.3)), -2, 2, [0]),
    Case("ELU", "elu_param { alpha: 2.5 }", elu(2.5), -2, 2, [0]),
    Case("Power", "power_param { power: 2 scale: 0.5 shift: 1 }", lambda x: (1 + 0.5 * x) ** 2, -1, 1, []),
    Case("Power", "power_param { power: 3 scale: 2 }", lambda x: (2 * x) ** 3, -1, 1, []),
    Case("Power", "power_param { power: 0.5 shift: 2 }", lambda x: np.sqrt(2 + x), -1, 1, []),
    Case("Power", "power_param { power: -1.5 scale: 0.7 shift: 3 }", lambda x: (3 + f32(0.7) * x) ** -1.5,
         -1, 1, []),
    Case("Power", "power_param { scale: 3 shift: -1 }", lambda x: 3 * x - 1, -1, 1, []),
    Case("Power", "power_param { power: 0 scale: 2 shift: 5 }", lambda x: np.ones_like(x), -1, 1, []),
    Case("Power", "power_param { power: 2 scale: 0 shift: 3 }", lambda x: np.full_like(x, 9.0), -1, 1, []),
    Case("Exp", "", np.exp, -2, 2, []),
    Case("Exp", "exp_param { base: 2 scale: 0.5 shift: 1 }", lambda x: 2 ** (1 + 0.5 * x), -2, 2, []),
    Case("Exp", "exp_param { scale: -2 shift: 1 }", lambda x: np.exp(1 - 2 * x), -1, 1, []),
    Case("Log", "", np.log, 0.5, 2, []),
    Case("Log", "log_param { base: 10 scale: 2 shift: 1 }", lambda x: np.log10(1 + 2 * x), -0.4, 1, []),
    Case("Log", "log_param { base: 2 scale: 0.5 }", lambda x: np.log2(0.5 * x), 0.5, 2, []),
    Case("Threshold", "threshold_param { threshold: 0.2 }", lambda x: (x > f32(0.2)).astype(x.dtype),
         -1, 1, []),
    Case("Clip", "clip_param { min: -0.5 max: 0.4 }", lambda x: np.clip(x, -0.5, f32(0.4)),
         -1, 1, [-0.5, 0.4]),
    Case("PReLU", "", lambda x: np.where(x > 0, x, 0.25 * x), -1, 1, [0]),
    Case("PReLU", "prelu_param { channel_shared: true filler { type: 'constant' value: -0.6 } }",
         lambda x: np.where(x > 0, x, f32(-0.6) * x), -1, 1, [0]),
]
WITH_BACKWARD = [c for c in CASES if c.type != "Threshold"]
IN_PLACE = [c for c in CASES if c.type != "AbsVal"]  # Caffe refuses AbsVal in place, and so do we


def case_id(case):
    return f"{case.type}({case.params})" if case.params else case.type


def bottoms_for(case, dtype=np.float64, shape=SHAPE, seed=0):
    bottoms = make_bottoms([shape], dtype=dtype, seed=seed, low=case.low, high=case.high)
    away_from(bottoms[0].data, case.kinks)
    return bottoms


# -- forward values --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tolerance", [(np.float64, 1e-12), (np.float32, 2e-6)])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_formula(case, dtype, tolerance):
    layer = make_layer(case.type, case.params)
    bottoms = bottoms_for(case, dtype)
    tops = setup_layer(layer, bottoms, 1, dtype)
    layer.forward(bottoms, tops)
    assert tops[0].shape == SHAPE and tops[0].dtype == dtype
    expected = case.reference(bottoms[0].data.astype(np.float64))
    np.testing.assert_allclose(tops[0].data, expected, rtol=tolerance, atol=tolerance)


def test_bnll_does_not_overflow_and_keeps_tiny_values():
    layer = make_layer("BNLL")
    bottoms = make_bottoms([(5,)], dtype=np.float32)
    bottoms[0].data[...] = [-200, -30, 0, 30, 200]
    tops = setup_layer(layer, bottoms, 1, np.float32)
    layer.forward(bottoms, tops)
    np.testing.assert_allclose(tops[0].data, [0, np.exp(-30.0), np.log(2), 30, 200], rtol=1e-6, atol=1e-30)
    assert tops[0].data[0] == 0 and tops[0].data[1] > 0  # exp(-200) underflows float32; exp(-30) does not


def test_sigmoid_saturates_without_overflow():
    layer = make_layer("Sigmoid")
    bottoms = make_bottoms([(4,)], dtype=np.float32)
    bottoms[0].data[...] = [-1000, -20, 20, 1000]
    tops = setup_layer(layer, bottoms, 1, np.float32)
    with np.errstate(all="raise"):
        layer.forward(bottoms, tops)
    expected = [0, 1 / (1 + np.exp(20.0)), 1 / (1 + np.exp(-20.0)), 1]
    np.testing.assert_allclose(tops[0].data, expected, atol=1e-7)


# -- gradients -------------------------------------------------------------------------------------

def uniform_slopes(case):
    """PReLU with distinct per-channel slopes, so that a wrong channel index shows."""
    if case.type == "PReLU" and "channel_shared" not in case.params:
        return Case(case.type, "prelu_param { filler { type: 'uniform' min: -0.5 max: 0.8 } }", None,
                    case.low, case.high, case.kinks)
    return case


@pytest.mark.parametrize("case", WITH_BACKWARD, ids=case_id)
def test_gradient(case):
    case = uniform_slopes(case)
    layer = make_layer(case.type, case.params)
    bottoms = bottoms_for(case)
    tops = setup_layer(layer, bottoms, 1)
    check_gradient(layer, bottoms, tops)


class InPlace:
    """Presents a layer run in place to the gradient checker as one with a separate top.

    Forward copies the checker's bottom into the one blob the layer reads and writes; backward puts
    the top diff in that blob's diff, runs the layer's backward there, and copies the result out.
    """

    def __init__(self, layer):
        self.layer = layer
        self.name, self.type_name = layer.name, layer.type_name
        with blob_dtype(np.float64):
            self.shared = Blob(name="shared")

    @property
    def blobs(self):
        return self.layer.blobs

    def layer_setup(self, bottom, top):
        self.shared.reshape(bottom[0].shape)
        self.shared.data[...] = bottom[0].data
        self.layer.layer_setup([self.shared], [self.shared])
        top[0].reshape(bottom[0].shape)

    def reshape(self, bottom, top):
        self.shared.reshape(bottom[0].shape)
        self.layer.reshape([self.shared], [self.shared])
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        self.shared.data[...] = bottom[0].data
        self.layer.forward([self.shared], [self.shared])
        top[0].data[...] = self.shared.data

    def backward(self, top, propagate_down, bottom):
        self.shared.diff[...] = top[0].diff
        self.layer.backward([self.shared], propagate_down, [self.shared])
        bottom[0].diff[...] = self.shared.diff


@pytest.mark.parametrize("case", [c for c in IN_PLACE if c.type != "Threshold"], ids=case_id)
def test_gradient_in_place(case):
    case = uniform_slopes(case)
    layer = InPlace(make_layer(case.type, case.params))
    bottoms = bottoms_for(case)
    tops = setup_layer(layer, bottoms, 1)
    check_gradient(layer, bottoms, tops)


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_in_place_matches_out_of_place(shared):
    params = f"prelu_param {{ channel_shared: {str(shared).lower()} filler {{ type: 'gaussian' std: 0.5 }} }}"
    results = []
    for in_place in (False, True):
        rng.set_seed(7)
        layer = make_layer("PReLU", params)
        bottom = make_bottoms([(3, 4, 2, 3)], seed=2)[0]
        with blob_dtype(np.float64):
            top = bottom if in_place else Blob(name="top")
            layer.layer_setup([bottom], [top])
        layer.forward([bottom], [top])
        output = top.data.copy()
        top.diff[...] = np.random.default_rng(3).standard_normal(top.shape)
        layer.blobs[0].diff[...] = 1.0  # backward accumulates into the slope diff
        layer.backward([top], [True], [bottom])
        results.append((output, bottom.diff.copy(), layer.blobs[0].diff.copy()))
    for out_of_place, in_place in zip(*results):
        np.testing.assert_array_equal(out_of_place, in_place)


def test_prelu_skips_the_slope_gradient_the_solver_does_not_want():
    layer = make_layer("PReLU")
    bottoms = make_bottoms([SHAPE])
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    tops[0].diff[...] = 1.0
    layer.blobs[0].diff[...] = 7.0
    layer.param_propagate_down = [False]
    layer.backward(tops, [True], bottoms)
    np.testing.assert_array_equal(layer.blobs[0].diff, 7.0)
    np.testing.assert_array_equal(bottoms[0].diff, np.where(bottoms[0].data > 0, 1.0, 0.25))


def test_prelu_blob_layout_matches_caffe():
    per_channel = make_layer("PReLU")
    setup_layer(per_channel, make_bottoms([(2, 5, 3)]), 1)
    assert per_channel.blobs[0].shape == (5,)
    np.testing.assert_array_equal(per_channel.blobs[0].data, 0.25)
    shared = make_layer("PReLU", "prelu_param { channel_shared: true }")
    setup_layer(shared, make_bottoms([(2, 5)]), 1)
    assert shared.blobs[0].shape == () and shared.blobs[0].data == 0.25


def test_power_special_cases_have_caffe_gradients():
    """power * scale == 0 gives a zero gradient even where the top diff is not finite; power 1
    gives the constant scale."""
    bottoms = make_bottoms([(6,)])
    for params, expected in [("power_param { power: 0 scale: 2 shift: 3 }", 0.0),
                             ("power_param { power: 2 scale: 0 shift: 3 }", 0.0),
                             ("power_param { power: 1 scale: -1.5 shift: 3 }", -1.5)]:
        layer = make_layer("Power", params)
        tops = setup_layer(layer, bottoms, 1)
        layer.forward(bottoms, tops)
        tops[0].diff[...] = 2.0
        tops[0].diff[0] = np.inf if expected == 0 else 2.0
        layer.backward(tops, [True], bottoms)
        np.testing.assert_array_equal(bottoms[0].diff, 2.0 * expected)


def test_power_constant_output_follows_c_pow():
    for params, expected in [("power_param { power: 0.5 scale: 0 shift: -4 }", np.nan),
                             ("power_param { power: -1 scale: 0 shift: 0 }", np.inf)]:
        layer = make_layer("Power", params)
        bottoms = make_bottoms([(3,)])
        with np.errstate(invalid="ignore", divide="ignore"):
            tops = setup_layer(layer, bottoms, 1)
        layer.forward(bottoms, tops)
        np.testing.assert_array_equal(tops[0].data, expected)


# -- in place --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", IN_PLACE, ids=case_id)
def test_in_place_forward_equals_out_of_place(case):
    out_of_place, in_place = make_layer(case.type, case.params), make_layer(case.type, case.params)
    bottoms = bottoms_for(case)
    tops = setup_layer(out_of_place, bottoms, 1)
    out_of_place.forward(bottoms, tops)
    shared = bottoms_for(case)[0]
    with blob_dtype(np.float64):
        in_place.layer_setup([shared], [shared])
    in_place.forward([shared], [shared])
    np.testing.assert_array_equal(shared.data, tops[0].data)


def test_absval_refuses_in_place_as_caffe():
    layer = make_layer("AbsVal")
    blob = make_bottoms([SHAPE])[0]
    with pytest.raises(LayerError, match=r"layer 'act' \(AbsVal\): cannot run in place"):
        layer.layer_setup([blob], [blob])


# -- no allocation once shaped ---------------------------------------------------------------------

DROPOUT = Case("Dropout", "", None, -1, 1, [])
ALLOCATION_CASES = ([(c, False) for c in WITH_BACKWARD + [DROPOUT]]
                    + [(c, True) for c in WITH_BACKWARD + [DROPOUT] if c.type != "AbsVal"])


@pytest.mark.parametrize("case,in_place", ALLOCATION_CASES,
                         ids=[f"{case_id(c)}-{'in place' if p else 'own top'}" for c, p in ALLOCATION_CASES])
def test_forward_and_backward_do_not_allocate(case, in_place):
    layer = make_layer(case.type, case.params)
    shape = (4, 8, 32, 32)  # 128 KiB of float32 per buffer
    bottom = bottoms_for(case, np.float32, shape)[0]
    inputs = bottom.data.copy()
    top = bottom if in_place else Blob(name="top")
    layer.layer_setup([bottom], [top])
    layer.forward([bottom], [top])
    layer.backward([top], [True], [bottom])
    tracemalloc.start()
    try:
        bottom.data[...] = inputs
        layer.reshape([bottom], [top])
        layer.forward([bottom], [top])
        layer.backward([top], [True], [bottom])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024, f"{peak} bytes allocated"


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("type_name,params,message", [
    ("Clip", "", r"needs clip_param\.min and clip_param\.max"),
    ("Clip", "clip_param { min: 1 }", r"needs clip_param\.max"),
    ("Clip", "clip_param { min: 1 max: 0.5 }", r"clip_param\.min 1 is greater than clip_param\.max 0\.5"),
    ("Exp", "exp_param { base: -2 }", r"exp_param\.base must be strictly positive \(or -1 for e\), got -2"),
    ("Exp", "exp_param { base: 0 }", r"exp_param\.base must be strictly positive"),
    ("Log", "log_param { base: -3 }", r"log_param\.base must be strictly positive \(or -1 for e\), got -3"),
    ("Log", "log_param { base: 1 }", r"log_param\.base 1 gives 1 / log\(base\) = inf"),
    ("Log", "log_param { base: inf }", r"log_param\.base inf has an infinite logarithm"),
    ("Dropout", "dropout_param { dropout_ratio: 1 }",
     r"dropout_param\.dropout_ratio must be in \[0, 1\), got 1$"),
    ("Dropout", "dropout_param { dropout_ratio: -0.1 }", r"dropout_param\.dropout_ratio .*, got -0\.1$"),
    ("PReLU", "prelu_param { filler { type: 'nope' } }", r"prelu_param\.filler: unknown filler type 'nope'"),
])
def test_bad_parameters_are_layer_errors(type_name, params, message):
    layer = make_layer(type_name, params)
    with pytest.raises(LayerError, match=rf"layer 'act' \({type_name}\): {message}"):
        setup_layer(layer, make_bottoms([SHAPE]), 1)


def test_threshold_backward_is_an_error_but_forward_only_is_fine():
    layer = make_layer("Threshold")
    bottoms = make_bottoms([SHAPE])
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    layer.backward(tops, [False], bottoms)
    with pytest.raises(LayerError, match=r"layer 'act' \(Threshold\): has no backward pass"):
        layer.backward(tops, [True], bottoms)


def test_prelu_shape_errors():
    with pytest.raises(LayerError, match=r"\(PReLU\): needs a bottom with at least 2 axes .* \(6,\)"):
        setup_layer(make_layer("PReLU"), make_bottoms([(6,)]), 1)
    layer = make_layer("PReLU")
    bottoms = make_bottoms([(2, 3, 4)])
    tops = setup_layer(layer, bottoms, 1)
    bottoms[0].reshape((2, 5, 4))
    with pytest.raises(LayerError, match=r"has 3 slopes but the bottom \(2, 5, 4\) has 5 channels"):
        layer.reshape(bottoms, tops)


def test_wrong_number_of_blobs_is_an_error():
    with pytest.raises(LayerError, match=r"\(Sigmoid\): takes exactly 1 bottom blob\(s\), got 2"):
        setup_layer(make_layer("Sigmoid"), make_bottoms([SHAPE, SHAPE]), 1)


# -- Dropout ---------------------------------------------------------------------------------------

GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def mix64_reference(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def keep_mask_reference(seed, position, count, ratio):
    """Which elements forward number ``position`` keeps: SplitMix64 words, in NumPy uint64 arithmetic."""
    key = mix64_reference(mix64_reference(np.array([seed], np.uint64)) + np.uint64(position))
    words = mix64_reference(key + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(GOLDEN_GAMMA))
    return (words >> np.uint64(32)) >= np.uint64(round(ratio * 2**32))


def dropout_layer(ratio=0.5, phase=pb.TRAIN, shape=SHAPE, seed=5, extra=""):
    rng.set_seed(seed)
    layer = make_layer("Dropout", f"dropout_param {{ dropout_ratio: {ratio} {extra} }}", phase)
    bottoms = make_bottoms([shape], low=0.5, high=1.5)  # never 0, so a zero output means dropped
    tops = setup_layer(layer, bottoms, 1)
    return layer, bottoms, tops


def test_dropout_train_forward_and_backward_use_one_mask():
    layer, bottoms, tops = dropout_layer(ratio=0.3, shape=(10, 20, 25))
    layer.forward(bottoms, tops)
    x, y = bottoms[0].data, tops[0].data
    kept = keep_mask_reference(layer.seed, 0, x.size, f32(0.3)).reshape(x.shape)
    np.testing.assert_allclose(y, np.where(kept, x / (1 - f32(0.3)), 0), rtol=1e-12)
    assert abs(kept.mean() - 0.7) < 4 * np.sqrt(0.21 / kept.size)
    tops[0].diff[...] = np.random.default_rng(1).standard_normal(x.shape)
    layer.backward(tops, [True], bottoms)
    np.testing.assert_allclose(bottoms[0].diff, np.where(kept, tops[0].diff / (1 - f32(0.3)), 0), rtol=1e-12)


def test_dropout_gradient_with_a_fixed_mask():
    layer, bottoms, tops = dropout_layer(ratio=0.4)
    draw = layer.forward_flat

    def forward_with_mask_0(x, y):
        layer.set_position(0)
        draw(x, y)

    layer.forward_flat = forward_with_mask_0
    check_gradient(layer, bottoms, tops)


def test_dropout_mask_is_a_function_of_seed_and_position():
    first, bottoms, tops = dropout_layer()
    outputs = []
    for _ in range(3):
        first.forward(bottoms, tops)
        outputs.append(tops[0].data.copy())
    assert not np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[1], outputs[2])
    again, bottoms, tops = dropout_layer()  # the same random_seed gives the same layer seed
    assert again.seed == first.seed
    for position in (2, 0, 1):
        again.set_position(position)
        again.forward(bottoms, tops)
        np.testing.assert_array_equal(tops[0].data, outputs[position])
    assert again.position == 2
    other, bottoms, tops = dropout_layer(seed=6)
    other.forward(bottoms, tops)
    assert not np.array_equal(tops[0].data, outputs[0])


def test_dropout_in_place_matches_out_of_place():
    layer, bottoms, tops = dropout_layer()
    layer.forward(bottoms, tops)
    shared_layer, shared_bottoms, _ = dropout_layer()
    blob = shared_bottoms[0]
    shared_layer.reshape([blob], [blob])
    shared_layer.forward([blob], [blob])
    np.testing.assert_array_equal(blob.data, tops[0].data)
    tops[0].diff[...] = blob.diff[...] = 1.0
    layer.backward(tops, [True], bottoms)
    shared_layer.backward([blob], [True], [blob])
    np.testing.assert_array_equal(blob.diff, bottoms[0].diff)


def test_dropout_test_phase_passes_through():
    layer, bottoms, tops = dropout_layer(phase=pb.TEST)
    layer.forward(bottoms, tops)
    np.testing.assert_array_equal(tops[0].data, bottoms[0].data)
    tops[0].diff[...] = 3.0
    layer.backward(tops, [True], bottoms)
    np.testing.assert_array_equal(bottoms[0].diff, 3.0)
    assert layer.position == 0


@pytest.mark.skipif(not HAS_SCALE_TRAIN, reason="the schema's DropoutParameter has no scale_train field")
def test_dropout_without_scale_train_scales_at_test_time():
    layer, bottoms, tops = dropout_layer(ratio=0.25, extra="scale_train: false")
    layer.forward(bottoms, tops)
    kept = keep_mask_reference(layer.seed, 0, bottoms[0].count, 0.25).reshape(SHAPE)
    np.testing.assert_array_equal(tops[0].data, np.where(kept, bottoms[0].data, 0))
    layer, bottoms, tops = dropout_layer(ratio=0.25, phase=pb.TEST, extra="scale_train: false")
    layer.forward(bottoms, tops)
    np.testing.assert_allclose(tops[0].data, 0.75 * bottoms[0].data, rtol=1e-12)
    tops[0].diff[...] = 2.0
    layer.backward(tops, [True], bottoms)
    np.testing.assert_allclose(bottoms[0].diff, 1.5, rtol=1e-12)


def test_dropout_backward_before_forward_is_an_error():
    layer, bottoms, tops = dropout_layer()
    with pytest.raises(LayerError, match=r"\(Dropout\): backward before any forward"):
        layer.backward(tops, [True], bottoms)


def dropout_solver(source, prefix, **fields):
    net = f"""
name: "tiny_dropout"
layer {{ name: "d" type: "Data" top: "data" top: "label" transform_param {{ scale: 0.0039 }}
        data_param {{ source: "{source}" batch_size: 8 backend: IDX shuffle: true }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param {{ num_output: 3 kernel_size: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "prelu" type: "PReLU" bottom: "conv" top: "conv" }}
layer {{ name: "drop" type: "Dropout" bottom: "conv" top: "conv" dropout_param {{ dropout_ratio: 0.4 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param {{ num_output: 4 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""
    param = text_format.Parse(f"net_param {{ {net} }} base_lr: 0.05 momentum: 0.9 lr_policy: 'fixed' "
                              f"max_iter: 8 display: 0 random_seed: 11 snapshot_prefix: '{prefix}' "
                              "snapshot_after_train: false", pb.SolverParameter())
    for key, value in fields.items():
        setattr(param, key, value)
    return get_solver(param)


def test_training_with_dropout_resumes_exactly(tiny_idx, tmp_path):
    prefix = str(tmp_path / "snap" / "tiny")
    uninterrupted = dropout_solver(tiny_idx, prefix)
    uninterrupted.solve()
    first = dropout_solver(tiny_idx, prefix, snapshot=3)
    first.step(3)
    first.close()
    resumed = dropout_solver(tiny_idx, prefix)
    resumed.solve(f"{prefix}_iter_3.solverstate")
    assert resumed.net.layer_dict["drop"].position == uninterrupted.net.layer_dict["drop"].position == 8
    for a, b in zip(uninterrupted.net.learnable_params, resumed.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)
    for s in (uninterrupted, resumed):
        s.close()


# -- kernels against NumPy references --------------------------------------------------------------

THREADS = 2
SIZE = 3 * 16384 + 5  # several work chunks and a ragged tail
KEY = activation.dropout_key(123, 4)
KERNELS = {
    "affine": (lambda x, t, dy, out, n: activation.affine(x, out, 0.7, -0.2, n),
               lambda x, t, dy: 0.7 * x - 0.2),
    "scaled_product": (lambda x, t, dy, out, n: activation.scaled_product(t, dy, out, 0.5, 0.25, n),
                       lambda x, t, dy: dy * (0.5 * t + 0.25)),
    "sigmoid_backward": (lambda x, t, dy, out, n: activation.sigmoid_backward(t, dy, out, n),
                         lambda x, t, dy: dy * t * (1 - t)),
    "tanh_backward": (lambda x, t, dy, out, n: activation.tanh_backward(t, dy, out, n),
                      lambda x, t, dy: dy * (1 - t * t)),
    "absval_backward": (lambda x, t, dy, out, n: activation.absval_backward(x, dy, out, n),
                        lambda x, t, dy: np.sign(x) * dy),
    "bnll_finish": (lambda x, t, dy, out, n: activation.bnll_finish(x, t, out, n),
                    lambda x, t, dy: np.maximum(x, 0) + t),
    "elu_finish": (lambda x, t, dy, out, n: activation.elu_finish(x, t, out, 0.7, n),
                   lambda x, t, dy: np.where(x > 0, x, 0.7 * t)),
    "elu_backward": (lambda x, t, dy, out, n: activation.elu_backward(x, t, dy, out, 0.7, n),
                     lambda x, t, dy: np.where(x > 0, dy, dy * (0.7 + t))),
    "power_backward": (lambda x, t, dy, out, n: activation.power_backward(x, t, dy, out, 1.3, 0.6, 2.0, n),
                       lambda x, t, dy: dy * (1.3 * t / (0.6 * x + 2.0))),
    "log_backward": (lambda x, t, dy, out, n: activation.log_backward(x, dy, out, 0.4, 0.6, 2.0, n),
                     lambda x, t, dy: dy * (0.4 / (0.6 * x + 2.0))),
    "threshold_forward": (lambda x, t, dy, out, n: activation.threshold_forward(x, out, 0.5, n),
                          lambda x, t, dy: (x > 0.5).astype(x.dtype)),
    "clip_forward": (lambda x, t, dy, out, n: activation.clip_forward(x, out, -0.25, 0.5, n),
                     lambda x, t, dy: np.clip(x, -0.25, 0.5)),
    "clip_backward": (lambda x, t, dy, out, n: activation.clip_backward(x, dy, out, -0.25, 0.5, n),
                      lambda x, t, dy: np.where((x >= -0.25) & (x <= 0.5), dy, 0)),
    "dropout_apply": (lambda x, t, dy, out, n: activation.dropout_apply(x, out, KEY, 2**31, 2.0, n),
                      lambda x, t, dy: x * 2.0 * keep_mask_reference(123, 4, x.size, 0.5)),
}


def kernel_inputs(dtype):
    generator = np.random.default_rng(0)
    x = generator.uniform(-1, 1, SIZE).astype(dtype)
    x[:6] = [0, -0.25, 0.5, -0.0, 1, -1]  # the kinks and bounds themselves
    return x, generator.uniform(-1, 1, SIZE).astype(dtype), generator.standard_normal(SIZE).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_matches_reference(name, dtype):
    run, reference = KERNELS[name]
    x, t, dy = kernel_inputs(dtype)
    out = np.empty_like(x)
    run(x, t, dy, out, THREADS)
    expected = reference(x.astype(np.float64), t.astype(np.float64), dy.astype(np.float64))
    tolerance = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance)
    single = np.empty_like(x)
    run(x, t, dy, single, 1)
    np.testing.assert_array_equal(single, out)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_rejects_mismatched_sizes(name):
    run, _ = KERNELS[name]
    x, t, dy = kernel_inputs(np.float64)
    with pytest.raises(ValueError, match=name):
        run(x, t, dy, np.empty(SIZE - 1), THREADS)


def prelu_reference(x, slopes):
    """x as (N, C, dim); slopes [C] or [1]."""
    return np.where(x > 0, x, slopes.reshape(1, -1, 1) * x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,shared", [((3, 5, 7), False), ((64, 10, 1), False), ((2, 4, 5000), True),
                                          ((4, 1, 9), False)])
def test_prelu_kernels_match_reference(shape, shared, dtype):
    generator = np.random.default_rng(1)
    n, channels, dim = shape
    x = generator.uniform(-1, 1, shape).astype(dtype)
    x[0, 0, 0] = 0
    dy = generator.standard_normal(shape).astype(dtype)
    slopes = generator.uniform(-0.5, 0.5, 1 if shared else channels).astype(dtype)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    out = np.empty_like(x)
    activation.prelu_forward(x.reshape(-1), out.reshape(-1), slopes, channels, dim, THREADS)
    np.testing.assert_allclose(out, prelu_reference(x, slopes), rtol=tolerance)
    activation.prelu_backward(x.reshape(-1), dy.reshape(-1), out.reshape(-1), slopes, channels, dim, THREADS)
    np.testing.assert_allclose(out, np.where(x > 0, dy, slopes.reshape(1, -1, 1) * dy), rtol=tolerance)
    slope_diff = np.full(slopes.shape, 0.5, dtype)
    sums = np.empty(n * channels)
    activation.prelu_slope_gradient(x.reshape(-1), dy.reshape(-1), slope_diff, sums, channels, dim, THREADS)
    per_channel = np.where(x <= 0, dy.astype(np.float64) * x, 0).sum(axis=(0, 2))
    np.testing.assert_allclose(slope_diff, 0.5 + (per_channel.sum(keepdims=True) if shared else per_channel),
                               rtol=tolerance, atol=tolerance)
    single = np.full(slopes.shape, 0.5, dtype)
    activation.prelu_slope_gradient(x.reshape(-1), dy.reshape(-1), single, sums, channels, dim, 1)
    np.testing.assert_array_equal(single, slope_diff)


def test_kernels_run_in_place():
    x, t, dy = kernel_inputs(np.float32)
    expected = 0.7 * x.astype(np.float64) - 0.2
    activation.affine(x, x, 0.7, -0.2, THREADS)
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)
    expected = dy * (1 - t.astype(np.float64) ** 2)
    activation.tanh_backward(t, dy, dy, THREADS)
    np.testing.assert_allclose(dy, expected, rtol=1e-6, atol=1e-6)
