"""SigmoidCrossEntropyLoss, HingeLoss, InfogainLoss, MultinomialLogisticLoss and ContrastiveLoss: values
against NumPy formulas, finite-difference gradients in float64, normalization modes, and user errors."""
import numpy as np
import pytest
from google.protobuf import text_format

from gradient_check import check_gradient, make_bottoms, setup_layer
from minicaffe.errors import LayerError
from minicaffe.layer import create_layer
from minicaffe.net import Net
from minicaffe.proto import minicaffe_pb2 as pb


def make_layer(text, phase=pb.TRAIN):
    return create_layer(text_format.Parse(text, pb.LayerParameter()), phase)


def run(layer, bottoms, num_tops=1, dtype=np.float64):
    tops = setup_layer(layer, bottoms, num_tops, dtype)
    layer.forward(bottoms, tops)
    return tops


def backward_with_weight(layer, bottoms, tops, weight, propagate=None):
    tops[0].diff[...] = weight
    for b in bottoms:
        b.diff[...] = 0
    layer.backward(tops, propagate or [True] + [False] * (len(bottoms) - 1), bottoms)


def ref_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def ref_normalizer(mode, outer, inner, valid):
    return max(1.0, {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode])


def away_from(values, kinks, gap=0.05):
    """Moves values closer than ``gap`` to any kink to ``gap`` beyond it, so finite differences
    never straddle a point where the loss is not differentiable."""
    for kink in kinks:
        near = np.abs(values - kink) < gap
        values[near] = kink + np.where(values[near] >= kink, gap, -gap)
    return values


# -- SigmoidCrossEntropyLoss -----------------------------------------------------------------------

def sigmoid_ce_layer(loss_param=""):
    return make_layer(f'name: "sce" type: "SigmoidCrossEntropyLoss" loss_param {{ {loss_param} }}')


def ref_sigmoid_ce(x, t, ignore=None):
    p = 1 / (1 + np.exp(-x))
    terms = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    valid = np.ones_like(t, dtype=bool) if ignore is None else t.astype(np.int64) != ignore
    return terms[valid].sum(), int(valid.sum())


@pytest.mark.parametrize("loss_param,mode", [
    ("", "BATCH_SIZE"),                 # Caffe's default for this layer when nothing is set
    ("normalize: true", "VALID"),
    ("normalize: false", "BATCH_SIZE"),
    ("normalization: FULL", "FULL"),
    ("normalization: VALID", "VALID"),
    ("normalization: BATCH_SIZE", "BATCH_SIZE"),
    ("normalization: NONE", "NONE"),
    ("ignore_label: -1 normalization: VALID", "VALID"),
    ("ignore_label: -1 normalization: FULL", "FULL"),
    ("ignore_label: -1", "BATCH_SIZE"),
])
def test_sigmoid_cross_entropy_value_and_gradient(loss_param, mode):
    layer = sigmoid_ce_layer(loss_param)
    bottoms = make_bottoms([(3, 4, 2), (3, 4, 2)], low=-3, high=3)
    targets = np.random.default_rng(5).uniform(0, 1, size=(3, 4, 2))
    ignore = -1 if "ignore_label" in loss_param else None
    if ignore is not None:
        targets.reshape(-1)[[0, 5, 11, 17]] = -1
    bottoms[1].data[...] = targets
    tops = run(layer, bottoms)
    total, valid = ref_sigmoid_ce(bottoms[0].data, targets, ignore)
    expected = total / ref_normalizer(mode, 3, 8, valid)
    np.testing.assert_allclose(float(tops[0].data), expected, rtol=1e-12)
    check_gradient(layer, bottoms, tops, check_bottoms=[0])
    if ignore is not None:
        backward_with_weight(layer, bottoms, tops, 1.0)
        assert np.all(bottoms[0].diff.reshape(-1)[[0, 5, 11, 17]] == 0)


