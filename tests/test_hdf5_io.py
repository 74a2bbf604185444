"""Caffe's HDF5 weights and solver-state files: round trips, the on-disk layout, atomic writes, errors."""
import os
import sys

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import hdf5_io
from minicaffe.errors import MinicaffeError
from minicaffe.hdf5_io import (is_hdf5_file, load_net_hdf5, load_solver_state_hdf5, save_net_hdf5,
                               save_solver_state_hdf5)
from minicaffe.net import Net
from minicaffe.proto import minicaffe_pb2 as pb

h5py = pytest.importorskip("h5py")

# conv and ip1 own their parameters; ip2 shares ip1's ("w", "b"); data feeds two layers (a Split).
NET = """
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 2 dim: 1 dim: 4 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: %(std)s }
                            bias_filler { type: "gaussian" std: %(std)s } } }
layer { name: "ip1" type: "InnerProduct" bottom: "conv" top: "ip1" param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: %(std)s }
                              bias_filler { type: "gaussian" std: %(std)s } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 8 } }
layer { name: "ip3" type: "InnerProduct" bottom: "data" top: "ip3" inner_product_param { num_output: 2 } }
"""


def make_net(std=1.0, text=NET):
    return Net(text_format.Parse(text % {"std": std}, pb.NetParameter()))


def test_weights_round_trip(tmp_path):
    source, target = make_net(1.0), make_net(0.01)
    path = tmp_path / "w.caffemodel.h5"
    save_net_hdf5(source, path)
    assert is_hdf5_file(path)
    load_net_hdf5(target, path)
    for name, blobs in source.params.items():
        for mine, theirs in zip(target.params[name], blobs):
            np.testing.assert_array_equal(mine.data, theirs.data)
    np.testing.assert_array_equal(target.params["ip2"][0].data, source.params["ip1"][0].data)  # still shared
    data = np.random.default_rng(0).standard_normal((2, 1, 4, 4))
    np.testing.assert_array_equal(target.forward(data=data)["ip2"], source.forward(data=data)["ip2"])


def test_layout_is_caffes(tmp_path):
    net = make_net()
    for blob in net.learnable_params:
        blob.diff[...] = np.random.default_rng(1).standard_normal(blob.shape)
    path = tmp_path / "w.h5"
    save_net_hdf5(net, path, write_diff=True)
    with h5py.File(path, "r") as f:
        assert set(f) == {"data", "diff"}
        # One group per layer, Split layers included, as Caffe's Net::ToHDF5 writes them.
        assert set(f["data"]) == set(net.layer_names) == set(f["diff"])
        assert any(name.endswith("_split") for name in net.layer_names)
        assert list(f["data/input"]) == [] and list(f["data/ip2"]) == []  # shared: only the owner writes
        assert sorted(f["diff/ip2"]) == ["0", "1"]  # diffs are written for shared parameters too
        for name in ("conv", "ip1", "ip3"):
            assert sorted(f["data"][name]) == ["0", "1"]
            for j, blob in enumerate(net.params[name]):
                dataset = f["data"][name][str(j)]
                assert dataset.dtype == np.float32 and dataset.shape == blob.shape
                np.testing.assert_array_equal(dataset[()], blob.data)
                np.testing.assert_array_equal(f["diff"][name][str(j)][()], blob.diff)
        assert f["data/conv/0"].shape == (2, 1, 3, 3) and f["data/conv/1"].shape == (2,)


def test_loads_a_file_written_as_caffe_writes_it(tmp_path):
    net = make_net()
    rng = np.random.default_rng(2)
    weights = {name: [rng.standard_normal(b.shape).astype(np.float32) for b in blobs]
               for name, blobs in net.params.items() if name != "ip2"}
    with h5py.File(tmp_path / "caffe.h5", "w") as f:
        for name, arrays in weights.items():
            for j, values in enumerate(arrays):
                f.create_dataset(f"data/{name}/{j}", data=values)
        f.create_dataset("data/not_in_net/0", data=np.zeros(3, np.float32))  # ignored, as in Caffe
        f.create_group("data/ip2")
    load_net_hdf5(net, tmp_path / "caffe.h5", require_all=True)
    for name, arrays in weights.items():
        for blob, values in zip(net.params[name], arrays):
            np.testing.assert_array_equal(blob.data, values)


def test_layer_names_with_slashes_round_trip(tmp_path):
    text = NET.replace('"conv"', '"block/conv"')
    source, target = make_net(1.0, text), make_net(0.01, text)
    save_net_hdf5(source, tmp_path / "w.h5")
    load_net_hdf5(target, tmp_path / "w.h5", require_all=True)
    np.testing.assert_array_equal(target.params["block/conv"][0].data, source.params["block/conv"][0].data)


