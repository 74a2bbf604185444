"""BVLC Caffe's own net files (../shared/caffe-prototxt) parse, build and run forward and backward.

The files are used as they are, except that each Data layer (which needs Caffe's LMDBs) becomes a
DummyData layer with the same tops and top shapes, and the batch is cut to 1-2 to stay fast.
"""
from pathlib import Path

import numpy as np
import pytest

from minicaffe import Net, TEST, TRAIN, prototxt
from minicaffe.proto import minicaffe_pb2 as pb

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "caffe-prototxt"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/caffe-prototxt is not present")

# file: (batch used here, classes, image shape of the dataset before any crop)
TRAIN_FILES = {
    "mnist__lenet_train_test.prototxt": (2, 10, (1, 28, 28)),
    "cifar10__cifar10_quick_train_test.prototxt": (2, 10, (3, 32, 32)),
    "cifar10__cifar10_full_train_test.prototxt": (2, 10, (3, 32, 32)),
    "bvlc_alexnet__train_val.prototxt": (1, 1000, (3, 256, 256)),
    "bvlc_reference_caffenet__train_val.prototxt": (1, 1000, (3, 256, 256)),
    "bvlc_googlenet__train_val.prototxt": (1, 1000, (3, 256, 256)),
}
DEPLOY_FILES = {
    "mnist__lenet.prototxt": (2, 10),
    "cifar10__cifar10_quick.prototxt": (2, 10),
    "bvlc_alexnet__deploy.prototxt": (1, 1000),
    "bvlc_reference_caffenet__deploy.prototxt": (1, 1000),
    "bvlc_googlenet__deploy.prototxt": (1, 1000),
}


def data_as_dummy(param, batch, classes, image_shape):
    """Each Data layer becomes DummyData with its tops' shapes; the rest of the file is untouched."""
    swapped = 0
    for layer in param.layer:
        if layer.type != "Data":
            continue
        crop = layer.transform_param.crop_size
        channels, height, width = image_shape
        data_shape = [batch, channels, crop or height, crop or width]
        name, tops, rules = layer.name, list(layer.top), list(layer.include)
        layer.Clear()
        layer.name, layer.type = name, "DummyData"
        layer.top.extend(tops)
        layer.include.extend(rules)
        dummy = layer.dummy_data_param
        dummy.shape.add().dim.extend(data_shape)
        dummy.data_filler.add(type="gaussian", std=1)
        if len(tops) > 1:
            dummy.shape.add().dim.append(batch)
            dummy.data_filler.add(type="uniform", min=0, max=classes - 0.01)
        swapped += 1
    assert swapped, "no Data layer to swap"
    return param


def test_every_file_is_covered():
    nets = {path.name for path in SHARED.glob("*.prototxt") if "solver" not in path.name}
    assert nets == set(TRAIN_FILES) | set(DEPLOY_FILES)


@pytest.mark.parametrize("file_name", list(TRAIN_FILES))
def test_train_val_runs_forward_and_backward(file_name):
    batch, classes, image_shape = TRAIN_FILES[file_name]
    param = data_as_dummy(prototxt.read_net_param(SHARED / file_name), batch, classes, image_shape)
    net = Net(param, phase=TRAIN)
    loss = net.forward_layers()
    assert np.isfinite(loss) and loss > 0
    net.backward_layers()
    first = next(iter(net.params.values()))[0]
    assert np.any(first.diff) and np.all(np.isfinite(first.diff))
    assert all(np.all(np.isfinite(blob.diff)) for blob in net.learnable_params)


@pytest.mark.parametrize("file_name", [f for f in TRAIN_FILES if "alexnet" not in f and "caffenet" not in f])
def test_train_val_runs_forward_in_test_phase(file_name):
    batch, classes, image_shape = TRAIN_FILES[file_name]
    param = data_as_dummy(prototxt.read_net_param(SHARED / file_name), batch, classes, image_shape)
    net = Net(param, phase=TEST)
    net.forward_layers()
    accuracies = [name for name, layer in net.layer_dict.items() if layer.type_name == "Accuracy"]
    assert accuracies
    assert all(0 <= float(net.blobs[net.top_vecs[net.layer_names.index(a)][0].name].data) <= 1 for a in accuracies)