def test_sigmoid_cross_entropy_is_stable_for_large_scores():
    layer = sigmoid_ce_layer("normalization: NONE")
    bottoms = make_bottoms([(2, 3), (2, 3)], dtype=np.float32)
    bottoms[0].data[...] = [[1000, -1000, 50], [-50, 0, 88]]
    bottoms[1].data[...] = [[1, 1, 0], [0, 0.5, 1]]
    tops = run(layer, bottoms, dtype=np.float32)
    x, t = bottoms[0].data.astype(np.float64), bottoms[1].data.astype(np.float64)
    expected = np.sum(np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x))))
    assert np.isfinite(tops[0].data)
    np.testing.assert_allclose(float(tops[0].data), expected, rtol=1e-6)
    backward_with_weight(layer, bottoms, tops, 1.0)
    np.testing.assert_allclose(bottoms[0].diff, 0.5 * (1 + np.tanh(x / 2)) - t, atol=1e-6)


def test_sigmoid_cross_entropy_backward_scales_by_loss_weight():
    layer = sigmoid_ce_layer()
    bottoms = make_bottoms([(4, 3), (4, 3)])
    bottoms[1].data[...] = np.random.default_rng(2).integers(0, 2, size=(4, 3))
    tops = run(layer, bottoms)
    backward_with_weight(layer, bottoms, tops, 1.0)
    unit = bottoms[0].diff.copy()
    backward_with_weight(layer, bottoms, tops, 0.25)
    np.testing.assert_allclose(bottoms[0].diff, 0.25 * unit)
    x, t = bottoms[0].data, bottoms[1].data
    np.testing.assert_allclose(unit, (1 / (1 + np.exp(-x)) - t) / 4, rtol=1e-12)


def test_sigmoid_cross_entropy_errors():
    with pytest.raises(LayerError, match=r"layer 'sce' \(SigmoidCrossEntropyLoss\): scores \(2, 3\) and "
                                         r"targets \(2, 4\) must have the same count"):
        setup_layer(sigmoid_ce_layer(), make_bottoms([(2, 3), (2, 4)]), 1)
    with pytest.raises(LayerError, match=r"bottom 0 \(2, 3\) and bottom 1 \(3, 2\) must have the same first"):
        setup_layer(sigmoid_ce_layer(), make_bottoms([(2, 3), (3, 2)]), 1)
    layer = sigmoid_ce_layer()
    bottoms = make_bottoms([(2, 3), (2, 3)])
    tops = run(layer, bottoms)
    with pytest.raises(LayerError, match="cannot back-propagate to the targets"):
        layer.backward(tops, [True, True], bottoms)


# -- HingeLoss -------------------------------------------------------------------------------------

def hinge_layer(norm="L1"):
    return make_layer(f'name: "hinge" type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}')


def ref_hinge(x, labels, squared):
    x = x.reshape(len(labels), -1)
    signs = -np.ones_like(x)
    signs[np.arange(len(labels)), labels] = 1
    margins = np.maximum(0, 1 - signs * x)
    return (np.sum(margins ** 2) if squared else np.sum(margins)) / len(labels)


@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize("shape", [(5, 4), (3, 2, 2, 2)])
def test_hinge_value_and_gradient(norm, shape):
    layer = hinge_layer(norm)
    bottoms = make_bottoms([shape, (shape[0],)], low=-2, high=2)
    away_from(bottoms[0].data, [-1.0, 1.0])
    dim = int(np.prod(shape[1:]))
    labels = np.random.default_rng(3).integers(0, dim, size=shape[0])
    bottoms[1].data[...] = labels
    tops = run(layer, bottoms)
    np.testing.assert_allclose(float(tops[0].data), ref_hinge(bottoms[0].data, labels, norm == "L2"), rtol=1e-12)
    check_gradient(layer, bottoms, tops, check_bottoms=[0])


def test_hinge_default_norm_is_l1():
    layer = make_layer('name: "hinge" type: "HingeLoss"')
    bottoms = make_bottoms([(4, 3), (4,)], low=-2, high=2)
    bottoms[1].data[...] = [0, 1, 2, 1]
    tops = run(layer, bottoms)
    np.testing.assert_allclose(float(tops[0].data), ref_hinge(bottoms[0].data, [0, 1, 2, 1], False))


def test_hinge_errors():
    bottoms = make_bottoms([(2, 3), (2,)])
    bottoms[1].data[...] = [0, 3]
    layer = hinge_layer()
    tops = setup_layer(layer, bottoms, 1)
    with pytest.raises(LayerError, match=r"layer 'hinge' \(HingeLoss\): label 3 \(at position 1\) is out of "
                                         r"range: there are 3 classes, so labels must be in \[0, 2\]"):
        layer.forward(bottoms, tops)
    with pytest.raises(LayerError, match=r"needs one label per example: scores \(2, 3\) give 2 examples, "
                                         r"the labels \(2, 2\) hold 4"):
        setup_layer(hinge_layer(), make_bottoms([(2, 3), (2, 2)]), 1)


