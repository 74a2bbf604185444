"""HDF5 snapshots through the solver, Net(prototxt, weights.h5) and pycaffe's set_input_arrays."""
import numpy as np
import h5py
from google.protobuf import text_format

from minicaffe.net import Net
from minicaffe.proto import minicaffe_pb2 as pb
from test_solver import tiny_solver


def test_hdf5_snapshot_then_resume_equals_an_uninterrupted_run(tiny_idx, tmp_path):
    prefix = str(tmp_path / "snap" / "tiny")
    uninterrupted = tiny_solver(tiny_idx, prefix)
    uninterrupted.solve()
    first = tiny_solver(tiny_idx, prefix, snapshot=6, snapshot_format=pb.SolverParameter.HDF5)
    first.step(6)
    first.close()
    with h5py.File(f"{prefix}_iter_6.solverstate.h5", "r") as f:
        assert f["learned_net"][()].decode() == f"{prefix}_iter_6.caffemodel.h5"
    resumed = tiny_solver(tiny_idx, prefix)
    resumed.solve(f"{prefix}_iter_6.solverstate.h5")
    assert resumed.iter == uninterrupted.iter == 14
    for a, b in zip(uninterrupted.net.learnable_params, resumed.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)
    for s in (uninterrupted, resumed):
        s.close()


def test_net_weights_argument_and_set_input_arrays(tmp_path):
    text = ('layer { name: "mem" type: "MemoryData" top: "data" top: "label" '
            'memory_data_param { batch_size: 2 channels: 1 height: 1 width: 3 } } '
            'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
            'inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }')
    net = Net(text_format.Parse(text, pb.NetParameter()))
    net.save(tmp_path / "w.caffemodel.h5")
    other = Net(text_format.Parse(text, pb.NetParameter()), str(tmp_path / "w.caffemodel.h5"))
    np.testing.assert_array_equal(other.params["ip"][0].data, net.params["ip"][0].data)
    other.set_input_arrays(np.ones((2, 1, 1, 3), np.float32), np.zeros(2, np.float32))
    np.testing.assert_allclose(other.forward()["ip"], np.ones((2, 3)) @ net.params["ip"][0].data.T, rtol=1e-6)
