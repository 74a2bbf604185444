"""Every net of the model zoo (prototxt/) builds and runs forward and backward, at a small batch.

The train_val nets run in the TRAIN phase (loss, then gradients for every learnable blob); the deploy
nets run forward (probabilities) and backward from the output to the image. Batches are cut to 1-2 so
the file stays fast; the big ImageNet nets run at batch 1.
"""
import gc
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, write_idx
from minicaffe import Net, TEST, TRAIN, prototxt
from minicaffe.proto import minicaffe_pb2 as pb

ZOO = REPO / "prototxt"
# net: (batch for the test, number of classes)
NETS = {
    "lenet": (2, 10),
    "cifar10_quick": (2, 10),
    "cifar10_full": (2, 10),
    "resnet_fmnist": (2, 10),
    "alexnet": (1, 1000),
    "caffenet": (1, 1000),
    "googlenet": (2, 1000),
    "vgg16": (1, 1000),
    "resnet50": (1, 1000),
}
# Learnable parameters (weights, biases, BatchNorm's Scale) of the published architectures.
PUBLISHED_PARAMETER_COUNTS = {
    "alexnet": 60_965_224,     # Caffe's bvlc_alexnet, grouped conv2/4/5
    "caffenet": 60_965_224,
    "vgg16": 138_357_544,
    "resnet50": 25_557_032,    # BatchNorm's running mean/variance/factor not counted
}
# The batch each train_val net is timed at (the table).
TIMING_BATCH = {"cifar10_full": 100, "alexnet": 16, "caffenet": 16, "googlenet": 8, "vgg16": 4, "resnet50": 8,
                "resnet_fmnist": 128}


def train_val_path(name):
    folder = ZOO / name
    matches = sorted(folder.glob(f"{name}_train_val.prototxt")) + sorted(folder.glob(f"{name}_train_test.prototxt"))
    assert matches, f"{folder} has no train_val/train_test prototxt"
    return matches[0]


@pytest.fixture(scope="module")
def tiny_fashion(tmp_path_factory):
    """Eight 28x28 images with labels, in place of Fashion-MNIST for the nets whose Data layers read it."""
    folder = tmp_path_factory.mktemp("tiny_fashion")
    rng = np.random.default_rng(0)
    write_idx(folder / "tiny-images-idx3-ubyte.gz", rng.integers(0, 256, size=(8, 28, 28)), 0x803)
    write_idx(folder / "tiny-labels-idx1-ubyte.gz", rng.integers(0, 10, size=8), 0x801)
    return folder / "tiny-images-idx3-ubyte.gz"


def with_batch(param, batch, idx_source=None):
    """The net with every input layer at ``batch`` (Data layers reading ``idx_source``); all else kept."""
    for layer in param.layer:
        if layer.type == "DummyData":
            for shape in layer.dummy_data_param.shape:
                shape.dim[0] = batch
        elif layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = batch
        elif layer.type == "Data":
            layer.data_param.batch_size = batch
            layer.data_param.source = str(idx_source)
    return param


def learnable_blobs(net):
    """Parameter blobs the solver updates (BatchNorm's statistics have lr_mult 0)."""
    return [blob for blob, lr in zip(net.learnable_params, net.params_lr) if lr != 0]


def calibrate_batch_norms(net, image):
    """Stores each BatchNorm's input statistics for ``image`` as its running estimates, as training would.

    Untrained zeros would make BatchNorm divide by sqrt(eps) and blow up a deep ResNet's activations
    until the softmax saturates and passes back no gradient.
    """
    net.blobs["data"].data[...] = image
    for i, layer in enumerate(net.layers):
        if layer.type_name == "BatchNorm":
            x = net.bottom_vecs[i][0].data
            axes = (0, *range(2, x.ndim))
            layer.blobs[0].data[...] = x.mean(axis=axes)
            layer.blobs[1].data[...] = x.var(axis=axes)
            layer.blobs[2].data[...] = 1
        layer.forward(net.bottom_vecs[i], net.top_vecs[i])


@pytest.fixture(autouse=True)
def release_memory():
    # VGG-16 alone holds ~1 GB of weights and gradients; free each net before the next.
    yield
    gc.collect()


@pytest.mark.parametrize("name", list(NETS))
def test_train_val_runs_forward_and_backward_in_train_phase(name, tiny_fashion):
    batch, classes = NETS[name]
    param = with_batch(prototxt.read_net_param(train_val_path(name)), batch, tiny_fashion)
    net = Net(param, phase=TRAIN)
    try:
        assert net.batch_size() == batch
        loss = net.forward_layers()
        # Random scores over C classes start near the uniform cross-entropy log(C) per loss term.
        assert np.isfinite(loss) and 0.1 * np.log(classes) < loss < 20 * np.log(classes)
        net.backward_layers()
        blobs = learnable_blobs(net)
        assert blobs
        silent = [blob.name for blob in blobs if not np.any(blob.diff)]
        assert not silent, f"no gradient reached {silent}"
        assert all(np.all(np.isfinite(blob.diff)) for blob in blobs)
        assert not any(n.endswith("accuracy") or "top-" in n for n in net.blobs), "TEST-only layers in TRAIN"
    finally:
        net.close()