# -- InfogainLoss ----------------------------------------------------------------------------------

def infogain_matrix(classes, seed=7):
    # Float32 values, since that is what a BlobProto file stores.
    return np.random.default_rng(seed).uniform(0, 2, size=(classes, classes)).astype(np.float32).astype(np.float64)


def write_infogain(path, matrix, legacy_shape=False):
    proto = pb.BlobProto()
    if legacy_shape:
        proto.num, proto.channels, proto.height, proto.width = 1, 1, *matrix.shape
    else:
        proto.shape.dim.extend(matrix.shape)
    proto.data.extend(matrix.ravel().tolist())
    path.write_bytes(proto.SerializeToString())
    return path


def infogain_layer(extra="", loss_param=""):
    return make_layer(f'name: "info" type: "InfogainLoss" {extra} loss_param {{ {loss_param} }}')


def ref_infogain(scores, labels, h, axis, ignore=None):
    """(summed loss, valid count, probabilities) with the class axis moved last."""
    prob = ref_softmax(scores, axis)
    p = np.moveaxis(prob, axis, -1).reshape(-1, h.shape[0])
    labels = labels.reshape(-1).astype(np.int64)
    valid = labels != ignore if ignore is not None else np.ones(len(labels), dtype=bool)
    losses = -np.sum(h[np.where(valid, labels, 0)] * np.log(np.maximum(p, 1e-20)), axis=1)
    return losses[valid].sum(), int(valid.sum()), prob


@pytest.mark.parametrize("loss_param,mode", [
    ("", "VALID"),
    ("normalization: FULL", "FULL"),
    ("normalization: BATCH_SIZE", "BATCH_SIZE"),
    ("normalization: NONE", "NONE"),
    ("ignore_label: 2", "VALID"),
    ("ignore_label: 2 normalization: FULL", "FULL"),
])
@pytest.mark.parametrize("shape,axis", [((4, 3), 1), ((2, 3, 2, 2), 1), ((2, 2, 3), -1)])
def test_infogain_from_file_value_and_gradient(tmp_path, loss_param, mode, shape, axis):
    classes = shape[axis]
    h = infogain_matrix(classes)
    source = write_infogain(tmp_path / "h.binaryproto", h)
    layer = infogain_layer(f'infogain_loss_param {{ source: "{source}" axis: {axis} }}', loss_param)
    label_shape = tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
    bottoms = make_bottoms([shape, label_shape], low=-2, high=2)
    labels = np.random.default_rng(1).integers(0, classes, size=label_shape)
    ignore = 2 if "ignore_label" in loss_param else None
    if ignore is not None:
        labels.reshape(-1)[0] = 2
    bottoms[1].data[...] = labels
    tops = run(layer, bottoms, num_tops=2)
    total, valid, prob = ref_infogain(bottoms[0].data, labels, h, axis, ignore)
    outer = int(np.prod(shape[:axis % len(shape)]))
    inner = int(np.prod(shape[axis % len(shape) + 1:]))
    np.testing.assert_allclose(float(tops[0].data), total / ref_normalizer(mode, outer, inner, valid), rtol=1e-10)
    np.testing.assert_allclose(tops[1].data, prob, rtol=1e-12)
    # The probabilities top carries no gradient back, as in Caffe, so only the loss is checked.
    check_gradient(layer, bottoms, tops[:1], check_bottoms=[0])


def test_infogain_matrix_as_third_bottom_and_legacy_file_shape(tmp_path):
    h = infogain_matrix(4, seed=3)
    bottoms = make_bottoms([(5, 4), (5,), (4, 4)])
    bottoms[1].data[...] = [0, 3, 1, 2, 3]
    bottoms[2].data[...] = h
    layer = infogain_layer()
    tops = run(layer, bottoms)
    total, valid, _ = ref_infogain(bottoms[0].data, bottoms[1].data, h, 1)
    np.testing.assert_allclose(float(tops[0].data), total / valid, rtol=1e-12)
    check_gradient(layer, bottoms, tops, check_bottoms=[0])

    source = write_infogain(tmp_path / "h.binaryproto", h, legacy_shape=True)
    from_file = infogain_layer(f'infogain_loss_param {{ source: "{source}" }}')
    np.testing.assert_allclose(float(run(from_file, bottoms[:2])[0].data), float(tops[0].data), rtol=1e-12)


