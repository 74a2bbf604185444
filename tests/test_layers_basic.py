"""Pooling, ReLU, Softmax, SoftmaxWithLoss, Accuracy and Split layers: shapes, values, gradients
(finite differences in float64) and the errors a user can cause."""
import numpy as np
import pytest
from google.protobuf import text_format

from gradient_check import check_gradient, make_bottoms, setup_layer
from minicaffe.blob import Blob
from minicaffe.errors import LayerError
from minicaffe.layer import create_layer
from minicaffe.proto import minicaffe_pb2 as pb


def make_layer(text, phase=pb.TRAIN):
    return create_layer(text_format.Parse(text, pb.LayerParameter()), phase)


def distinct_values(shape, seed=0):
    """Inputs without ties, spaced far wider than the finite-difference step (for MAX pooling)."""
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n) - n / 2).reshape(shape) * 0.01


def ref_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# -- Pooling ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("input_shape,pooling_param,output_hw", [
    ((2, 3, 7, 7), "kernel_size: 3 stride: 2 pad: 1", (4, 4)),
    ((2, 3, 6, 6), "kernel_size: 3 stride: 2", (3, 3)),
    ((2, 3, 5, 5), "kernel_size: 2 stride: 2 pad: 1", (3, 3)),      # last ceil window dropped
    ((2, 3, 6, 6), "kernel_size: 3 stride: 2 round_mode: FLOOR", (2, 2)),
    ((1, 3, 32, 32), "kernel_size: 3 stride: 2", (16, 16)),          # cifar10_quick pool1
    ((1, 2, 24, 24), "kernel_size: 2 stride: 2", (12, 12)),          # LeNet pool1
    ((2, 3, 5, 7), "global_pooling: true", (1, 1)),
    ((1, 1, 6, 9), "kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0", (4, 3)),
])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_output_shape(input_shape, pooling_param, output_hw, method):
    layer = make_layer(f'name: "pool" type: "Pooling" pooling_param {{ pool: {method} {pooling_param} }}')
    tops = setup_layer(layer, make_bottoms([input_shape]), 1)
    assert tops[0].shape == input_shape[:2] + output_hw


@pytest.mark.parametrize("pooling_param,shape", [
    ("kernel_size: 3 stride: 2 pad: 1", (2, 2, 7, 7)),
    ("kernel_size: 3 stride: 2", (1, 2, 6, 6)),
    ("kernel_size: 2 stride: 2 pad: 1", (1, 2, 5, 5)),
    ("kernel_h: 2 kernel_w: 3 stride: 1", (1, 1, 4, 5)),
    ("global_pooling: true", (2, 3, 3, 4)),
])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_pooling_gradient(pooling_param, shape, method):
    layer = make_layer(f'name: "pool" type: "Pooling" pooling_param {{ pool: {method} {pooling_param} }}')
    bottoms = make_bottoms([shape])
    bottoms[0].data[...] = distinct_values(shape)
    tops = setup_layer(layer, bottoms, 1)
    check_gradient(layer, bottoms, tops)


def test_max_pooling_values_and_mask_top():
    layer = make_layer('name: "pool" type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }')
    bottoms = make_bottoms([(1, 1, 4, 4)])
    bottoms[0].data[...] = np.array([[1, 2, 5, 3],
                                     [4, 0, 6, 6],
                                     [9, 9, 1, 1],
                                     [9, 2, 1, 7]], dtype=float)
    tops = setup_layer(layer, bottoms, 2)
    layer.forward(bottoms, tops)
    np.testing.assert_array_equal(tops[0].data[0, 0], [[4, 6], [9, 7]])
    # Ties go to the first maximum in row-major order; the mask is an index into the plane.
    np.testing.assert_array_equal(tops[1].data[0, 0], [[4, 6], [8, 15]])
    assert tops[1].dtype == tops[0].dtype


def test_ave_pooling_counts_padding_as_zeros():
    layer = make_layer('name: "pool" type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }')
    bottoms = make_bottoms([(1, 1, 3, 3)])
    bottoms[0].data[...] = 1.0
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    # Each 3x3 window covers 4 pixels of the image and 5 of the padding.
    np.testing.assert_allclose(tops[0].data[0, 0], np.full((2, 2), 4 / 9))


def test_pooling_reshapes_with_its_input():
    layer = make_layer('name: "pool" type: "Pooling" pooling_param { pool: MAX global_pooling: true }')
    bottoms = make_bottoms([(1, 2, 4, 4)])
    tops = setup_layer(layer, bottoms, 1)
    bottoms[0].reshape((3, 2, 5, 3))
    bottoms[0].data[...] = distinct_values((3, 2, 5, 3))
    layer.reshape(bottoms, tops)
    layer.forward(bottoms, tops)
    np.testing.assert_array_equal(tops[0].data[:, :, 0, 0], bottoms[0].data.max(axis=(2, 3)))