@pytest.mark.parametrize("name", ["lenet", "cifar10_full", "resnet_fmnist", "googlenet"])
def test_train_val_runs_forward_in_test_phase(name, tiny_fashion):
    batch, classes = NETS[name]
    net = Net(with_batch(prototxt.read_net_param(train_val_path(name)), batch, tiny_fashion), phase=TEST)
    try:
        net.forward_layers()
        accuracies = [blob for n, blob in net.blobs.items() if n.endswith(("accuracy", "top-1", "top-5"))]
        assert accuracies and all(0 <= float(blob.data) <= 1 for blob in accuracies)
    finally:
        net.close()


@pytest.mark.parametrize("name", list(NETS))
def test_deploy_gives_probabilities_and_backpropagates_to_the_image(name):
    batch, classes = NETS[name]
    param = with_batch(prototxt.read_net_param(ZOO / name / f"{name}_deploy.prototxt"), batch)
    param.force_backward = True   # a deploy net has no loss, so nothing would run backward otherwise
    net = Net(param, phase=TEST)
    assert net.inputs == ["data"] and net.outputs == ["prob"]
    if name in PUBLISHED_PARAMETER_COUNTS:
        counted = sum(blob.count for layer, blobs in net.params.items()
                      if net.layer_dict[layer].type_name != "BatchNorm" for blob in blobs)
        assert counted == PUBLISHED_PARAMETER_COUNTS[name]
    image = np.random.default_rng(1).normal(size=net.blobs["data"].shape)
    calibrate_batch_norms(net, image)
    prob = net.forward(data=image)["prob"]
    assert prob.shape == (batch, classes)
    np.testing.assert_allclose(prob.sum(axis=1), 1, rtol=1e-5)
    diff = np.zeros_like(prob)
    diff[:, 0] = 1
    image_diff = net.backward(prob=diff)["data"]
    assert image_diff.shape == image.shape and np.any(image_diff) and np.all(np.isfinite(image_diff))


@pytest.mark.parametrize("name", [n for n in NETS if n not in ("lenet", "cifar10_quick")])
def test_zoo_nets_keep_caffe_layout_and_timing_batch(name):
    train_val = prototxt.read_net_param(train_val_path(name))
    deploy = prototxt.read_net_param(ZOO / name / f"{name}_deploy.prototxt")
    if name != "resnet_fmnist":
        inputs = train_val.layer[0]
        assert inputs.type == "DummyData" and inputs.dummy_data_param.shape[0].dim[0] == TIMING_BATCH[name]
    else:
        assert [l.data_param.batch_size for l in train_val.layer if l.type == "Data"] == [TIMING_BATCH[name], 100]
    # The deploy net is the train_val net without its data, loss and accuracy layers (plus "prob").
    kept = lambda net: [l.name for l in net.layer if l.type not in
                        ("DummyData", "Data", "Input", "SoftmaxWithLoss", "Accuracy", "Softmax")]
    deploy_layers = kept(deploy)
    if name == "googlenet":
        train_layers = [n for n in kept(train_val) if not re.match(r"loss[12]/", n)]
    else:
        train_layers = kept(train_val)
    assert deploy_layers == train_layers


def test_committed_zoo_files_are_what_make_zoo_writes():
    result = subprocess.run([sys.executable, str(ZOO / "make_zoo.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("solver_path", sorted(ZOO.glob("*/*_solver.prototxt")), ids=lambda p: p.parent.name)
def test_solvers_parse_and_name_an_existing_net(solver_path):
    solver = prototxt.read_solver(solver_path)
    assert (REPO / solver.net).is_file()
    assert solver.momentum > 0 and solver.base_lr > 0 and solver.max_iter > 0


def test_resnet_fmnist_solver_fits_in_thirty_epochs():
    solver = prototxt.read_solver(ZOO / "resnet_fmnist" / "resnet_fmnist_solver.prototxt")
    train_val = prototxt.read_net_param(REPO / solver.net)
    batch = next(l.data_param.batch_size for l in train_val.layer
                 if l.type == "Data" and l.include[0].phase == pb.TRAIN)
    epochs = solver.max_iter * solver.iter_size * batch / 60_000
    assert 0 < epochs <= 30
    assert solver.momentum == pytest.approx(0.9) and 1e-4 - 1e-9 <= solver.weight_decay <= 5e-4 + 1e-9
    assert solver.test_iter[0] * 100 == 10_000
