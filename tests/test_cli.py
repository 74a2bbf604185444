"""The verbs end to end on a tiny net, and the one-line errors for bad input."""
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_tool

GLOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")


def tiny_files(tmp_path, source, extra_layers=""):
    net = tmp_path / "tiny.prototxt"
    net.write_text(f"""name: "tiny"
layer {{ name: "d" type: "Data" top: "data" top: "label" transform_param {{ scale: 0.0039 }}
        data_param {{ source: "{source}" batch_size: 10 backend: IDX shuffle: true }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
layer {{ name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param {{ num_output: 4 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
{extra_layers}""")
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f"""net: "{net}"
test_iter: 5
test_interval: 20
base_lr: 0.05
momentum: 0.9
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: 10
max_iter: 40
snapshot: 20
snapshot_prefix: "{tmp_path}/snap/tiny"
random_seed: 5
""")
    return net, solver


def assert_one_line_error(result, pattern):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip() and not GLOG_LINE.match(line)]
    assert len(errors) == 1, result.stderr
    assert re.search(pattern, errors[0]), errors[0]


def test_train_logs_like_caffe_and_snapshots(tmp_path, tiny_idx):
    net, solver = tiny_files(tmp_path, tiny_idx)
    result = run_tool("train", f"--solver={solver}")
    assert result.returncode == 0, result.stderr
    log = result.stderr
    assert re.search(r"Solving tiny", log)
    assert re.search(r"Iteration 10 \([\d.e+-]+ iter/s, [\d.e+-]+s/10 iters\), loss = [\d.]+", log)
    assert re.search(r"    Train net output #0: loss = [\d.]+ \(\* 1 = [\d.]+ loss\)", log)
    assert re.search(r"Iteration 10, lr = 0\.04", log)
    assert re.search(r"Iteration 20, Testing net \(#0\)", log)
    assert re.search(r"    Test net output #0: accuracy = [\d.]+", log)
    assert re.search(r"Snapshotting to binary proto file .*tiny_iter_20\.caffemodel", log)
    assert "Optimization Done." in log
    assert all(GLOG_LINE.match(line) for line in log.splitlines() if line.strip())
    assert (tmp_path / "snap" / "tiny_iter_40.caffemodel").exists()
    assert (tmp_path / "snap" / "tiny_iter_40.solverstate").exists()

    resumed = run_tool("train", f"-solver={solver}", f"--snapshot={tmp_path}/snap/tiny_iter_20.solverstate")
    assert resumed.returncode == 0, resumed.stderr
    assert "Iteration 30" in resumed.stderr and "Iteration 10 " not in resumed.stderr

    tested = run_tool("test", f"--model={net}", f"--weights={tmp_path}/snap/tiny_iter_40.caffemodel",
                      "--iterations=3")
    assert tested.returncode == 0, tested.stderr
    assert re.search(r"Batch 2, accuracy = [\d.]+", tested.stderr)
    assert re.search(r"\] accuracy = [\d.]+", tested.stderr)
    assert re.search(r"\] loss = [\d.]+ \(\* 1 = [\d.]+ loss\)", tested.stderr)


def test_time_prints_caffe_lines_and_json():
    model = REPO / "prototxt" / "cifar10_quick" / "cifar10_quick_train_test.prototxt"
    result = run_tool("time", f"--model={model}", "--iterations=2", "--json", "--threads=1")
    assert result.returncode == 0, result.stderr
    assert re.search(r"conv1\tforward: [\d.]+ ms\.", result.stderr)
    assert re.search(r"conv1\tbackward: [\d.]+ ms\.", result.stderr)
    assert re.search(r"Average Forward-Backward: [\d.]+ ms\.", result.stderr)
    report = json.loads(result.stdout)
    assert {"net", "batch", "iterations", "threads", "forward_ms", "backward_ms", "forward_backward_ms",
            "images_per_s", "layers"} <= set(report)
    assert report["batch"] == 100 and report["iterations"] == 2 and report["threads"] == 1
    assert [layer["name"] for layer in report["layers"]][:2] == ["cifar", "conv1"]
    assert {"name", "type", "forward_ms", "backward_ms"} <= set(report["layers"][1])
    # CIFAR-10 quick at batch 100 holds ~47 MiB of blobs, diffs and history: the net's own footprint
    # must cover them and stay well under the whole process's peak.
    assert report["blob_mb"] > 40
    assert report["blob_mb"] * 0.5 < report["net_rss_mb"] < report["peak_rss_mb"]
    assert re.search(r"Peak resident memory: [\d.]+ MiB, [\d.]+ MiB of it above the process", result.stderr)


