"""Net graph building and running: phase rules, splits, in-place layers, loss weights, sharing, weights I/O."""
import numpy as np
import pytest
from google.protobuf import text_format
from gradient_check import check_net_gradient

import minicaffe
from minicaffe.blob import blob_dtype
from minicaffe.errors import MinicaffeError
from minicaffe.net import Net
from minicaffe.proto import minicaffe_pb2 as pb


def net_param(text):
    return text_format.Parse(text, pb.NetParameter())


INPUT = """
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
"""


def ip(name, bottom, n, extra=""):
    return f"""layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" {extra}
        inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" std: 0.5 }}
                               bias_filler {{ type: "gaussian" std: 0.5 }} }} }}"""


def loss(name, bottom, extra=""):
    return f"""layer {{ name: "{name}" type: "SoftmaxWithLoss" bottom: "{bottom}" bottom: "label" top: "{name}"
        {extra} }}"""


def feed(net, seed=0):
    rng = np.random.default_rng(seed)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].shape)
    net.blobs["label"].data[...] = rng.integers(0, 3, size=net.blobs["label"].shape)


def test_phase_rules_levels_and_stages():
    text = INPUT + ip("a", "data", 3) + ip("b", "data", 3, 'include { phase: TRAIN }') \
        + ip("c", "data", 3, 'include { phase: TEST min_level: 2 }') \
        + ip("d", "data", 3, 'include { stage: "deploy" }') \
        + ip("e", "data", 3, 'exclude { not_stage: "deploy" }') \
        + ip("f", "data", 3, 'include { phase: TEST max_level: 0 not_stage: "x" }')
    param = net_param(text)
    names = lambda **kw: [n for n in Net(param, **kw).layer_names if n != "data" and "split" not in n]
    assert names(phase=minicaffe.TRAIN) == ["a", "b"]
    assert names(phase=minicaffe.TEST) == ["a", "f"]
    assert names(phase=minicaffe.TEST, level=2) == ["a", "c"]
    assert names(phase=minicaffe.TEST, stages=["deploy"]) == ["a", "d", "e", "f"]
    assert names(phase=minicaffe.TEST, stages=["deploy", "x"]) == ["a", "d", "e"]


def test_include_and_exclude_together_is_an_error():
    param = net_param(INPUT + ip("a", "data", 3, 'include { phase: TRAIN } exclude { phase: TEST }'))
    with pytest.raises(MinicaffeError, match="either include or exclude"):
        Net(param)


def test_split_insertion_names_and_gradient():
    with blob_dtype(np.float64):
        net = Net(net_param(INPUT + ip("a", "data", 3) + ip("b", "a", 3) + ip("c", "a", 3)
                            + loss("lb", "b") + loss("lc", "c", "loss_weight: 0.5")), phase=minicaffe.TRAIN)
    assert "a_a_0_split" in net.layer_names
    assert net.layer_dict["a_a_0_split"].type_name == "Split"
    # The label blob feeds both losses, so it is split too.
    assert "label_data_1_split" in net.layer_names
    assert {"a_a_0_split_0", "a_a_0_split_1"} <= set(net.blobs)
    feed(net)
    check_net_gradient(net, net.params["a"])


def test_loss_weights_sum_into_the_net_loss():
    with blob_dtype(np.float64):
        net = Net(net_param(INPUT + ip("b", "data", 3) + loss("l1", "b", "loss_weight: 2")
                            + loss("l2", "b", "loss_weight: 0.25")), phase=minicaffe.TRAIN)
    feed(net)
    total = net.forward_layers()
    assert total == pytest.approx(2 * float(net.blobs["l1"].data) + 0.25 * float(net.blobs["l2"].data))
    check_net_gradient(net, net.params["b"])


