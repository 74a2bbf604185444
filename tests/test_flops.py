"""FLOP and parameter counts (minicaffe/flops.py) against counts worked out by hand from layer shapes."""
import numpy as np
import pytest
from google.protobuf import text_format

from conftest import REPO, write_idx
from minicaffe import Net, TRAIN, prototxt
from minicaffe.flops import layer_costs, net_flops
from minicaffe.proto import minicaffe_pb2 as pb

SMALL_NET = """
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 2 dim: 4 dim: 8 dim: 8 } shape { dim: 2 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" %s
        convolution_param { num_output: 6 kernel_size: 3 group: 2 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

# The small net by hand, batch 2. conv: 4 -> 6 channels in 2 groups, 3x3 on 8x8 -> 6x6: each output
# sums 2 channels x 9 taps. pool: 6x3x3 outputs of 2x2 windows. ip: 54 inputs -> 5.
CONV_MACS = 2 * 6 * 6 * 6 * (2 * 9)
CONV_OUT = 2 * 6 * 6 * 6
POOL_OUT = 2 * 6 * 3 * 3
IP_MACS = 2 * 5 * 54


def small_net(conv_params=""):
    return Net(text_format.Parse(SMALL_NET % conv_params, pb.NetParameter()), phase=TRAIN)


def test_small_net_layer_by_layer():
    costs = {c.name: c for c in layer_costs(small_net())}
    assert (costs["in"].forward_flops, costs["in"].backward_flops) == (0, 0)
    # The input needs no gradient: conv's backward is the weight GEMM and the bias sum only.
    assert costs["conv"].forward_flops == 2 * CONV_MACS + CONV_OUT
    assert costs["conv"].backward_flops == 2 * CONV_MACS + CONV_OUT
    assert (costs["conv"].param_count, costs["conv"].param_bytes) == (6 * 2 * 9 + 6, 4 * (6 * 2 * 9 + 6))
    assert (costs["relu"].forward_flops, costs["relu"].backward_flops) == (CONV_OUT, CONV_OUT)
    assert (costs["pool"].forward_flops, costs["pool"].backward_flops) == (4 * POOL_OUT, 4 * POOL_OUT)
    # ip: forward GEMM + bias; backward data GEMM + weight GEMM + bias sum.
    assert costs["ip"].forward_flops == 2 * IP_MACS + 10
    assert costs["ip"].backward_flops == 4 * IP_MACS + 10
    assert costs["ip"].param_count == 5 * 54 + 5
    # The loss reads 2x5 scores (6 FLOPs each) and sends a gradient to the scores, not to the labels.
    assert (costs["loss"].forward_flops, costs["loss"].backward_flops) == (60, 10)

    total = net_flops(small_net())
    assert total.batch == 2
    assert total.forward_flops == sum(c.forward_flops for c in costs.values())
    assert total.backward_flops == sum(c.backward_flops for c in costs.values())
    assert total.total_flops == total.forward_flops + total.backward_flops
    assert total.param_count == 6 * 2 * 9 + 6 + 5 * 54 + 5


def test_frozen_parameters_skip_their_gradient_gemms():
    frozen_weight = {c.name: c for c in layer_costs(small_net('param { lr_mult: 0 } param { lr_mult: 1 }'))}
    assert frozen_weight["conv"].backward_flops == CONV_OUT
    frozen_all = {c.name: c for c in layer_costs(small_net('param { lr_mult: 0 } param { lr_mult: 0 }'))}
    assert frozen_all["conv"].backward_flops == 0
    assert frozen_all["conv"].forward_flops == 2 * CONV_MACS + CONV_OUT


@pytest.fixture
def fashion_28x28(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "tiny-images-idx3-ubyte.gz", rng.integers(0, 256, size=(8, 28, 28)), 0x803)
    write_idx(tmp_path / "tiny-labels-idx1-ubyte.gz", rng.integers(0, 10, size=8), 0x801)
    return tmp_path / "tiny-images-idx3-ubyte.gz"


def test_lenet_totals(fashion_28x28):
    param = prototxt.read_net_param(REPO / "prototxt" / "lenet" / "lenet_train_test.prototxt")
    for layer in param.layer:
        if layer.type == "Data":
            layer.data_param.batch_size = 4
            layer.data_param.source = str(fashion_28x28)
    net = Net(param, phase=TRAIN)
    try:
        cost = net_flops(net)
    finally:
        net.close()
    # Per image: conv1 20x24x24 outputs of 25 taps, conv2 50x8x8 of 20x25, ip1 500 of 800, ip2 10 of 500.
    conv1, conv2, ip1, ip2 = 20 * 24 * 24 * 25, 50 * 8 * 8 * 500, 500 * 800, 10 * 500
    biases = 20 * 24 * 24 + 50 * 8 * 8 + 500 + 10
    pools = 4 * (20 * 12 * 12 + 50 * 4 * 4)
    forward = 2 * (conv1 + conv2 + ip1 + ip2) + biases + pools + 500 + 6 * 10
    # conv1 has no data gradient (its bottom is the image); everything else has both GEMMs.
    backward = 2 * conv1 + 4 * (conv2 + ip1 + ip2) + biases + pools + 500 + 10
    assert cost.batch == 4
    assert cost.forward_flops == 4 * forward
    assert cost.backward_flops == 4 * backward
    assert cost.param_count == 20 * 25 + 20 + 50 * 500 + 50 + 800 * 500 + 500 + 500 * 10 + 10


def test_alexnet_forward_is_about_0_72_giga_multiply_adds_per_image():
    param = prototxt.read_net_param(REPO / "prototxt" / "alexnet" / "alexnet_train_val.prototxt")
    for layer in param.layer:
        for shape in layer.dummy_data_param.shape:
            shape.dim[0] = 1
    net = Net(param, phase=TRAIN)
    try:
        costs = {c.name: c for c in layer_costs(net)}
        cost = net_flops(net)
    finally:
        net.close()
    # conv1: 96 filters of 3x11x11 = 363 taps on 227x227 -> 55x55, plus the bias.
    assert costs["conv1"].forward_flops == 2 * 96 * 55 * 55 * 363 + 96 * 55 * 55
    # conv2 runs in 2 groups: each of its 256 outputs at 27x27 sums 48 channels x 5x5.
    assert costs["conv2"].forward_flops == 2 * 256 * 27 * 27 * 48 * 25 + 256 * 27 * 27
    assert costs["fc6"].forward_flops == 2 * 4096 * 9216 + 4096
    # Published: ~0.72 G multiply-adds per image with grouped convolutions, i.e. ~1.45 GFLOP.
    assert 1.44e9 < cost.forward_flops < 1.47e9
    assert cost.param_count == 60_965_224
