"""Checks minicaffe's numerics against PyTorch on the model zoo, in float32, with the same weights and inputs.

    PYTHONPATH=. python benchmarks/compare_pytorch.py [--nets alexnet resnet50 ...] [--batch 1]
                                                      [--full] [--json results.json]

For each net (default: every zoo net) two runs, compared with benchmarks/torch_reference.py's
translation of the same graph:

* TEST: the deploy net, forward.
* TRAIN: the train_val net (Data layers replaced by DummyData of the deploy input's shape, Dropout
  ratio 0 so that no random mask is involved, force_backward so the image gets a gradient), forward
  then backward from the loss.

What is compared (the kinds in the tables):

* data: every blob's value after a free-running forward pass of each implementation;
* layer: every layer's output, PyTorch's computed from minicaffe's inputs to that layer;
* stat: the BatchNorm running statistics after a TRAIN forward pass;
* diff, grad: every blob's diff and every learnable parameter's gradient, the PyTorch backward pass
  running at minicaffe's forward point (each layer's output forced to minicaffe's value, gradients
  passing straight through). Free-running, a ReLU input or max-pooling near-tie within float32
  rounding of the decision (a few per million elements; ResNet-50 has millions) routes a gradient
  element differently, which is not a numerical error of either side.

Weights are minicaffe's fillers' with every constant-filled blob (biases, Scale's ones) perturbed and
BatchNorm statistics set to non-trivial values, so that no term is trivially zero or one. The images
of the ImageNet and CIFAR-10 nets have the scale of mean-subtracted pixels (std 64), at which
AlexNet's LRN scales its input by 0.93-1.0 rather than being the identity to 1e-5.

Error: max|minicaffe - torch| / max(|minicaffe|, |torch|) over a blob. Tolerances:

* 1e-4 for layer, stat, diff and grad. float32's unit roundoff is 6e-8; a dot product of K terms
  summed in different orders (K up to 9216 here, and up to 12544 positions summed into a
  convolution's weight gradient) differs by about sqrt(K) x 6e-8 ~ 1e-5 of its terms' magnitude,
  and backward errors build up over the net's depth. Measured: at most 9e-6 (ResNet-50). A wrong
  index, window, scale factor or missing term shows up as 1e-3 to 1.
* 1e-4 for TEST's free-running data (measured: at most 2.2e-6).
* 1e-3 for TRAIN's free-running data: BatchNorm with batch statistics (49 values per channel in
  ResNet-50's last stage at batch 1) amplifies the difference of the two sides' rounding about
  twofold per stage; measured up to 2.4e-4 at res5c_branch2c, where minicaffe and PyTorch's float32
  are each 1.6e-4 from PyTorch's float64.

Exits 1 if any error exceeds its tolerance.
"""
import argparse
import collections
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from minicaffe import Net, TEST, TRAIN, prototxt  # noqa: E402
from torch_reference import build_torch_model, copy_weights  # noqa: E402

ZOO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prototxt")
NETS = ["lenet", "cifar10_quick", "cifar10_full", "resnet_fmnist", "alexnet", "caffenet", "googlenet", "vgg16",
        "resnet50"]
# The Fashion-MNIST nets scale pixels to [0, 1]; the others take mean-subtracted 0-255 pixels.
IMAGE_STD = {"lenet": 1.0, "resnet_fmnist": 1.0}
DEFAULT_IMAGE_STD = 64.0
FREE_RUNNING_TOLERANCE = {TEST: 1e-4, TRAIN: 1e-3}
PER_LAYER_TOLERANCE = 1e-4
KINDS = ("data", "layer", "stat", "diff", "grad")

Row = collections.namedtuple("Row", "kind name shape error tolerance")


# -- preparing the nets ----------------------------------------------------------------------------

def zoo_param(name, kind):
    """The NetParameter of prototxt/<name>/<name>_<kind>.prototxt (train_val falls back to train_test)."""
    folder = os.path.join(ZOO, name)
    candidates = [f"{name}_{kind}.prototxt"] + ([f"{name}_train_test.prototxt"] if kind == "train_val" else [])
    for file in candidates:
        if os.path.exists(os.path.join(folder, file)):
            return prototxt.read_net(os.path.join(folder, file)).param
    raise FileNotFoundError(f"{folder} has no {kind} prototxt")


def deploy_image_shape(deploy):
    """(channels, height, width) of the deploy net's Input."""
    layer = next(layer for layer in deploy.layer if layer.type == "Input")
    return list(layer.input_param.shape[0].dim)[1:]


