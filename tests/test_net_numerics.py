"""AlexNet and ResNet-50 agree with an independent plain-NumPy float64 reference (numpy_net_reference.py).

Both nets run at batch 1 in float32 with their fillers' weights, every constant-filled blob perturbed
and BatchNorm statistics set to non-trivial values; the image is mean-subtracted-pixel sized (std 64),
at which AlexNet's LRN scales its input by 0.93-1.0 (at std 1 it would be the identity to 1e-5).

* TEST (the deploy nets): every blob's data, the reference running on its own (free-running), and
  every layer's output computed by the reference from minicaffe's inputs to that layer.
* TRAIN (train_val with Dropout ratio 0 and force_backward): the same forward checks, then every
  blob's diff and every learnable parameter's gradient. The reference's backward pass runs at
  minicaffe's forward point (each layer's output replaced by minicaffe's): a ReLU input or max-pool
  near-tie within float32 rounding of the decision, a few per million elements, would otherwise route
  a gradient element differently without either side being wrong.

Errors are max|minicaffe - reference| / max|reference| over a blob. Tolerances: 1e-4 for per-layer
outputs, diffs and gradients (float32 dot products of up to 9216 terms, and weight gradients summed over
up to 12544 positions, carry ~sqrt(K) * 6e-8 of relative error; measured: below 1e-5); 1e-4 for the
free-running TEST forward (measured: ~2e-6); 1e-3 for the free-running TRAIN forward, where
batch-statistics BatchNorm over 49 values per channel amplifies rounding differences roughly twofold per
ResNet stage (measured: 1.5e-4 at res5c_branch2c; PyTorch's float32 is as far from its own float64).
"""
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from minicaffe import Net, TEST, TRAIN, prototxt
from numpy_net_reference import NumpyNet

sys.path.insert(0, str(REPO / "benchmarks"))
from compare_pytorch import (FREE_RUNNING_TOLERANCE, PER_LAYER_TOLERANCE, forward_layer_by_layer,  # noqa: E402
                             perturb_weights, relative_error)

ZOO = REPO / "prototxt"
IMAGE_STD = 64.0


def zoo_net(name, kind, batch):
    """prototxt/<name>/<name>_<kind>.prototxt at ``batch``, with TRAIN's Dropout off and force_backward."""
    param = prototxt.read_net(ZOO / name / f"{name}_{kind}.prototxt").param
    for layer in param.layer:
        if layer.type == "Input":
            layer.input_param.shape[0].dim[0] = batch
        elif layer.type == "DummyData":
            layer.dummy_data_param.data_filler[0].std = IMAGE_STD
            for shape in layer.dummy_data_param.shape:
                shape.dim[0] = batch
        elif layer.type == "Dropout":
            layer.dropout_param.dropout_ratio = 0
    param.force_backward = True
    return param


class Errors:
    """Collects (kind, name, error, tolerance) and reports every one over its tolerance at once."""

    def __init__(self):
        self.rows = []

    def add(self, kind, name, mine, reference, tolerance):
        reference = np.reshape(np.asarray(reference, np.float64), np.shape(mine))
        self.rows.append((kind, name, relative_error(mine, reference), tolerance))

    def check(self):
        worst = {}
        for kind, name, error, _ in self.rows:
            if error >= worst.get(kind, ("", -1))[1]:
                worst[kind] = (name, error)
        print("  ".join(f"{kind} {error:.1e} ({name})" for kind, (name, error) in worst.items()))
        failures = [f"{kind} {name}: {error:.2e} > {tol:g}" for kind, name, error, tol in self.rows if error > tol]
        assert not failures, "\n".join(failures)


def check_forward(net, param, phase, errors):
    """Runs minicaffe (inputs already in place) and the reference; returns the reference, ready for
    backward at minicaffe's forward point, and minicaffe's per-layer outputs."""
    params = {name: [blob.data for blob in blobs] for name, blobs in net.params.items()}
    mine = forward_layer_by_layer(net)
    inputs = {name: net.blobs[name].data for name in ("data", "label") if name in net.blobs}
    reference = NumpyNet(param, phase, params)
    free = reference.forward(inputs)
    for name, value in free.items():
        errors.add("data", name, net.blobs[name].data, value, FREE_RUNNING_TOLERANCE[phase])
    own = {}
    reference.forward(inputs, forced_outputs=mine, own_outputs=own)
    for key, value in own.items():
        errors.add("layer", f"{key[0]}[{key[1]}]", mine[key], value, PER_LAYER_TOLERANCE)
    return reference


@pytest.mark.parametrize("name", ["alexnet", "resnet50"])
def test_deploy_forward_matches_numpy_reference(name):
    start = time.perf_counter()
    param = zoo_net(name, "deploy", batch=1)
    rng = np.random.default_rng(1)
    net = Net(param, phase=TEST)
    perturb_weights(net, rng)
    net.blobs["data"].data[...] = rng.normal(0, IMAGE_STD, net.blobs["data"].shape)
    errors = Errors()
    check_forward(net, param, TEST, errors)
    print(f"{name} TEST: {time.perf_counter() - start:.1f} s")
    errors.check()


@pytest.mark.parametrize("name", ["alexnet", "resnet50"])
def test_train_forward_and_backward_match_numpy_reference(name):
    start = time.perf_counter()
    param = zoo_net(name, "train_val", batch=1)
    net = Net(param, phase=TRAIN)
    perturb_weights(net, np.random.default_rng(2))
    errors = Errors()
    reference = check_forward(net, param, TRAIN, errors)
    net.backward()
    diffs, param_grads = reference.backward()
    for blob_name, diff in diffs.items():
        errors.add("diff", blob_name, net.blobs[blob_name].diff, diff, PER_LAYER_TOLERANCE)
    checked = 0
    for layer_name, blobs in net.params.items():
        specs = net.layer_dict[layer_name].param.param
        for j, blob in enumerate(blobs):
            if j < len(specs) and specs[j].lr_mult == 0:
                continue
            errors.add("grad", f"{layer_name}[{j}]", blob.diff, param_grads[layer_name][j], PER_LAYER_TOLERANCE)
            checked += 1
    assert checked == len([lr for lr in net.params_lr if lr != 0])
    print(f"{name} TRAIN: {time.perf_counter() - start:.1f} s")
    errors.check()