def test_weight_errors(tmp_path):
    net = make_net()
    path = str(tmp_path / "w.h5")

    def error(**datasets):
        with h5py.File(path, "w") as f:
            for key, values in datasets.items():
                f.create_dataset(key.replace("__", "/"), data=values)
        with pytest.raises(MinicaffeError) as excinfo:
            load_net_hdf5(net, path, require_all=True)
        assert "\n" not in str(excinfo.value)
        return str(excinfo.value)

    conv = {"data__conv__0": np.zeros((2, 1, 3, 3)), "data__conv__1": np.zeros(2)}
    assert error(data__conv__0=np.zeros((2, 1, 5, 5)), data__conv__1=np.zeros(2)) == (
        f"{path}: layer 'conv' blob 0: shape mismatch, the file has (2, 1, 5, 5) and the net has (2, 1, 3, 3)")
    count_error = f"{path}: layer 'conv' has %d blobs in the file but 2 in the net"
    assert error(data__conv__0=np.zeros((2, 1, 3, 3))) == count_error % 1
    assert error(**conv, data__conv__2=np.zeros(2)) == count_error % 3
    assert error(**conv) == f"{path}: has no weights for layer(s) ip1, ip3"
    assert error(data__conv__0=np.array([b"x", b"y"]), data__conv__1=np.zeros(2)).endswith(
        "layer 'conv' blob 0: holds |S1 values, not numbers")
    assert error(other=np.zeros(1)) == f"{path}: not a Caffe HDF5 weights file (it has no group 'data')"
    net.save(tmp_path / "w.caffemodel")
    assert not is_hdf5_file(tmp_path / "w.caffemodel") and not is_hdf5_file(tmp_path / "none")
    with pytest.raises(MinicaffeError, match=r"w.caffemodel: cannot read it as an HDF5 weights \("):
        load_net_hdf5(net, tmp_path / "w.caffemodel")
    with pytest.raises(MinicaffeError, match=r"none.h5: no such file$"):
        load_net_hdf5(net, tmp_path / "none.h5")


def test_writes_are_atomic(tmp_path, monkeypatch):
    net = make_net()
    path = tmp_path / "w.h5"
    save_net_hdf5(net, path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h5py.Group, "create_dataset", fail)
    with pytest.raises(MinicaffeError, match=r"w.h5: cannot write \(No space left on device\)$"):
        save_net_hdf5(make_net(2.0), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.h5"]  # no temporary file left behind
    monkeypatch.undo()
    with pytest.raises(MinicaffeError, match=r"cannot write \("):
        save_net_hdf5(net, tmp_path / "no" / "such" / "dir.h5")


def test_solver_state_round_trip_and_layout(tmp_path):
    history = [np.random.default_rng(i).standard_normal(shape).astype(np.float32)
               for i, shape in enumerate([(2, 1, 3, 3), (2,), (8, 8)] + [(1,)] * 10)]
    state = {"iter": 1200, "learned_net": "snap/lenet_iter_1200.caffemodel.h5", "current_step": 2,
             "history": history}
    path = tmp_path / "s.solverstate.h5"
    save_solver_state_hdf5(state, path)
    loaded = load_solver_state_hdf5(path)
    assert (loaded["iter"], loaded["learned_net"], loaded["current_step"]) == (1200, state["learned_net"], 2)
    assert len(loaded["history"]) == len(history)
    for mine, theirs in zip(loaded["history"], history):  # "10" sorts after "9", not after "1"
        np.testing.assert_array_equal(mine, theirs)
    with h5py.File(path, "r") as f:
        assert set(f) == {"iter", "learned_net", "current_step", "history"}
        for name in ("iter", "current_step"):
            assert f[name].shape == () and f[name].dtype == np.int32
        # H5LTmake_dataset_string: a scalar, fixed-length, NUL-terminated C string.
        string_type = f["learned_net"].id.get_type()
        assert f["learned_net"].shape == () and string_type.get_size() == len(state["learned_net"]) + 1
        assert string_type.get_strpad() == h5py.h5t.STR_NULLTERM
        assert f["history/10"].dtype == np.float32 and f["history/0"].shape == (2, 1, 3, 3)


def test_solver_state_errors_and_missing_fields(tmp_path):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("iter", data=np.int32(5))
        f.create_dataset("history/0", data=np.zeros(2))
    assert load_solver_state_hdf5(path) == {"iter": 5, "learned_net": "", "current_step": 0,
                                            "history": [pytest.approx(np.zeros(2))]}
    with h5py.File(path, "a") as f:
        f.create_dataset("history/2", data=np.zeros(2))
    with pytest.raises(MinicaffeError, match=r"group 'history' must hold datasets 0, 1, \.\.\., got 0, 2$"):
        load_solver_state_hdf5(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("iteration", data=np.int32(5))
    with pytest.raises(MinicaffeError, match=r"not a Caffe HDF5 solver state \(it needs dataset 'iter' and"):
        load_solver_state_hdf5(path)


def test_missing_h5py_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(MinicaffeError) as excinfo:
        save_net_hdf5(make_net(), tmp_path / "w.h5")
    assert str(excinfo.value) == f"{tmp_path}/w.h5: writing HDF5 weights needs h5py, which is not installed: " \
                                 "pip install h5py"
    with pytest.raises(MinicaffeError, match="reading an HDF5 solver state needs h5py"):
        hdf5_io.load_solver_state_hdf5(tmp_path / "s.h5")
