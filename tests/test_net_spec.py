"""NetSpec (pycaffe's caffe.net_spec): LeNet rebuilt in Python equals the prototxt, and the pieces."""
import numpy as np
import pytest
from google.protobuf import text_format

from conftest import REPO
from minicaffe import Net, TRAIN, net_spec, prototxt
from minicaffe.errors import MinicaffeError
from minicaffe.proto import minicaffe_pb2 as pb

L, P = net_spec.layers, net_spec.params
LENET = REPO / "prototxt" / "lenet"
LEARN = [dict(lr_mult=1), dict(lr_mult=2)]


def lenet_body(n, bottom):
    """LeNet from conv1 to ip2, as prototxt/lenet writes it."""
    n.conv1 = L.Convolution(bottom, kernel_size=5, stride=1, num_output=20, param=LEARN,
                            weight_filler=dict(type="xavier"), bias_filler=dict(type="constant"))
    n.pool1 = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, stride=1, num_output=50, param=LEARN,
                            weight_filler=dict(type="xavier"), bias_filler=dict(type="constant"))
    n.pool2 = L.Pooling(n.conv2, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.ip1 = L.InnerProduct(n.pool2, num_output=500, param=LEARN, weight_filler=dict(type="xavier"),
                           bias_filler=dict(type="constant"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10, param=LEARN, weight_filler=dict(type="xavier"),
                           bias_filler=dict(type="constant"))
    return n.ip2


def fashion_mnist(phase, split, batch_size, shuffle):
    n = net_spec.NetSpec()
    n.data, n.label = L.Data(name="fashion_mnist", include=dict(phase=phase), transform_param=dict(scale=1 / 256),
                             source=f"fashion-mnist:{split}", batch_size=batch_size, backend=P.Data.IDX,
                             shuffle=shuffle, ntop=2)
    return n


def test_lenet_train_test_rebuilt_with_net_spec_equals_the_prototxt():
    expected = prototxt.read_net_param(LENET / "lenet_train_test.prototxt")
    n = fashion_mnist(pb.TEST, "test", 100, False)
    lenet_body(n, n.data)
    n.accuracy = L.Accuracy(n.ip2, n.label, include=dict(phase=pb.TEST))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    net = n.to_proto()
    # A NetSpec holds one producer per top, so the TRAIN data layer (same tops) comes from a second one.
    train_data = fashion_mnist(pb.TRAIN, "train", 64, True).to_proto().layer
    layers = [*train_data, *net.layer]
    del net.layer[:]
    net.layer.extend(layers)
    net.name = "LeNet"
    assert text_format.MessageToString(net) == text_format.MessageToString(expected)
    assert net == expected


def test_lenet_deploy_rebuilt_with_net_spec_equals_the_prototxt():
    expected = prototxt.read_net_param(LENET / "lenet_deploy.prototxt")
    n = net_spec.NetSpec()
    n.data = L.Input(shape=dict(dim=[64, 1, 28, 28]))
    n.prob = L.Softmax(lenet_body(n, n.data))
    net = n.to_proto()
    net.name = "LeNet"
    assert net == expected


def test_a_net_spec_net_builds_and_trains_one_step():
    n = net_spec.NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[4, 1, 28, 28]), dict(dim=[4])],
                                  data_filler=[dict(type="gaussian", std=1), dict(type="constant", value=3)], ntop=2)
    n.loss = L.SoftmaxWithLoss(lenet_body(n, n.data), n.label)
    net = Net(n.to_proto(), phase=TRAIN)
    loss = net.forward_layers()
    net.backward_layers()
    assert np.isfinite(loss) and loss > 0
    assert np.abs(net.params["conv1"][0].diff).sum() > 0
    assert net.blobs["ip2"].shape == (4, 10)


def test_keywords_go_to_the_layer_parameter_or_its_own_message():
    n = net_spec.NetSpec()
    n.data = L.Input(shape=[dict(dim=[1, 3, 8, 8])])
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=[3], pad=1, param=[dict(lr_mult=1, decay_mult=1)],
                           bias_term=False, propagate_down=[True])
    n.deconv = L.Deconvolution(n.conv, num_output=2, kernel_size=2, stride=2)
    n.scaled = L.Power(n.deconv, power_param=dict(scale=2.0), loss_weight=0.3,
                       exclude=[dict(phase=pb.TEST), dict(stage="x")])
    layers = {layer.name: layer for layer in n.to_proto().layer}
    conv = layers["conv"]
    assert list(conv.convolution_param.kernel_size) == [3] and list(conv.convolution_param.pad) == [1]
    assert not conv.convolution_param.bias_term and list(conv.propagate_down) == [True]
    assert conv.param[0].lr_mult == 1 and conv.param[0].decay_mult == 1
    assert layers["deconv"].convolution_param.num_output == 2
    assert list(layers["deconv"].convolution_param.stride) == [2]
    scaled = layers["scaled"]
    assert scaled.power_param.scale == 2.0 and list(scaled.loss_weight) == [pytest.approx(0.3)]
    assert [rule.phase for rule in scaled.exclude] == [pb.TEST, pb.TRAIN] and scaled.exclude[1].stage == ["x"]