@pytest.mark.parametrize("pooling_param,message", [
    ("pool: MAX stride: 2", "needs kernel_size"),
    ("pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2", "not both"),
    ("pool: MAX kernel_h: 2", "needs kernel_size"),
    ("pool: MAX global_pooling: true kernel_size: 2", "remove kernel_size"),
    ("pool: MAX global_pooling: true stride: 2", "pad 0 and stride 1"),
    ("pool: MAX kernel_size: 2 pad: 2", "smaller than the kernel"),
    ("pool: MAX kernel_size: 2 pad_h: 1", "pad_h and pad_w"),
    ("pool: MAX kernel_size: 2 stride: 0", "stride must be positive"),
    ("pool: MAX kernel_size: 9", "larger than the padded input"),
    ("pool: MAX kernel_size: 1 stride: 4", "outside the input"),
])
def test_pooling_errors(pooling_param, message):
    layer = make_layer(f'name: "pool1" type: "Pooling" pooling_param {{ {pooling_param} }}')
    with pytest.raises(LayerError, match=message) as info:
        setup_layer(layer, make_bottoms([(1, 1, 4, 4)]), 1)
    assert "pool1" in str(info.value) and "\n" not in str(info.value)


def test_pooling_rejects_mask_top_for_ave_and_non_4d_input():
    ave = make_layer('name: "p" type: "Pooling" pooling_param { pool: AVE kernel_size: 2 }')
    with pytest.raises(LayerError, match="second top"):
        setup_layer(ave, make_bottoms([(1, 1, 4, 4)]), 2)
    flat = make_layer('name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 2 }')
    with pytest.raises(LayerError, match="4-D"):
        setup_layer(flat, make_bottoms([(4, 4)]), 1)


# -- ReLU ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("relu_param", ["", "relu_param { negative_slope: 0.3 }"])
def test_relu_gradient(relu_param):
    layer = make_layer(f'name: "relu" type: "ReLU" {relu_param}')
    bottoms = make_bottoms([(2, 3, 4, 5)])
    tops = setup_layer(layer, bottoms, 1)
    check_gradient(layer, bottoms, tops, kink=0.0, kink_range=1e-3)


def test_relu_in_place_equals_out_of_place():
    text = 'name: "relu" type: "ReLU" relu_param { negative_slope: 0.25 }'
    separate, in_place = make_layer(text), make_layer(text)
    bottoms = make_bottoms([(3, 4, 5)])
    tops = setup_layer(separate, bottoms, 1)
    shared = make_bottoms([(3, 4, 5)])
    in_place.layer_setup(shared, shared)

    separate.forward(bottoms, tops)
    in_place.forward(shared, shared)
    np.testing.assert_array_equal(shared[0].data, tops[0].data)
    x = bottoms[0].data
    np.testing.assert_array_equal(tops[0].data, np.where(x > 0, x, 0.25 * x))

    top_diff = np.random.default_rng(1).standard_normal(x.shape)
    tops[0].diff[...] = top_diff
    shared[0].diff[...] = top_diff
    separate.backward(tops, [True], bottoms)
    in_place.backward(shared, [True], shared)
    np.testing.assert_array_equal(shared[0].diff, bottoms[0].diff)
    np.testing.assert_array_equal(bottoms[0].diff, np.where(x > 0, top_diff, 0.25 * top_diff))


# -- Softmax ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [1, 2, -1, 0])
def test_softmax_values_and_gradient(axis):
    layer = make_layer(f'name: "sm" type: "Softmax" softmax_param {{ axis: {axis} }}')
    bottoms = make_bottoms([(2, 4, 3)], low=-3, high=3)
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    np.testing.assert_allclose(tops[0].data, ref_softmax(bottoms[0].data, axis), rtol=1e-12)
    check_gradient(layer, bottoms, tops)


def test_softmax_axis_out_of_range():
    layer = make_layer('name: "sm" type: "Softmax" softmax_param { axis: 3 }')
    with pytest.raises(LayerError, match="sm.*axis"):
        setup_layer(layer, make_bottoms([(2, 4, 3)]), 1)


# -- SoftmaxWithLoss -------------------------------------------------------------------------------

def loss_bottoms(scores_shape, labels_shape, seed=0):
    bottoms = make_bottoms([scores_shape, labels_shape], low=-2, high=2, seed=seed)
    classes = scores_shape[1]
    bottoms[1].data[...] = np.random.default_rng(seed).integers(0, classes, labels_shape)
    return bottoms


