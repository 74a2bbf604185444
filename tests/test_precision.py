"""Reduced precision as a setting: inheritance, the first-Convolution / last-InnerProduct rule, the
solver field and the --precision override, statistics output, and short training runs whose loss
follows the FP32 run's."""
import json

import numpy as np
import pytest
from google.protobuf import text_format

from conftest import REPO, run_tool
from minicaffe import rng
from minicaffe.net import Net
from minicaffe.proto import minicaffe_pb2 as pb
from minicaffe.solvers import get_solver

FILL = 'weight_filler { type: "xavier" } bias_filler { type: "constant" }'
NET = """
name: "small"
{precision}
layer {{ name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param {{ shape {{ dim: 4 dim: 2 dim: 10 dim: 10 }} shape {{ dim: 4 }}
                      data_filler {{ type: "gaussian" }} data_filler {{ type: "constant" value: 1 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1" {conv1}
  convolution_param {{ num_output: 4 kernel_size: 3 {fill} }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" {conv2}
  convolution_param {{ num_output: 4 kernel_size: 3 group: 2 {fill} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "conv2" top: "ip1" {ip1}
  inner_product_param {{ num_output: 8 {fill} }} }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" {ip2}
  inner_product_param {{ num_output: 3 {fill} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""


def net_param(precision="", conv1="", conv2="", ip1="", ip2=""):
    text = NET.format(fill=FILL, precision=precision, conv1=conv1, conv2=conv2, ip1=ip1, ip2=ip2)
    return text_format.Parse(text, pb.NetParameter())


def precisions(net):
    return {name: layer.precision.name for name, layer in net.layer_dict.items() if hasattr(layer, "precision")}


def test_default_is_fp32_everywhere():
    assert set(precisions(Net(net_param(), phase=pb.TRAIN)).values()) == {"FP32"}


def test_net_precision_is_inherited_except_first_conv_and_last_inner_product():
    net = Net(net_param("precision: DFP16"), phase=pb.TRAIN)
    assert precisions(net) == {"conv1": "FP32", "conv2": "DFP16", "ip1": "DFP16", "ip2": "FP32"}
    assert net.layer_dict["conv2"].lowp is not None and net.layer_dict["conv1"].lowp is None


def test_layer_setting_wins_over_net_and_over_the_first_last_rule():
    net = Net(net_param("precision: BF16", conv1="precision: DFP16", ip1="precision: FP32",
                        ip2="precision: BF16"), phase=pb.TRAIN)
    assert precisions(net) == {"conv1": "DFP16", "conv2": "BF16", "ip1": "FP32", "ip2": "BF16"}


def test_precision_argument_replaces_the_net_default_only():
    param = net_param("precision: BF16", ip1="precision: FP32")
    net = Net(param, phase=pb.TRAIN, precision="dfp16")
    assert precisions(net) == {"conv1": "FP32", "conv2": "DFP16", "ip1": "FP32", "ip2": "FP32"}
    assert set(precisions(Net(param, phase=pb.TRAIN, precision="FP32")).values()) == {"FP32"}


def test_unknown_precision_name_is_a_clear_error():
    from minicaffe.errors import MinicaffeError
    with pytest.raises(MinicaffeError, match="net 'small': unknown precision 'fp8'"):
        Net(net_param(), phase=pb.TRAIN, precision="fp8")


def test_precision_options_merge_net_then_layer():
    param = net_param("precision: DFP16 precision_param { k_chunk: 64 stochastic_rounding: true }",
                      conv2="precision_param { k_chunk: 9 }")
    net = Net(param, phase=pb.TRAIN)
    conv2, ip1 = net.layer_dict["conv2"].precision, net.layer_dict["ip1"].precision
    assert (conv2.options.k_chunk, conv2.options.stochastic_rounding) == (9, True)
    assert (ip1.options.k_chunk, ip1.k_chunk()) == (64, 64)
    # The default chunk is 256 input channels times the kernel area.
    assert Net(net_param("precision: DFP16"), phase=pb.TRAIN).layer_dict["conv2"].precision.k_chunk(9) == 256 * 9


def test_solver_precision_reaches_train_and_test_nets():
    solver_param = pb.SolverParameter(base_lr=0.01, max_iter=2, lr_policy="fixed", test_iter=[1],
                                      test_interval=100, precision=pb.BF16, random_seed=3)
    solver_param.net_param.CopyFrom(net_param("precision: DFP16"))
    solver = get_solver(solver_param)
    try:
        expected = {"conv1": "FP32", "conv2": "BF16", "ip1": "BF16", "ip2": "FP32"}
        assert precisions(solver.net) == expected
        assert precisions(solver.test_nets[0]) == expected
    finally:
        solver.close()


@pytest.fixture
def small_solver(tmp_path):
    (tmp_path / "net.prototxt").write_text(text_format.MessageToString(net_param()))
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.01 lr_policy: "fixed" max_iter: 4 display: 2 random_seed: 5 '
        'snapshot_after_train: false')
    return tmp_path


def test_train_precision_flag_and_debug_info_print_statistics(small_solver):
    result = run_tool("train", f"--solver={small_solver / 'solver.prototxt'}", "--precision=dfp16",
                      "--debug_info", cwd=small_solver)
    assert result.returncode == 0, result.stderr
    stats = [line for line in result.stderr.splitlines() if "[precision]" in line]
    assert any("conv2 DFP16: input: e=" in line and "clipped" in line and "overflow-chunk events" in line
               for line in stats), result.stderr
    assert not any("conv1" in line for line in stats)


def test_time_precision_flag(small_solver):
    result = run_tool("time", f"--model={small_solver / 'net.prototxt'}", "--iterations=2", "--json",
                      "--precision=BF16", "--debug_info")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["precision"] == "BF16"
    assert "[precision] ip1 BF16" in result.stderr
    bad = run_tool("time", f"--model={small_solver / 'net.prototxt'}", "--precision=FP8")
    assert bad.returncode != 0 and "FP8" in bad.stderr


def test_nan_during_training_names_layer_and_blob(small_solver):
    param = net_param("precision: DFP16")
    param.layer[0].dummy_data_param.data_filler[0].type = "constant"
    param.layer[0].dummy_data_param.data_filler[0].value = float("inf")
    (small_solver / "net.prototxt").write_text(text_format.MessageToString(param))
    result = run_tool("train", f"--solver={small_solver / 'solver.prototxt'}", cwd=small_solver)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "layer 'conv2' (Convolution): bottom blob 'conv1' holds inf or NaN" in result.stderr


# -- training follows FP32 ---------------------------------------------------------------------------

def fashion_mnist_available():
    from minicaffe.data import datasets
    try:
        datasets.resolve_reference("fashion-mnist:train")
        return True
    except Exception:
        return False


def train_lenet(precision, iterations=300):
    solver_param = text_format.Parse((REPO / "prototxt/lenet/lenet_solver.prototxt").read_text(),
                                     pb.SolverParameter())
    solver_param.net = str(REPO / "prototxt/lenet/lenet_train_test.prototxt")
    solver_param.max_iter = iterations
    solver_param.test_interval = 0
    solver_param.display = 0
    solver_param.average_loss = 50
    solver_param.snapshot = 0
    solver_param.snapshot_after_train = False
    solver_param.precision = pb.Precision.Value(precision)
    solver = get_solver(solver_param)
    try:
        solver.step(iterations)
        return solver.smoothed_loss
    finally:
        solver.close()


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST is not installed (tools/get_data)")
def test_short_lenet_training_follows_fp32():
    """300 iterations of Caffe's LeNet solver: the mean loss of the last 50 iterations in DFP16 and BF16
    is within 0.03 of FP32's (the FP32 loss itself falls from 2.3 to about 0.49 by then; measured: FP32
    0.4881, DFP16 0.4870, BF16 0.4878)."""
    fp32 = train_lenet("FP32")
    assert fp32 < 0.8
    for precision in ("DFP16", "BF16"):
        assert abs(train_lenet(precision) - fp32) < 0.03, precision


def test_two_bottoms_share_the_quantized_weights():
    """A Convolution with two bottoms gives each top what a single-bottom DFP16 layer gives it."""
    text = ('name: "c" type: "Convolution" precision: DFP16 convolution_param { num_output: 3 kernel_size: 3 '
            f'{FILL} }}')
    from minicaffe.blob import Blob
    from minicaffe.layer import create_layer
    data = [np.random.default_rng(i).standard_normal((2, 2, 6, 6)).astype(np.float32) for i in (1, 2)]
    rng.set_seed(0)
    pair = create_layer(text_format.Parse(text, pb.LayerParameter()), pb.TRAIN)
    bottoms, tops = [Blob((2, 2, 6, 6), name=f"x{i}") for i in (0, 1)], [Blob(name="y0"), Blob(name="y1")]
    for b, d in zip(bottoms, data):
        b.data[...] = d
    pair.layer_setup(bottoms, tops)
    pair.forward(bottoms, tops)
    for top, d in zip(tops, data):
        rng.set_seed(0)
        single = create_layer(text_format.Parse(text, pb.LayerParameter()), pb.TRAIN)
        b, t = Blob(d.shape, name="x"), Blob(name="y")
        b.data[...] = d
        single.layer_setup([b], [t])
        single.forward([b], [t])
        np.testing.assert_array_equal(top.data, t.data)


# -- tools/reproduce ---------------------------------------------------------------------------------

def test_reproduce_schedule_scales_steps_and_tests():
    from minicaffe.reproduce import schedule
    full = pb.SolverParameter(max_iter=7000, stepvalue=[3500, 5250], test_interval=1000)
    short = schedule(full, 1400, test_points=10)
    assert (short.max_iter, list(short.stepvalue), short.test_interval) == (1400, [700, 1050], 140)
    assert schedule(pb.SolverParameter(max_iter=100, stepsize=40, test_interval=10), 50, 2).stepsize == 20


def test_reproduce_splices_results_between_markers(tmp_path):
    from minicaffe.reproduce import update_results
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nearlier text\n")
    update_results("table one\n", "dfp16", "DFP16", results)
    update_results("table two\n", "dfp16", "DFP16", results)
    text = results.read_text()
    assert "earlier text" in text and "table two" in text and "table one" not in text
    assert text.count("<!-- reproduce dfp16 begin -->") == 1


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST is not installed (tools/get_data)")
def test_reproduce_tool_writes_table_and_curves(tmp_path):
    result = run_tool("reproduce", "both", "--nets", "lenet", "--iterations", "2", "--test-points", "1",
                      "--out", tmp_path / "out", "--update-results", "--results-file", tmp_path / "RESULTS.md")
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "out" / "results.md").read_text()
    assert "shortened schedule, 2 of the solver's 10000 iterations" in table
    rows = [line for line in table.splitlines() if line.startswith("| lenet |")]
    assert [row.split("|")[3].strip() for row in rows] == ["FP32", "DFP16", "BF16"]
    curves = json.loads((tmp_path / "out" / "curves.json").read_text())
    assert curves["lenet"]["DFP16"][0]["curve"][-1]["iteration"] == 2
    assert "<!-- reproduce both begin -->" in (tmp_path / "RESULTS.md").read_text()