def test_help_and_layers_verb():
    result = run_tool("train", "--help")
    assert result.returncode == 0 and "--solver" in result.stdout
    result = subprocess.run([sys.executable, "-m", "minicaffe.cli", "layers"], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0
    assert {"Convolution", "Data", "InnerProduct", "Pooling", "SoftmaxWithLoss"} <= set(result.stdout.split())


BAD_NETS = {
    "malformed": ('layer { name: "x" type: "ReLU" \n bottom: "a" top: ', r"bad\.prototxt:\d+:\d+: "),
    "unknown_field": ('layer { name: "x" type: "ReLU" bottomm: "a" }',
                      r"bad\.prototxt:1:\d+: unknown field 'bottomm'.*layer 'x'"),
    "unknown_type": ('layer { name: "x" type: "Convolutoin" top: "a" }',
                     r"bad\.prototxt:1: layer 'x' has unknown type 'Convolutoin'.*'Convolution'"),
    "missing_bottom": ('layer { name: "x" type: "ReLU" bottom: "a" top: "b" }',
                       r"bad\.prototxt:1: layer 'x' \(ReLU\): bottom 'a' is not produced"),
    "shape_mismatch": ('layer { name: "in" type: "Input" top: "a" top: "l" input_param { shape { dim: 2 dim: 3 } '
                       'shape { dim: 5 } } }\nlayer { name: "loss" type: "SoftmaxWithLoss" bottom: "a" '
                       'bottom: "l" top: "loss" }', r"bad\.prototxt:2: layer 'loss'"),
    "missing_data": ('layer { name: "d" type: "Data" top: "data" data_param { source: "/nonexistent/x-images-idx3" '
                     'batch_size: 2 backend: IDX } }', r"layer 'd'.*/nonexistent/x-images-idx3"),
}


@pytest.mark.parametrize("case", sorted(BAD_NETS))
def test_bad_nets_get_one_clear_line(tmp_path, case):
    text, pattern = BAD_NETS[case]
    bad = tmp_path / "bad.prototxt"
    bad.write_text(text)
    assert_one_line_error(run_tool("time", f"--model={bad}", "--iterations=1"), pattern)


def test_bad_weights_and_snapshot_paths_get_one_clear_line(tmp_path, tiny_idx):
    net, solver = tiny_files(tmp_path, tiny_idx)
    truncated = tmp_path / "truncated.caffemodel"
    model = run_tool("train", f"--solver={solver}")
    assert model.returncode == 0, model.stderr
    data = (tmp_path / "snap" / "tiny_iter_40.caffemodel").read_bytes()
    truncated.write_bytes(data[: len(data) - 100])
    assert_one_line_error(run_tool("test", f"--model={net}", f"--weights={truncated}"),
                          r"truncated\.caffemodel: truncated or corrupt")
    assert_one_line_error(run_tool("train", f"--solver={solver}", f"--snapshot={tmp_path}/nope.solverstate"),
                          r"--snapshot: .*nope\.solverstate: no such file")
    assert_one_line_error(run_tool("train", f"--solver={tmp_path}/missing_solver.prototxt"),
                          r"missing_solver\.prototxt")
