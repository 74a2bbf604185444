"""LeNet on a slice of Fashion-MNIST, and BVLC Caffe's own LeNet files run unchanged."""
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, SHARED_PROTOTXT, run_tool, write_idx
from minicaffe import prototxt
from minicaffe.data import datasets, idx
from minicaffe.errors import MinicaffeError
from minicaffe.proto import minicaffe_pb2 as pb
from minicaffe.solvers import get_solver


def fashion_mnist_or_skip():
    try:
        return datasets.find("fashion-mnist")
    except MinicaffeError:
        pytest.skip("Fashion-MNIST is not installed (tools/get_data fashion-mnist)")


@pytest.fixture(scope="module")
def fashion_slice(tmp_path_factory):
    """The first 2,000 training and 1,000 test images of Fashion-MNIST, as IDX files."""
    folder = fashion_mnist_or_skip()
    out = tmp_path_factory.mktemp("fashion_slice")
    for split, count in (("train", 2000), ("t10k", 1000)):
        images = idx.read_images(folder / f"{split}-images-idx3-ubyte.gz")[:count]
        labels = idx.read_labels(folder / f"{split}-labels-idx1-ubyte.gz")[:count]
        write_idx(out / f"{split}-images-idx3-ubyte.gz", images.reshape(count, 28, 28), 0x803)
        write_idx(out / f"{split}-labels-idx1-ubyte.gz", labels, 0x801)
    return out


def test_lenet_learns_on_a_fashion_mnist_slice(fashion_slice):
    net = prototxt.read_net_param(REPO / "prototxt" / "lenet" / "lenet_train_test.prototxt")
    for layer in net.layer:
        if layer.type == "Data":
            split = "train" if layer.include[0].phase == pb.TRAIN else "t10k"
            layer.data_param.source = str(fashion_slice / f"{split}-images-idx3-ubyte.gz")
    solver_param = prototxt.read_solver(REPO / "prototxt" / "lenet" / "lenet_solver.prototxt")
    solver_param.ClearField("net")
    solver_param.net_param.CopyFrom(net)
    solver_param.max_iter = 300
    solver_param.test_iter[0] = 10
    solver_param.test_interval = 300
    solver_param.snapshot = 0
    solver_param.snapshot_after_train = False
    solver = get_solver(solver_param)
    try:
        first_loss = solver.net.forward_layers()
        solver.step(300)
        scores = solver.test(0)
    finally:
        solver.close()
    assert first_loss > 2.0
    assert scores["loss"] < 0.9 and scores["accuracy"] > 0.65


@pytest.mark.skipif(not SHARED_PROTOTXT.is_dir(), reason="../shared/caffe-prototxt is not present")
def test_bvlc_lenet_files_train_unchanged_and_ctrl_c_snapshots(fashion_slice, tmp_path):
    examples = tmp_path / "examples" / "mnist"
    examples.mkdir(parents=True)
    for split, db in (("train", "mnist_train_lmdb"), ("t10k", "mnist_test_lmdb")):
        converted = run_tool("convert_mnist", fashion_slice / f"{split}-images-idx3-ubyte.gz",
                             fashion_slice / f"{split}-labels-idx1-ubyte.gz", examples / db, "--backend=lmdb")
        assert converted.returncode == 0, converted.stderr
    shutil.copy(SHARED_PROTOTXT / "mnist__lenet_train_test.prototxt", examples / "lenet_train_test.prototxt")
    process = subprocess.Popen([sys.executable, str(REPO / "tools" / "train"),
                                f"--solver={SHARED_PROTOTXT / 'mnist__lenet_solver.prototxt'}"],
                               cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    log = []
    deadline = time.monotonic() + 240
    for line in process.stderr:
        log.append(line)
        if "Iteration 200 " in line or time.monotonic() > deadline:
            process.send_signal(signal.SIGINT)
            break
    log.extend(process.stderr)
    assert process.wait(timeout=120) == 0, "".join(log)
    text = "".join(log)
    assert "Test net output #0: accuracy = " in text
    assert "Snapshotting to binary proto file examples/mnist/lenet_iter_" in text
    assert "Optimization stopped early." in text
    snapshots = sorted(examples.glob("lenet_iter_*.caffemodel"))
    assert snapshots and (examples / snapshots[0].name.replace(".caffemodel", ".solverstate")).exists()
    losses = [float(x) for x in re.findall(r"Iteration \d+ \(.*\), loss = ([\d.]+)", text)]
    assert losses[-1] < losses[0]