def class_count(param):
    """num_output of the InnerProduct whose top the first SoftmaxWithLoss scores."""
    loss = next(layer for layer in param.layer if layer.type == "SoftmaxWithLoss")
    producers = [layer for layer in param.layer if loss.bottom[0] in layer.top and layer.type == "InnerProduct"]
    return producers[-1].inner_product_param.num_output


def prepared_train(name, batch):
    """The train_val net with synthetic inputs at ``batch``, Dropout off and force_backward."""
    param = zoo_param(name, "train_val")
    image_shape = deploy_image_shape(zoo_param(name, "deploy"))
    classes = class_count(param)
    for layer in param.layer:
        if layer.type == "Data":
            layer.type = "DummyData"
            layer.ClearField("data_param")
            layer.ClearField("transform_param")
        if layer.type == "DummyData":
            fill = layer.dummy_data_param
            fill.Clear()
            fill.data_filler.add(type="gaussian", std=IMAGE_STD.get(name, DEFAULT_IMAGE_STD))
            fill.data_filler.add(type="uniform", min=0, max=classes - 0.01)
            fill.shape.add().dim.extend([batch] + image_shape)
            fill.shape.add().dim.append(batch)
        elif layer.type == "Dropout":
            layer.dropout_param.dropout_ratio = 0
    param.force_backward = True
    return param


def prepared_deploy(name, batch):
    param = zoo_param(name, "deploy")
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = batch
    return param


def perturb_weights(net, rng):
    """Perturbs constant-filled parameters and gives BatchNorm statistics values worth testing."""
    for layer in net.layers:
        if layer.type_name == "BatchNorm":
            mean, variance, factor = (blob.data for blob in layer.blobs)
            factor[...] = 2.5      # the sums are 2.5 x the estimates: the division is exercised
            mean[...] = rng.normal(0, 0.5, mean.shape) * factor
            variance[...] = rng.uniform(0.5, 2.0, variance.shape) * factor
            continue
        for blob in layer.blobs:
            if blob.count and np.all(blob.data == blob.data.flat[0]):
                blob.data[...] += rng.normal(0, 0.1, blob.shape)


# -- comparing -------------------------------------------------------------------------------------

def relative_error(mine, theirs):
    mine, theirs = np.asarray(mine, np.float64), np.asarray(theirs, np.float64)
    scale = max(np.abs(theirs).max(initial=0), np.abs(mine).max(initial=0))
    return 0.0 if scale == 0 else float(np.abs(mine - theirs).max() / scale)


def as_array(tensor, shape):
    """A tensor as an array of ``shape``; a gradient PyTorch never computed (None) as zeros."""
    return np.zeros(shape) if tensor is None else tensor.detach().numpy().reshape(shape)


def forward_layer_by_layer(net):
    """Runs the net forward one layer at a time; returns {(layer name, top index): a copy of its output}."""
    outputs = {}
    for i, (layer_name, tops) in enumerate(zip(net.layer_names, net.top_vecs)):
        net.forward_layers(i, i)
        for k, top in enumerate(tops):
            outputs[(layer_name, k)] = top.data.copy()
    return outputs


def backpropagated_inputs(net, input_names):
    """The inputs minicaffe computes a diff for (the image under force_backward; never labels)."""
    return {blob.name for bottoms, needs in zip(net.bottom_vecs, net.bottom_need_backward)
            for blob, need in zip(bottoms, needs) if need and blob.name in input_names}