@pytest.mark.parametrize("file_name", list(DEPLOY_FILES))
def test_deploy_runs_forward_and_backward(file_name):
    batch, classes = DEPLOY_FILES[file_name]
    param = prototxt.read_net_param(SHARED / file_name)
    for layer in param.layer:
        if layer.type == "Input":
            layer.input_param.shape[0].dim[0] = batch
    param.force_backward = True
    net = Net(param, phase=TEST)
    image = np.random.default_rng(0).normal(size=net.blobs["data"].shape)
    prob = net.forward(data=image)["prob"]
    assert prob.shape == (batch, classes)
    np.testing.assert_allclose(prob.sum(axis=1), 1, rtol=1e-5)
    image_diff = net.backward(prob=np.ones_like(prob) / classes - (np.arange(classes) == 0))["data"]
    assert np.all(np.isfinite(image_diff))


@pytest.mark.parametrize("file_name", sorted(path.name for path in SHARED.glob("*solver.prototxt"))
                         if SHARED.is_dir() else [])
def test_solvers_parse(file_name):
    solver = prototxt.read_solver(SHARED / file_name)
    assert solver.base_lr > 0 and solver.max_iter > 0


def test_googlenet_auxiliary_losses_are_weighted_as_in_the_file():
    param = data_as_dummy(prototxt.read_net_param(SHARED / "bvlc_googlenet__train_val.prototxt"), 1, 1000,
                          (3, 256, 256))
    net = Net(param, phase=TRAIN)
    weights = {name: net.layer_dict[name].loss_weights[0]
               for name in net.layer_names if net.layer_dict[name].is_loss}
    assert weights == pytest.approx({"loss1/loss": 0.3, "loss2/loss": 0.3, "loss3/loss3": 1.0})
    assert net.forward_layers() == pytest.approx(
        sum(w * float(net.blobs[name].data) for name, w in
            (("loss1/loss1", 0.3), ("loss2/loss2", 0.3), ("loss3/loss3", 1.0))), rel=1e-5)


# Our zoo (prototxt/, generated by prototxt/make_zoo.py) against BVLC's definition of the same net.
ZOO_TWINS = {
    "bvlc_alexnet__train_val.prototxt": "alexnet/alexnet_train_val.prototxt",
    "bvlc_alexnet__deploy.prototxt": "alexnet/alexnet_deploy.prototxt",
    "bvlc_reference_caffenet__train_val.prototxt": "caffenet/caffenet_train_val.prototxt",
    "bvlc_reference_caffenet__deploy.prototxt": "caffenet/caffenet_deploy.prototxt",
    "bvlc_googlenet__train_val.prototxt": "googlenet/googlenet_train_val.prototxt",
    "bvlc_googlenet__deploy.prototxt": "googlenet/googlenet_deploy.prototxt",
    "cifar10__cifar10_full_train_test.prototxt": "cifar10_full/cifar10_full_train_val.prototxt",
}


def architecture(param):
    """Layers as Caffe runs them, without inputs, initialization and learning-rate multipliers."""
    layers = []
    for layer in param.layer:
        if layer.type in ("Data", "DummyData", "Input"):
            continue
        kept = pb.LayerParameter()
        kept.CopyFrom(layer)
        kept.ClearField("param")
        for field in ("convolution_param", "inner_product_param"):
            getattr(kept, field).ClearField("weight_filler")
            getattr(kept, field).ClearField("bias_filler")
        layers.append(kept)
    return layers


@pytest.mark.parametrize("file_name", list(ZOO_TWINS))
def test_zoo_net_has_the_architecture_and_names_of_caffes(file_name):
    ours = architecture(prototxt.read_net_param(Path(__file__).resolve().parents[1] / "prototxt" / ZOO_TWINS[file_name]))
    caffes = architecture(prototxt.read_net_param(SHARED / file_name))
    assert [(l.name, l.type, list(l.bottom), list(l.top)) for l in ours] == \
        [(l.name, l.type, list(l.bottom), list(l.top)) for l in caffes]
    different = [a.name for a, b in zip(ours, caffes) if a != b]
    assert not different, f"layers whose parameters differ from Caffe's: {different}"