def test_loss_weight_on_a_consumed_top_moves_to_the_split():
    # A loss-weighted top that also feeds another layer: Caffe routes the loss through the split.
    text = INPUT + ip("b", "data", 3, "loss_weight: 0.1") + loss("l", "b")
    with blob_dtype(np.float64):
        net = Net(net_param(text), phase=minicaffe.TRAIN)
    feed(net)
    total = net.forward_layers()
    assert total == pytest.approx(0.1 * net.blobs["b"].data.sum() + float(net.blobs["l"].data))
    check_net_gradient(net, net.params["b"])


def test_in_place_layer_shares_the_blob():
    text = INPUT + ip("b", "data", 3) + 'layer { name: "r" type: "ReLU" bottom: "b" top: "b" }' + loss("l", "b")
    with blob_dtype(np.float64):
        net = Net(net_param(text), phase=minicaffe.TRAIN)
    r = net.layer_names.index("r")
    assert net.bottom_vecs[r][0] is net.top_vecs[r][0]
    feed(net)
    net.forward_layers()
    assert (net.blobs["b"].data >= 0).all()
    check_net_gradient(net, net.params["b"])


def test_propagate_down_and_lr_mult_zero_stop_backward():
    text = INPUT + ip("a", "data", 3, "param { lr_mult: 0 } param { lr_mult: 0 }") + ip("b", "a", 3) \
        + ip("c", "b", 3) + loss("l", "c", "propagate_down: false propagate_down: false")
    net = Net(net_param(text), phase=minicaffe.TRAIN)
    need = dict(zip(net.layer_names, net.layer_need_backward))
    # propagate_down false on the loss cuts backward into c and everything before it.
    assert not any(need.values())
    text = INPUT + ip("a", "data", 3, "param { lr_mult: 0 } param { lr_mult: 0 }") + ip("b", "a", 3) + loss("l", "b")
    net = Net(net_param(text), phase=minicaffe.TRAIN)
    need = dict(zip(net.layer_names, net.layer_need_backward))
    assert need["b"] and not need["a"]
    assert net.bottom_need_backward[net.layer_names.index("b")] == [False]


def test_layers_not_under_a_loss_skip_backward():
    text = INPUT + ip("a", "data", 3) + ip("side", "a", 2) + ip("b", "a", 3) + loss("l", "b")
    net = Net(net_param(text), phase=minicaffe.TRAIN)
    need = dict(zip(net.layer_names, net.layer_need_backward))
    assert need["b"] and need["a"] and not need["side"]
    assert net.outputs == ["side", "l"]


def test_force_backward_reaches_the_inputs():
    text = "force_backward: true " + INPUT + ip("b", "data", 3) + loss("l", "b")
    with blob_dtype(np.float64):
        net = Net(net_param(text), phase=minicaffe.TRAIN)
    feed(net)
    net.forward_layers()
    diffs = net.backward()
    assert np.abs(diffs["data"]).sum() > 0
    check_net_gradient(net, [net.blobs["data"]])


def test_weights_shared_by_name_accumulate_gradients():
    shared = 'param { name: "w" } param { name: "bias" }'
    text = INPUT + ip("a", "data", 3, shared) + ip("b", "data", 3, shared) \
        + 'layer { name: "sum" type: "Split" bottom: "a" top: "a2" }' + loss("la", "a2") + loss("lb", "b")
    with blob_dtype(np.float64):
        net = Net(net_param(text), phase=minicaffe.TRAIN)
    assert len(net.learnable_params) == 2
    np.testing.assert_array_equal(net.params["a"][0].data, net.params["b"][0].data)
    net.params["a"][0].data[0, 0] = 7.0
    assert net.params["b"][0].data[0, 0] == 7.0
    feed(net)
    check_net_gradient(net, net.learnable_params)


def test_shared_weights_with_different_shapes_are_an_error():
    shared = 'param { name: "w" }'
    text = INPUT + ip("a", "data", 3, shared) + ip("b", "data", 4, shared)
    with pytest.raises(MinicaffeError, match="shared parameter 'w'"):
        Net(net_param(text))