def compare_net(net, rng, image_std=1.0):
    """[Row] of the minicaffe ``net`` against its PyTorch translation. Input layers get random images
    (DummyData layers fill their own); a TRAIN net runs backward too."""
    import torch
    training = net.phase == TRAIN
    module, input_names = build_torch_model(net)
    copy_weights(net, module)
    initial_state = {key: value.clone() for key, value in module.state_dict().items()}
    for layer in net.layers:
        if layer.type_name == "Input":
            for top in layer.param.top:
                net.blobs[top].data[...] = rng.normal(0, image_std, net.blobs[top].shape)
    mine = forward_layer_by_layer(net)
    if training:
        net.backward()
    inputs = {name: torch.from_numpy(net.blobs[name].data.copy()) for name in input_names}
    free_tolerance = FREE_RUNNING_TOLERANCE[net.phase]

    with torch.no_grad():
        free = module(**inputs)
    rows = [Row("data", n, b.shape, relative_error(b.data, as_array(free[n], b.shape)), free_tolerance)
            for n, b in net.blobs.items()]

    module.load_state_dict(initial_state)     # BatchNorm's running sums, before the free-running pass
    if training:
        for name in backpropagated_inputs(net, input_names):
            inputs[name].requires_grad_(True)
    produced, own = {}, {}
    with torch.set_grad_enabled(training):
        blobs = module(**inputs, produced=produced, forced_outputs=mine, own_outputs=own)
    rows += [Row("layer", f"{key[0]}[{key[1]}]", value.shape,
                 relative_error(value, as_array(own[key], value.shape)), PER_LAYER_TOLERANCE)
             for key, value in mine.items() if key in own]
    if not training:
        return rows
    for layer in net.layers:
        if layer.type_name == "BatchNorm":
            tensors = module.layer_tensors[layer.param.name]
            rows += [Row("stat", f"{layer.param.name}[{j}]", blob.shape,
                         relative_error(blob.data, as_array(tensor, blob.shape)), PER_LAYER_TOLERANCE)
                     for j, (blob, tensor) in enumerate(zip(layer.blobs, tensors))]

    module.loss(blobs).backward()
    rows += [Row("diff", n, b.shape, relative_error(b.diff, as_array(produced[n].grad, b.shape)), PER_LAYER_TOLERANCE)
             for n, b in net.blobs.items()]
    for layer_name, param_blobs in net.params.items():
        specs = net.layer_dict[layer_name].param.param
        for j, blob in enumerate(param_blobs):
            if j < len(specs) and specs[j].lr_mult == 0:
                continue
            grad = module.layer_tensors[layer_name][j].grad
            rows.append(Row("grad", f"{layer_name}[{j}]", blob.shape,
                            relative_error(blob.diff, as_array(grad, blob.shape)), PER_LAYER_TOLERANCE))
    return rows


def run_phase(name, phase, batch, rng):
    param = prepared_deploy(name, batch) if phase == TEST else prepared_train(name, batch)
    net = Net(param, phase=phase)
    perturb_weights(net, rng)
    return compare_net(net, rng, IMAGE_STD.get(name, DEFAULT_IMAGE_STD))


def print_table(name, phase, rows, full):
    print(f"\n== {name} ({phase}) ==")
    if full:
        print(f"  {'kind':5} {'blob / param':48} {'shape':22} {'rel. max error':>14}  tolerance")
        for row in rows:
            flag = "  FAIL" if row.error > row.tolerance else ""
            print(f"  {row.kind:5} {row.name:48} {str(tuple(row.shape)):22} {row.error:14.2e}  {row.tolerance:g}{flag}")
        return
    print(f"  {'kind':5} {'compared':>8}  {'max rel. error':>14}  {'tolerance':>9}  where")
    for kind in KINDS:
        selected = [row for row in rows if row.kind == kind]
        if selected:
            worst = max(selected, key=lambda row: row.error)
            print(f"  {kind:5} {len(selected):8d}  {worst.error:14.2e}  {worst.tolerance:9g}  "
                  f"{worst.name} {tuple(worst.shape)}")
    for row in rows:
        if row.error > row.tolerance:
            print(f"  FAIL {row.kind} {row.name} {tuple(row.shape)}: {row.error:.2e} > {row.tolerance:g}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", default=NETS, choices=NETS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="print every blob and parameter, not a summary")
    parser.add_argument("--json", help="also write every comparison to this file")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("compare_pytorch.py needs PyTorch (pip install torch)")
    torch.manual_seed(args.seed)
    results, failed = {}, False
    for name in args.nets:
        for phase in (TEST, TRAIN):
            phase_name = "TEST" if phase == TEST else "TRAIN"
            start = time.perf_counter()
            rows = run_phase(name, phase, args.batch, np.random.default_rng(args.seed))
            print_table(name, phase_name, rows, args.full)
            print(f"  ({time.perf_counter() - start:.1f} s)")
            failed |= any(row.error > row.tolerance for row in rows)
            results.setdefault(name, {})[phase_name] = [
                dict(row._asdict(), shape=list(row.shape)) for row in rows]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "seed": args.seed, "nets": results}, f, indent=1)
    print(f"\n{'FAILED' if failed else 'OK'} (error: max|minicaffe - torch| / max(|minicaffe|, |torch|) per blob)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