def test_infogain_with_identity_equals_softmax_with_loss():
    bottoms = make_bottoms([(6, 5), (6,), (5, 5)])
    bottoms[1].data[...] = [0, 1, 4, 2, 3, 4]
    bottoms[2].data[...] = np.eye(5)
    infogain = run(infogain_layer(), bottoms)
    softmax_loss = run(make_layer('name: "s" type: "SoftmaxWithLoss"'), bottoms[:2])
    np.testing.assert_allclose(float(infogain[0].data), float(softmax_loss[0].data), rtol=1e-12)


def test_infogain_float32_matches_float64():
    h = infogain_matrix(3)
    values = np.random.default_rng(4).uniform(-2, 2, size=(4, 3))
    losses = []
    for dtype in (np.float32, np.float64):
        bottoms = make_bottoms([(4, 3), (4,), (3, 3)], dtype=dtype)
        bottoms[0].data[...] = values
        bottoms[1].data[...] = [0, 2, 1, 1]
        bottoms[2].data[...] = h
        layer = infogain_layer()
        tops = run(layer, bottoms, dtype=dtype)
        backward_with_weight(layer, bottoms, tops, 1.0, [True, False, False])
        losses.append((float(tops[0].data), bottoms[0].diff.astype(np.float64)))
    np.testing.assert_allclose(losses[0][0], losses[1][0], rtol=1e-6)
    np.testing.assert_allclose(losses[0][1], losses[1][1], atol=1e-6)


def test_infogain_errors(tmp_path):
    bottoms = make_bottoms([(2, 3), (2,)])
    with pytest.raises(LayerError, match=r"layer 'info' \(InfogainLoss\): needs infogain_loss_param.source"):
        setup_layer(infogain_layer(), bottoms, 1)
    with pytest.raises(LayerError, match="loss_param.normalize is deprecated for InfogainLoss"):
        setup_layer(infogain_layer(loss_param="normalize: true"), make_bottoms([(2, 3), (2,), (3, 3)]), 1)
    with pytest.raises(LayerError, match=r"the infogain matrix has 4 values \(shape \(2, 2\)\), but 3 classes "
                                         r"need 3 x 3 = 9"):
        setup_layer(infogain_layer(), make_bottoms([(2, 3), (2,), (2, 2)]), 1)
    missing = tmp_path / "missing.binaryproto"
    with pytest.raises(LayerError, match=r"infogain_loss_param.source: .*missing.binaryproto"):
        setup_layer(infogain_layer(f'infogain_loss_param {{ source: "{missing}" }}'), bottoms, 1)
    corrupt = tmp_path / "corrupt.binaryproto"
    corrupt.write_bytes(b"\x0a\xff\xff")
    with pytest.raises(LayerError, match="truncated or corrupt infogain matrix"):
        setup_layer(infogain_layer(f'infogain_loss_param {{ source: "{corrupt}" }}'), bottoms, 1)
    with pytest.raises(LayerError, match=r"needs one label per prediction: 2 for scores of shape \(2, 3\)"):
        setup_layer(infogain_layer(), make_bottoms([(2, 3), (2, 2), (3, 3)]), 1)
    layer = infogain_layer()
    three = make_bottoms([(2, 3), (2,), (3, 3)])
    three[1].data[...] = [1, -1]
    tops = setup_layer(layer, three, 1)
    with pytest.raises(LayerError, match=r"label -1 \(at position 1\) is out of range"):
        layer.forward(three, tops)


# -- MultinomialLogisticLoss -----------------------------------------------------------------------

def multinomial_layer():
    return make_layer('name: "mll" type: "MultinomialLogisticLoss"')