def test_pycaffe_style_forward_and_backward():
    text = "force_backward: true " + INPUT + ip("b", "data", 3) + loss("l", "b")
    net = Net(net_param(text), phase=minicaffe.TRAIN)
    out = net.forward(data=np.ones((4, 3)), label=np.zeros(4))
    assert set(out) == {"l"} and np.isfinite(out["l"]).all()
    grads = net.backward()
    assert grads["data"].shape == (4, 3)
    assert list(net.params) == ["b"] and net.params["b"][0].data.shape == (3, 3)
    assert net.inputs == ["data", "label"]
    out = net.forward(data=np.ones((2, 3)), label=np.zeros(2))  # a new batch size reshapes the net
    assert net.blobs["b"].data.shape == (2, 3)


def test_deprecated_input_fields_become_an_input_layer():
    param = net_param('input: "data" input_shape { dim: 2 dim: 5 } ' + ip("b", "data", 3))
    net = Net(param)
    assert net.layer_dict["input"].type_name == "Input" and net.blobs["b"].shape == (2, 3)
    param = net_param('input: "data" input_dim: 2 input_dim: 5 input_dim: 1 input_dim: 1 ' + ip("b", "data", 3))
    assert Net(param).blobs["data"].shape == (2, 5, 1, 1)


def test_missing_bottom_and_unknown_type_name_the_file_and_line(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(INPUT + "\n" + ip("b", "nothing", 3))
    with pytest.raises(MinicaffeError, match=r"net.prototxt:5: layer 'b' \(InnerProduct\): bottom 'nothing'"):
        Net(str(path))
    path.write_text(INPUT + '\nlayer { name: "x" type: "InnerProduc" bottom: "data" top: "x" }')
    with pytest.raises(MinicaffeError, match=r"net.prototxt:5: layer 'x' has unknown type 'InnerProduc'.*"
                                             r"did you mean 'InnerProduct'"):
        Net(str(path))


def test_shape_mismatch_names_the_layer(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(INPUT + loss("l", "data") + '\nlayer { name: "acc" type: "Accuracy" bottom: "data" '
                    'bottom: "data" top: "acc" }')
    with pytest.raises(MinicaffeError, match=r"net.prototxt:\d+: layer 'acc'"):
        Net(str(path))


def test_save_and_copy_from_round_trip(tmp_path):
    param = net_param(INPUT + ip("b", "data", 3) + loss("l", "b"))
    a, b = Net(param), Net(param)
    path = tmp_path / "w.caffemodel"
    a.save(str(path))
    b.copy_from(str(path))
    for pa, pb_ in zip(a.learnable_params, b.learnable_params):
        np.testing.assert_array_equal(pa.data, pb_.data)
    loaded = Net(param, str(path), minicaffe.TEST)  # pycaffe's positional form
    np.testing.assert_array_equal(loaded.params["b"][0].data, a.params["b"][0].data)


def test_copy_from_reports_shape_mismatch_and_truncation(tmp_path):
    small = Net(net_param(INPUT + ip("b", "data", 3)))
    big = Net(net_param(INPUT + ip("b", "data", 5)))
    path = tmp_path / "w.caffemodel"
    small.save(str(path))
    with pytest.raises(MinicaffeError, match=r"layer 'b' blob 0.*\(3, 3\).*\(5, 3\)"):
        big.copy_from(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MinicaffeError, match="truncated or corrupt"):
        small.copy_from(str(path))


def test_frozen_parameters_get_no_gradient():
    text = "force_backward: false " + INPUT + ip("a", "data", 3, "param { lr_mult: 0 } param { lr_mult: 1 }") \
        + ip("b", "a", 3) + loss("l", "b")
    net = Net(net_param(text), phase=minicaffe.TRAIN)
    assert net.layer_dict["a"].param_propagate_down == [False, True]
    feed(net)
    net.clear_param_diffs()
    net.forward_backward()
    assert not net.params["a"][0].diff.any() and net.params["a"][1].diff.any()