def ref_loss(scores, labels, ignore_label, normalization):
    prob = ref_softmax(scores, 1)
    outer, classes = scores.shape[:2]
    prob = prob.reshape(outer, classes, -1)
    labels = labels.reshape(outer, -1).astype(int)
    kept = labels != ignore_label
    picked = np.take_along_axis(prob, np.where(kept, labels, 0)[:, None, :], axis=1)[:, 0]
    total = -np.log(picked[kept]).sum()
    normalizer = {"FULL": labels.size, "VALID": kept.sum(), "BATCH_SIZE": outer, "NONE": 1}[normalization]
    return total / max(normalizer, 1)


@pytest.mark.parametrize("normalization", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_softmax_loss_value_and_gradient(normalization):
    layer = make_layer('name: "loss" type: "SoftmaxWithLoss" '
                       f'loss_param {{ ignore_label: 2 normalization: {normalization} }}')
    bottoms = loss_bottoms((3, 4, 2, 3), (3, 1, 2, 3))
    bottoms[1].data[0, 0, 0] = 2  # make sure some labels are ignored
    tops = setup_layer(layer, bottoms, 1)
    assert tops[0].shape == ()
    layer.forward(bottoms, tops)
    expected = ref_loss(bottoms[0].data, bottoms[1].data, 2, normalization)
    assert float(tops[0].data) == pytest.approx(expected, rel=1e-12)
    check_gradient(layer, bottoms, tops, check_bottoms=[0])


@pytest.mark.parametrize("normalize,normalization", [("true", "VALID"), ("false", "BATCH_SIZE")])
def test_softmax_loss_deprecated_normalize(normalize, normalization):
    layer = make_layer('name: "loss" type: "SoftmaxWithLoss" '
                       f'loss_param {{ ignore_label: 1 normalize: {normalize} }}')
    bottoms = loss_bottoms((4, 3, 5), (4, 5))
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    expected = ref_loss(bottoms[0].data, bottoms[1].data, 1, normalization)
    assert float(tops[0].data) == pytest.approx(expected, rel=1e-12)


def test_softmax_loss_scales_gradient_by_loss_weight_and_outputs_probabilities():
    layer = make_layer('name: "loss" type: "SoftmaxWithLoss"')
    bottoms = loss_bottoms((5, 3), (5,))
    tops = setup_layer(layer, bottoms, 2)
    layer.forward(bottoms, tops)
    prob = ref_softmax(bottoms[0].data, 1)
    np.testing.assert_allclose(tops[1].data, prob, rtol=1e-12)
    tops[0].diff[...] = 2.0  # the loss weight, as the net writes it
    layer.backward(tops, [True, False], bottoms)
    onehot = np.eye(3)[bottoms[1].data.astype(int)]
    np.testing.assert_allclose(bottoms[0].diff, 2.0 * (prob - onehot) / 5, rtol=1e-12)


def test_softmax_loss_all_ignored_is_zero():
    layer = make_layer('name: "loss" type: "SoftmaxWithLoss" loss_param { ignore_label: 0 }')
    bottoms = loss_bottoms((3, 4), (3,))
    bottoms[1].data[...] = 0
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    assert float(tops[0].data) == 0.0
    tops[0].diff[...] = 1.0
    layer.backward(tops, [True, False], bottoms)
    assert not bottoms[0].diff.any()


@pytest.mark.parametrize("bad_label", [4.0, -1.0])
def test_softmax_loss_label_out_of_range(bad_label):
    layer = make_layer('name: "loss" type: "SoftmaxWithLoss"')
    bottoms = loss_bottoms((3, 4), (3,))
    bottoms[1].data[1] = bad_label
    tops = setup_layer(layer, bottoms, 1)
    with pytest.raises(LayerError, match=rf"'loss'.*label {bad_label:g} .*\[0, 3\]") as info:
        layer.forward(bottoms, tops)
    assert "\n" not in str(info.value)


def test_softmax_loss_shape_errors_and_labels_not_differentiable():
    layer = make_layer('name: "loss" type: "SoftmaxWithLoss"')
    with pytest.raises(LayerError, match="one label per prediction"):
        setup_layer(layer, make_bottoms([(3, 4, 2), (3,)]), 1)
    layer = make_layer('name: "loss" type: "SoftmaxWithLoss"')
    bottoms = loss_bottoms((3, 4), (3,))
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    with pytest.raises(LayerError, match="labels"):
        layer.backward(tops, [True, True], bottoms)


# -- Accuracy --------------------------------------------------------------------------------------

def ref_accuracy(scores, labels, top_k, ignore_label=None):
    """Accuracy by sorting each row: correct when the label is among the top_k highest scores."""
    hits = total = 0
    for row, label in zip(scores, labels.astype(int)):
        if label == ignore_label:
            continue
        total += 1
        hits += label in np.argsort(-row)[:top_k]
    return hits / total


@pytest.mark.parametrize("top_k", [1, 3])
def test_accuracy_matches_reference(top_k):
    rng = np.random.default_rng(top_k)
    layer = make_layer(f'name: "acc" type: "Accuracy" accuracy_param {{ top_k: {top_k} }}', pb.TEST)
    bottoms = make_bottoms([(50, 6), (50,)], dtype=np.float32)
    bottoms[0].data[...] = rng.standard_normal((50, 6))
    bottoms[1].data[...] = rng.integers(0, 6, 50)
    tops = setup_layer(layer, bottoms, 1, dtype=np.float32)
    assert tops[0].shape == ()
    layer.forward(bottoms, tops)
    expected = ref_accuracy(bottoms[0].data, bottoms[1].data, top_k)
    assert 0 < expected < 1
    assert float(tops[0].data) == pytest.approx(expected)


def test_accuracy_ignore_label_per_class_and_ties():
    layer = make_layer('name: "acc" type: "Accuracy" accuracy_param { ignore_label: 3 }')
    bottoms = make_bottoms([(5, 4), (5,)])
    bottoms[0].data[...] = [[0.9, 0.1, 0.0, 0.0],   # label 0: correct
                            [0.2, 0.7, 0.1, 0.0],   # label 0: wrong
                            [0.1, 0.5, 0.5, 0.0],   # label 2: tied with class 1, counts as wrong
                            [0.0, 0.9, 0.1, 0.0],   # label 1: correct
                            [1.0, 0.0, 0.0, 0.0]]   # label 3: ignored
    bottoms[1].data[...] = [0, 0, 2, 1, 3]
    tops = setup_layer(layer, bottoms, 2)
    layer.forward(bottoms, tops)
    assert float(tops[0].data) == pytest.approx(2 / 4)
    np.testing.assert_allclose(tops[1].data, [0.5, 1.0, 0.0, 0.0])


def test_accuracy_over_spatial_axis():
    layer = make_layer('name: "acc" type: "Accuracy"')
    bottoms = make_bottoms([(2, 3, 4, 5), (2, 1, 4, 5)])
    predicted = bottoms[0].data.argmax(axis=1)[:, None]
    labels = predicted.copy()
    labels[0, 0, 0, :] = (labels[0, 0, 0, :] + 1) % 3  # 5 of 40 positions wrong
    bottoms[1].data[...] = labels
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    assert float(tops[0].data) == pytest.approx(35 / 40)


def test_accuracy_errors():
    layer = make_layer('name: "acc" type: "Accuracy" accuracy_param { top_k: 5 }')
    with pytest.raises(LayerError, match="top_k 5 exceeds the number of classes 4"):
        setup_layer(layer, make_bottoms([(3, 4), (3,)]), 1)
    layer = make_layer('name: "acc" type: "Accuracy"')
    bottoms = make_bottoms([(3, 4), (3,)])
    bottoms[1].data[...] = [0, 7, 1]
    tops = setup_layer(layer, bottoms, 1)
    with pytest.raises(LayerError, match=r"'acc'.*label 7 "):
        layer.forward(bottoms, tops)


# -- Split -----------------------------------------------------------------------------------------

def test_split_shares_data_and_sums_diffs():
    layer = make_layer('name: "split" type: "Split"')
    bottoms = make_bottoms([(2, 3, 4)])
    tops = setup_layer(layer, bottoms, 3)
    layer.forward(bottoms, tops)
    for t in tops:
        assert t.shape == bottoms[0].shape and np.shares_memory(t.data, bottoms[0].data)
    check_gradient(layer, bottoms, tops)


def test_split_single_top_copies_diff_and_refuses_in_place():
    layer = make_layer('name: "split" type: "Split"')
    bottoms = make_bottoms([(4,)])
    tops = setup_layer(layer, bottoms, 1)
    tops[0].diff[...] = [1, 2, 3, 4]
    layer.backward(tops, [True], bottoms)
    np.testing.assert_array_equal(bottoms[0].diff, [1, 2, 3, 4])
    with pytest.raises(LayerError, match="in place"):
        make_layer('name: "split" type: "Split"').layer_setup(bottoms, [Blob(), bottoms[0]])


def test_euclidean_loss_value_and_gradient():
    layer = create_layer(text_format.Parse('name: "e" type: "EuclideanLoss"', pb.LayerParameter()), pb.TRAIN)
    bottoms = make_bottoms([(4, 3), (4, 3)])
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    expected = ((bottoms[0].data - bottoms[1].data) ** 2).sum() / 4 / 2
    assert float(tops[0].data) == pytest.approx(expected)
    check_gradient(layer, bottoms, tops)
