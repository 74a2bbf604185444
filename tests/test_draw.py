"""Drawing nets (minicaffe.draw, tools/draw_net): dot text, the rendered image, and missing Graphviz."""
import re
import shutil

import pytest

from conftest import REPO, run_tool
from minicaffe import draw, prototxt
from minicaffe.proto import minicaffe_pb2 as pb

LENET = REPO / "prototxt" / "lenet" / "lenet_train_test.prototxt"
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")


def edges(text):
    return re.findall(r'^  "([^"]+)" -> "([^"]+)"', text, re.MULTILINE)


def node(text, node_id):
    match = re.search(rf'^  "{re.escape(node_id)}" \[(.*)\];$', text, re.MULTILINE)
    assert match, f"no node {node_id}"
    return match.group(1)


def test_lenet_dot_text_has_layers_blobs_and_edges():
    text = draw.dot_text(prototxt.read_net_param(LENET), rankdir="LR", phase=pb.TRAIN)
    assert text.startswith('digraph "LeNet" {\n  rankdir=LR;')
    assert 'shape="record"' in node(text, "conv1_Convolution") and 'fillcolor="#FF5050"' in node(text, "conv1_Convolution")
    assert 'label="conv1\\n(Convolution)\\nkernel size: 5\\nstride: 1\\npad: 0"' in node(text, "conv1_Convolution")
    assert 'pool type: MAX' in node(text, "pool1_Pooling")
    assert 'shape="octagon"' in node(text, "conv1_blob")
    assert edges(text) == [
        ("fashion_mnist_Data", "data_blob"), ("fashion_mnist_Data", "label_blob"),
        ("data_blob", "conv1_Convolution"), ("conv1_Convolution", "conv1_blob"),
        ("conv1_blob", "pool1_Pooling"), ("pool1_Pooling", "pool1_blob"),
        ("pool1_blob", "conv2_Convolution"), ("conv2_Convolution", "conv2_blob"),
        ("conv2_blob", "pool2_Pooling"), ("pool2_Pooling", "pool2_blob"),
        ("pool2_blob", "ip1_InnerProduct"), ("ip1_InnerProduct", "ip1_blob"),
        # The in-place ReLU reads and writes the one ip1 blob node.
        ("ip1_blob", "relu1_ReLU"), ("relu1_ReLU", "ip1_blob"),
        ("ip1_blob", "ip2_InnerProduct"), ("ip2_InnerProduct", "ip2_blob"),
        ("ip2_blob", "loss_SoftmaxWithLoss"), ("label_blob", "loss_SoftmaxWithLoss"),
        ("loss_SoftmaxWithLoss", "loss_blob"),
    ]
    assert 'fillcolor="#90EE90"' in node(text, "relu1_ReLU")
    assert '"fashion_mnist_Data" -> "data_blob" [label="Batch 64"]' in text
    assert '"conv2_Convolution" -> "conv2_blob" [label="50"]' in text
    assert "relu1_blob" not in text and "accuracy" not in text


def test_phases_and_rankdir():
    net = prototxt.read_net_param(LENET)
    everything = draw.dot_text(net, rankdir="TB")
    # Both data layers (TRAIN and TEST, one name) and the TEST-only accuracy are drawn.
    assert "fashion_mnist_Data_2" in everything and "accuracy_Accuracy" in everything
    assert "rankdir=TB" in everything and 'label="conv1 (Convolution) kernel size: 5' in everything
    test_only = draw.dot_text(net, phase=pb.TEST)
    assert '[label="Batch 100"]' in test_only and "Batch 64" not in test_only
    with pytest.raises(draw.DrawError, match="rankdir must be one of LR, TB, BT, RL"):
        draw.dot_text(net, rankdir="XY")


def test_names_with_quotes_are_escaped():
    net = pb.NetParameter(name='say "hi"')
    net.layer.add(name='a"b', type="Input", top=["x\\y"])
    text = draw.dot_text(net)
    assert 'digraph "say \\"hi\\""' in text and '"a\\"b_Input"' in text and 'label="x\\\\y"' in text


@needs_dot
def test_draw_net_writes_a_png(tmp_path):
    out = tmp_path / "lenet.png"
    result = run_tool("draw_net", LENET, out, "--rankdir", "TB", "--phase", "TRAIN")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = tmp_path / "lenet.svg"
    draw.draw_net_to_file(prototxt.read_net_param(LENET), svg)
    assert "<svg" in svg.read_text() and "conv1" in svg.read_text()


def test_missing_dot_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    result = run_tool("draw_net", LENET, tmp_path / "lenet.png")
    assert result.returncode == 1 and not (tmp_path / "lenet.png").exists()
    assert result.stderr.count("\n") == 1 and "install Graphviz" in result.stderr and "--dot-only" in result.stderr
    dot_only = run_tool("draw_net", LENET, tmp_path / "lenet.png", "--dot-only")
    assert dot_only.returncode == 0, dot_only.stderr
    assert (tmp_path / "lenet.dot").read_text().startswith('digraph "LeNet"')


def test_bad_prototxt_is_one_line(tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text('layer { name: "x" type: "ReLU" kernal: 1 }')
    result = run_tool("draw_net", bad, tmp_path / "out.png")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert re.search(r"bad\.prototxt:1:\d+: unknown field 'kernal'", result.stderr)