def test_names_in_place_layers_and_auto_named_tops():
    n = net_spec.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3]))
    hidden = L.InnerProduct(n.data, num_output=5)   # not stored in the NetSpec: auto-named
    n.act = L.ReLU(hidden, in_place=True)
    n.out = L.InnerProduct(n.act, num_output=2, name="classifier")
    layers = n.to_proto().layer
    assert [(layer.name, list(layer.bottom), list(layer.top)) for layer in layers] == [
        ("data", [], ["data"]),
        ("InnerProduct1", ["data"], ["InnerProduct1"]),
        ("act", ["InnerProduct1"], ["InnerProduct1"]),
        ("classifier", ["InnerProduct1"], ["out"]),
    ]


def test_ntop_and_to_proto_of_loose_tops():
    data, label = L.DummyData(shape=[dict(dim=[2, 3]), dict(dim=[2])], ntop=2)
    silence = L.Silence(data, label, ntop=0)
    assert isinstance(silence, net_spec.Function)
    net = net_spec.to_proto(label, data)
    assert [layer.type for layer in net.layer] == ["DummyData"]
    assert list(net.layer[0].top) == ["DummyData1", "DummyData2"]
    assert label.to_proto() == net
    assert len(L.Slice(data, ntop=3, slice_point=[1, 2])) == 3


def test_params_reads_enum_values_and_strings_name_them():
    assert P.Pooling.MAX == pb.PoolingParameter.MAX and P.Pooling.AVE == pb.PoolingParameter.AVE
    assert P.Data.LMDB == pb.DataParameter.LMDB and P.LRN.WITHIN_CHANNEL == pb.LRNParameter.WITHIN_CHANNEL
    assert P.Eltwise.SUM == pb.EltwiseParameter.SUM
    n = net_spec.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    n.pool = L.Pooling(n.data, pool="AVE", kernel_size=2, include=dict(phase="TRAIN"))
    layer = n.to_proto().layer[1]
    assert layer.pooling_param.pool == pb.PoolingParameter.AVE and layer.include[0].phase == pb.TRAIN
    with pytest.raises(AttributeError, match="PoolingParameter has no value MAXIMUM"):
        P.Pooling.MAXIMUM


@pytest.mark.parametrize("make, message", [
    (lambda d: L.Convolution(d, num_outputs=3), r"layer 'bad' \(Convolution\): cannot set 'num_outputs'"),
    (lambda d: L.Pooling(d, pool="MAXIMUM"), r"bad value 'MAXIMUM' \(PoolMethod is one of MAX, AVE, STOCHASTIC\)"),
    (lambda d: L.Convolution(d, weight_filler="xavier"), r"'weight_filler' is a FillerParameter message: give a dict"),
    (lambda d: L.Convolution(d, num_output="many"), r"cannot set 'num_output'"),
])
def test_bad_keywords_give_one_line_errors_naming_the_layer(make, message):
    n = net_spec.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    n.bad = make(n.data)
    with pytest.raises(MinicaffeError, match=message) as error:
        n.to_proto()
    assert "\n" not in str(error.value)


def test_bottoms_must_be_tops():
    with pytest.raises(MinicaffeError, match="ReLU: bottom 0 is a str"):
        L.ReLU("data")
    with pytest.raises(MinicaffeError, match="in_place needs one top per bottom"):
        L.Eltwise(*L.DummyData(shape=dict(dim=[1]), ntop=2), in_place=True)


def test_net_spec_is_a_mapping_of_tops():
    n = net_spec.NetSpec()
    n["a/b"] = L.Input(shape=dict(dim=[1]))
    n.c = L.ReLU(n["a/b"])
    assert n.keys() == ["a/b", "c"] and n.vals() == [n["a/b"], n.c]
    del n["c"]
    assert [layer.name for layer in n.to_proto().layer] == ["a/b"]
    with pytest.raises(AttributeError):
        n.missing


def test_exported_as_minicaffe_layers_it_keeps_the_layer_modules_importable(monkeypatch):
    # pycaffe's spelling, `from minicaffe import layers as L`, puts this object where the
    # minicaffe/layers/ package is; module imports that resolve by attribute must still work.
    import minicaffe
    import minicaffe.layers.pooling  # noqa: F401
    monkeypatch.setattr(minicaffe, "layers", net_spec.layers)
    monkeypatch.setattr(minicaffe, "params", net_spec.params, raising=False)
    from minicaffe import layers as exported_L, params as exported_P
    import minicaffe.layers.pooling as pooling_module
    from minicaffe.layers import conv as conv_module
    assert exported_L is L and exported_P is P
    assert pooling_module.__name__ == "minicaffe.layers.pooling" and conv_module.__name__ == "minicaffe.layers.conv"
    assert isinstance(exported_L.Pooling(L.Input(shape=dict(dim=[1])), pool=exported_P.Pooling.MAX), net_spec.Top)
