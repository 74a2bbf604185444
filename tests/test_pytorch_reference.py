"""AlexNet and ResNet-50 agree with PyTorch: benchmarks/torch_reference.py's translation of the same
graph, with the same weights and inputs (benchmarks/compare_pytorch.py explains what is compared and
the tolerances). Skipped where PyTorch is not installed.

A small net also runs the layer variants the zoo leaves out, where Caffe and PyTorch differ most:
padded AVE pooling (Caffe divides by the window clipped to the padded input), a last pooling window
dropped because it would start in the padding, dilated grouped convolution, LRN within a channel,
Eltwise PROD, MAX and SUM with coefficients, leaky ReLU, Concat, Bias and a weighted loss.
"""
import sys

import numpy as np
import pytest
from google.protobuf import text_format

from conftest import REPO
from minicaffe import Net, TEST, TRAIN
from minicaffe.proto import minicaffe_pb2 as pb

pytest.importorskip("torch")
sys.path.insert(0, str(REPO / "benchmarks"))
import compare_pytorch  # noqa: E402

VARIANTS = """
name: "variants"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { data_filler { type: "gaussian" std: 1 }
                     data_filler { type: "uniform" min: 0 max: 4.99 }
                     shape { dim: 2 dim: 4 dim: 7 dim: 7 } shape { dim: 2 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 dilation: 2 group: 2
                      weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "ave" type: "Pooling" bottom: "conv" top: "ave"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "max" type: "Pooling" bottom: "conv" top: "max"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "lrn_within" type: "LRN" bottom: "ave" top: "lrn_within"
  lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL } }
layer { name: "prod" type: "Eltwise" bottom: "lrn_within" bottom: "max" top: "prod"
  eltwise_param { operation: PROD } }
layer { name: "emax" type: "Eltwise" bottom: "prod" bottom: "ave" top: "emax"
  eltwise_param { operation: MAX } }
layer { name: "esum" type: "Eltwise" bottom: "emax" bottom: "max" top: "esum"
  eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "bn" type: "BatchNorm" bottom: "esum" top: "esum" }
layer { name: "scale" type: "Scale" bottom: "esum" top: "esum"
  scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 }
                bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "leaky" type: "ReLU" bottom: "esum" top: "esum" relu_param { negative_slope: 0.1 } }
layer { name: "cat" type: "Concat" bottom: "esum" bottom: "ave" top: "cat" }
layer { name: "lrn_across" type: "LRN" bottom: "cat" top: "lrn_across"
  lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "lrn_across" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.2 }
                        bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "bias" type: "Bias" bottom: "ip" top: "biased" bias_param { filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "biased" bottom: "label" top: "loss" loss_weight: 0.5 }
"""


def assert_within_tolerance(rows, kinds):
    assert {row.kind for row in rows} == set(kinds)
    failures = [f"{row.kind} {row.name} {tuple(row.shape)}: {row.error:.2e} > {row.tolerance:g}"
                for row in rows if row.error > row.tolerance]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", ["alexnet", "resnet50"])
def test_deploy_forward_matches_pytorch(name):
    rows = compare_pytorch.run_phase(name, TEST, 1, np.random.default_rng(0))
    assert_within_tolerance(rows, ["data", "layer"])


@pytest.mark.parametrize("name", ["alexnet", "resnet50"])
def test_train_forward_and_backward_match_pytorch(name):
    rows = compare_pytorch.run_phase(name, TRAIN, 1, np.random.default_rng(0))
    kinds = ["data", "layer", "diff", "grad"] + (["stat"] if name == "resnet50" else [])
    assert_within_tolerance(rows, kinds)
    # Every learnable parameter blob was compared (BatchNorm's statistics are not learned).
    compared_params = sum(1 for row in rows if row.kind == "grad")
    assert compared_params == {"alexnet": 16, "resnet50": 161}[name]


@pytest.mark.parametrize("phase", [TEST, TRAIN])
def test_layer_variants_match_pytorch(phase):
    net = Net(text_format.Parse(VARIANTS, pb.NetParameter()), phase=phase)
    assert net.blobs["max"].shape == (2, 6, 3, 3)      # the 4th window would start in the padding
    compare_pytorch.perturb_weights(net, np.random.default_rng(3))
    rows = compare_pytorch.compare_net(net, np.random.default_rng(4))
    assert_within_tolerance(rows, ["data", "layer"] + (["stat", "diff", "grad"] if phase == TRAIN else []))