@pytest.mark.parametrize("label_shape", [(4,), (4, 1, 1, 1)])
def test_multinomial_logistic_value_and_gradient(label_shape):
    layer = multinomial_layer()
    bottoms = make_bottoms([(4, 5), label_shape], low=0.1, high=1.0)
    labels = np.array([0, 4, 2, 2])
    bottoms[1].data[...] = labels.reshape(label_shape)
    tops = run(layer, bottoms)
    expected = -np.log(bottoms[0].data[np.arange(4), labels]).sum() / 4
    np.testing.assert_allclose(float(tops[0].data), expected, rtol=1e-12)
    check_gradient(layer, bottoms, tops, check_bottoms=[0])


def test_multinomial_logistic_clamps_zero_probabilities():
    layer = multinomial_layer()
    bottoms = make_bottoms([(2, 3), (2,)], low=0.2, high=0.5)
    bottoms[0].data[0, 1] = 0
    bottoms[1].data[...] = [1, 2]
    tops = run(layer, bottoms)
    expected = (-np.log(1e-20) - np.log(bottoms[0].data[1, 2])) / 2
    np.testing.assert_allclose(float(tops[0].data), expected, rtol=1e-12)
    backward_with_weight(layer, bottoms, tops, 2.0)
    diff = np.zeros((2, 3))
    diff[0, 1] = -2.0 / 2 / 1e-20
    diff[1, 2] = -2.0 / 2 / bottoms[0].data[1, 2]
    np.testing.assert_allclose(bottoms[0].diff, diff, rtol=1e-12)


def test_multinomial_logistic_errors():
    with pytest.raises(LayerError, match=r"layer 'mll' \(MultinomialLogisticLoss\): labels must have shape "
                                         r"\(N,\) or \(N, 1, 1, 1\), got \(2, 3\)"):
        setup_layer(multinomial_layer(), make_bottoms([(2, 3), (2, 3)]), 1)
    layer = multinomial_layer()
    bottoms = make_bottoms([(2, 3), (2,)])
    bottoms[1].data[...] = [2.5, 7]
    tops = setup_layer(layer, bottoms, 1)
    with pytest.raises(LayerError, match=r"label 7 \(at position 1\) is out of range: there are 3 classes"):
        layer.forward(bottoms, tops)


# -- ContrastiveLoss -------------------------------------------------------------------------------

def contrastive_layer(params=""):
    return make_layer(f'name: "con" type: "ContrastiveLoss" contrastive_loss_param {{ {params} }}')


def contrastive_bottoms(margin, legacy, shape=(8, 3)):
    """Feature pairs with half similar labels and distances kept off the margin's kink."""
    bottoms = make_bottoms([shape, shape, (shape[0], 1, 1, 1)], low=-0.8, high=0.8, seed=11)
    bottoms[2].data[...] = np.array([1, 0, 0, 1, 0, 0, 1, 0]).reshape(-1, 1, 1, 1)[:shape[0]]
    a, b = (x.data.reshape(shape[0], -1) for x in bottoms[:2])
    for n in range(shape[0]):
        d = np.linalg.norm(a[n] - b[n])
        measure, kink = (d * d, margin) if legacy else (d, margin)
        if abs(measure - kink) < 0.05:
            b[n] += 0.1 * (a[n] - b[n]) / max(d, 1e-3)
    return bottoms


def ref_contrastive(a, b, similar, margin, legacy):
    """Caffe's loss and its gradient with respect to a (including its 1e-4 distance guard)."""
    n = len(a)
    diff = a - b
    d2 = np.sum(diff * diff, axis=1)
    d = np.sqrt(d2)
    if legacy:
        dissimilar_loss = np.maximum(margin - d2, 0)
        dissimilar_grad = np.where(margin - d2 > 0, -1.0, 0.0)[:, None] * diff
    else:
        dissimilar_loss = np.maximum(margin - d, 0) ** 2
        dissimilar_grad = np.where(margin - d > 0, -(margin - d) / (d + 1e-4), 0.0)[:, None] * diff
    loss = np.where(similar, d2, dissimilar_loss).sum() / n / 2
    grad = np.where(similar[:, None], diff, dissimilar_grad) / n
    return loss, grad


@pytest.mark.parametrize("margin", [1.0, 0.6])
@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_value_and_gradient(margin, legacy):
    params = f"margin: {margin} legacy_version: {str(legacy).lower()}"
    layer = contrastive_layer(params)
    bottoms = contrastive_bottoms(margin, legacy)
    tops = run(layer, bottoms)
    similar = bottoms[2].data.reshape(-1) != 0
    loss, grad_a = ref_contrastive(bottoms[0].data, bottoms[1].data, similar, margin, legacy)
    np.testing.assert_allclose(float(tops[0].data), loss, rtol=1e-12)
    backward_with_weight(layer, bottoms, tops, 0.5, [True, True, False])
    np.testing.assert_allclose(bottoms[0].diff, 0.5 * grad_a, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(bottoms[1].diff, -0.5 * grad_a, rtol=1e-12, atol=1e-15)
    # Caffe's 1e-4 guard in the non-legacy gradient makes it differ from the exact one by about 1e-4 / d.
    check_gradient(layer, bottoms, tops, check_bottoms=[0, 1], threshold=1e-6 if legacy else 2e-4)


def test_contrastive_default_margin_and_float32():
    bottoms64 = contrastive_bottoms(1.0, False, shape=(6, 4))
    tops64 = run(contrastive_layer(), bottoms64)
    bottoms32 = make_bottoms([(6, 4, 1, 1), (6, 4), (6,)], dtype=np.float32)
    for b32, b64 in zip(bottoms32, bottoms64):
        b32.data[...] = b64.data.reshape(b32.shape)
    tops32 = run(contrastive_layer(), bottoms32, dtype=np.float32)
    similar = bottoms64[2].data.reshape(-1) != 0
    loss, _ = ref_contrastive(bottoms64[0].data, bottoms64[1].data, similar, 1.0, False)
    np.testing.assert_allclose(float(tops64[0].data), loss, rtol=1e-12)
    np.testing.assert_allclose(float(tops32[0].data), loss, rtol=1e-5)


def test_contrastive_errors():
    with pytest.raises(LayerError, match=r"layer 'con' \(ContrastiveLoss\): bottom 0 must hold feature vectors "
                                         r"of shape \(N, C\) or \(N, C, 1, 1\), got \(2, 3, 2, 2\)"):
        setup_layer(contrastive_layer(), make_bottoms([(2, 3, 2, 2), (2, 3), (2,)]), 1)
    with pytest.raises(LayerError, match=r"the two feature bottoms differ in size: \(2, 3\) and \(2, 4\)"):
        setup_layer(contrastive_layer(), make_bottoms([(2, 3), (2, 4), (2,)]), 1)
    with pytest.raises(LayerError, match=r"needs one similarity label per pair: 2 pairs, labels of shape \(2, 2\)"):
        setup_layer(contrastive_layer(), make_bottoms([(2, 3), (2, 3), (2, 2)]), 1)


# -- in a net --------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_layer,label_shape", [
    ('type: "HingeLoss"', "dim: 4"),
    ('type: "SigmoidCrossEntropyLoss"', "dim: 4 dim: 3"),
    ('type: "InfogainLoss"', "dim: 4"),
    ('type: "MultinomialLogisticLoss"', "dim: 4"),
])
def test_losses_in_a_net_get_loss_weight_one_and_no_label_gradient(loss_layer, label_shape):
    third_bottom = 'bottom: "h"' if "Infogain" in loss_layer else ""
    text = f"""
    force_backward: true
    layer {{ name: "in" type: "Input" top: "x" top: "label" top: "h"
             input_param {{ shape {{ dim: 4 dim: 5 }} shape {{ {label_shape} }} shape {{ dim: 3 dim: 3 }} }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "score"
             inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
    layer {{ name: "loss" {loss_layer} bottom: "score" bottom: "label" {third_bottom} top: "loss" }}
    """
    net = Net(text_format.Parse(text, pb.NetParameter()), phase=pb.TRAIN)
    rng = np.random.default_rng(0)
    net.blobs["x"].data[...] = rng.standard_normal((4, 5))
    net.blobs["h"].data[...] = np.eye(3)
    net.blobs["label"].data[...] = rng.integers(0, 2, size=net.blobs["label"].shape)
    if "Multinomial" in loss_layer:
        net.layers[1].blobs[0].data[...] = np.abs(net.layers[1].blobs[0].data) + 0.05
        net.blobs["x"].data[...] = np.abs(net.blobs["x"].data)
    loss = net.forward_layers()
    assert np.isfinite(loss) and loss == pytest.approx(float(net.blobs["loss"].data))
    net.backward_layers()
    assert np.any(net.params["ip"][0].diff != 0)
    assert net.bottom_need_backward[-1][1] is False
