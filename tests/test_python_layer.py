"""The Python layer: user layers from tests/python_layers/example_python_layers.py inside nets built from
prototxt text, trained with the SGD solver and the train verb, checked by finite differences, and the
errors users meet."""
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import minicaffe
from conftest import run_tool
from gradient_check import check_gradient, make_bottoms, setup_layer
from minicaffe.errors import LayerError, MinicaffeError
from minicaffe.layer import create_layer
from minicaffe.blob import Blob
from minicaffe.layers.python_layer import ParamBlobs
from minicaffe.proto import minicaffe_pb2 as pb

USER_LAYERS = Path(__file__).parent / "python_layers"
MODULE = "example_python_layers"
N, D, K = 8, 5, 3


@pytest.fixture
def user_module_path(monkeypatch):
    """Puts the user's module folder on sys.path, as PYTHONPATH does for pycaffe."""
    monkeypatch.syspath_prepend(str(USER_LAYERS))


def python_layer(name, class_name, param_str="", module=MODULE):
    text = f'name: "{name}" type: "Python" python_param {{ module: "{module}" layer: "{class_name}" ' \
           f'param_str: "{param_str}" }}'
    return create_layer(text_format.Parse(text, pb.LayerParameter()), pb.TRAIN)


def regression_net(loss_layer):
    """Input -> InnerProduct -> Python ChannelScale -> ReLU -> ``loss_layer`` against a target."""
    return f"""
    name: "regression"
    layer {{ name: "data" type: "Input" top: "data" top: "target"
             input_param {{ shape {{ dim: {N} dim: {D} }} shape {{ dim: {N} dim: {K} }} }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
             inner_product_param {{ num_output: {K} weight_filler {{ type: "gaussian" std: 0.3 }}
                                    bias_filler {{ type: "constant" value: 0.5 }} }} }}
    layer {{ name: "scale" type: "Python" bottom: "ip" top: "scaled"
             python_param {{ module: "{MODULE}" layer: "ChannelScaleLayer" param_str: "{{'init': 0.5}}" }} }}
    layer {{ name: "relu" type: "ReLU" bottom: "scaled" top: "scaled" }}
    {loss_layer}
    """


PYTHON_LOSS = f"""layer {{ name: "loss" type: "Python" bottom: "scaled" bottom: "target" top: "loss" loss_weight: 1
             python_param {{ module: "{MODULE}" layer: "EuclideanLossLayer" }} }}"""
BUILTIN_LOSS = 'layer { name: "loss" type: "EuclideanLoss" bottom: "scaled" bottom: "target" top: "loss" }'


def train(net_text, steps, seed=3):
    param = text_format.Parse(f"net_param {{ {net_text} }} base_lr: 0.2 momentum: 0.9 lr_policy: 'fixed' "
                              f"max_iter: 100 display: 0 random_seed: {seed}", pb.SolverParameter())
    solver = minicaffe.get_solver(param)
    rng = np.random.default_rng(0)
    solver.net.blobs["data"].data[...] = rng.standard_normal((N, D))
    solver.net.blobs["target"].data[...] = rng.uniform(0.5, 2.0, (N, K))
    losses = []
    for _ in range(steps):
        solver.step(1)
        losses.append(solver.smoothed_loss)
    return solver, losses


def test_python_layers_train_in_a_net_like_built_in_ones(user_module_path):
    solver, losses = train(regression_net(PYTHON_LOSS), 25)
    assert losses[-1] < 0.2 * losses[0]
    scale = solver.net.params["scale"][0].data
    assert scale.shape == (K,) and not np.allclose(scale, 0.5)
    # The same net with Caffe's built-in EuclideanLoss follows the same trajectory.
    _, builtin_losses = train(regression_net(BUILTIN_LOSS), 25)
    np.testing.assert_allclose(losses, builtin_losses, rtol=1e-4)


def test_loss_weight_scales_a_python_loss(user_module_path):
    weighted = PYTHON_LOSS.replace("loss_weight: 1", "loss_weight: 3")
    nets = [minicaffe.Net(text_format.Parse(regression_net(text), pb.NetParameter()), phase=pb.TRAIN)
            for text in (PYTHON_LOSS, weighted)]
    rng = np.random.default_rng(1)
    data, target = rng.standard_normal((N, D)), rng.uniform(0.5, 2.0, (N, K))
    for net in nets:
        net.params["ip"][0].data[...] = nets[0].params["ip"][0].data
        net.blobs["data"].data[...] = data
        net.blobs["target"].data[...] = target
    losses = [net.forward_layers() for net in nets]
    for net in nets:
        net.backward_layers()
    assert losses[1] == pytest.approx(3 * losses[0])
    np.testing.assert_allclose(nets[1].params["ip"][0].diff, 3 * nets[0].params["ip"][0].diff, rtol=1e-5)
    np.testing.assert_allclose(nets[1].params["scale"][0].diff, 3 * nets[0].params["scale"][0].diff, rtol=1e-5)


def test_python_layer_weights_round_trip_through_caffemodel(user_module_path, tmp_path):
    solver, _ = train(regression_net(PYTHON_LOSS), 3)
    solver.net.save(tmp_path / "trained.caffemodel")
    fresh = minicaffe.Net(text_format.Parse(regression_net(PYTHON_LOSS), pb.NetParameter()), phase=pb.TEST)
    assert np.all(fresh.params["scale"][0].data == 0.5)
    fresh.copy_from(str(tmp_path / "trained.caffemodel"))
    np.testing.assert_array_equal(fresh.params["scale"][0].data, solver.net.params["scale"][0].data)


def test_train_verb_finds_the_module_in_the_working_directory(tmp_path):
    shutil.copy(USER_LAYERS / f"{MODULE}.py", tmp_path)
    data = f"""layer {{ name: "data" type: "DummyData" top: "data" top: "target"
             dummy_data_param {{ shape {{ dim: {N} dim: {D} }} shape {{ dim: {N} dim: {K} }}
                                 data_filler {{ type: "gaussian" std: 1 }} data_filler {{ type: "constant" value: 1 }} }} }}"""
    net = regression_net(PYTHON_LOSS)
    net = net[:net.index("layer {")] + data + net[net.index('layer { name: "ip"'):]
    (tmp_path / "net.prototxt").write_text(net)
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt" base_lr: 0.05 lr_policy: "fixed" max_iter: 4 '
                                              'display: 2 snapshot_after_train: false random_seed: 1')
    result = run_tool("train", "--solver=solver.prototxt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Iteration 2" in result.stderr and "Optimization Done." in result.stderr

    (tmp_path / "net.prototxt").write_text(net.replace("ChannelScaleLayer", "ChannelScale"))
    result = run_tool("train", "--solver=solver.prototxt", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "layer 'scale' (Python): module 'example_python_layers'" in result.stderr
    assert "has no class 'ChannelScale'; did you mean 'ChannelScaleLayer'" in result.stderr


def test_user_layer_sees_param_str_phase_and_its_blobs(user_module_path):
    net = minicaffe.Net(text_format.Parse(regression_net(PYTHON_LOSS), pb.NetParameter()), phase=pb.TEST)
    scale = net.layer_dict["scale"]
    assert scale.user_layer.param_str == "{'init': 0.5}"
    assert scale.user_layer.phase == minicaffe.TEST
    assert net.params["scale"] is scale.blobs and isinstance(scale.blobs[0], Blob)
    assert scale.blobs[0].data is not None and np.all(scale.blobs[0].data == 0.5)
    # As in pycaffe, the user's own attributes are reachable through the net's layer.
    assert net.layer_dict["loss"].difference.shape == (N, K)
    out = net.forward(data=np.ones((N, D)), target=np.ones((N, K)))
    assert out["loss"].shape == (1,)


def test_gradient_through_python_layers(user_module_path):
    scale = python_layer("scale", "ChannelScaleLayer", "{'init': 1.5}")
    bottoms = make_bottoms([(2, 3, 2, 2)])
    tops = setup_layer(scale, bottoms, 1)
    scale.blobs[0].data[...] = [0.5, -1.0, 2.0]
    check_gradient(scale, bottoms, tops)                 # bottom and the learnable scale

    loss = python_layer("loss", "EuclideanLossLayer")
    bottoms = make_bottoms([(4, 3), (4, 3)])
    tops = setup_layer(loss, bottoms, 1)
    check_gradient(loss, bottoms, tops)
    np.testing.assert_allclose(float(tops[0].data[0]),
                               np.sum((bottoms[0].data - bottoms[1].data) ** 2) / 4 / 2, rtol=1e-12)


def test_class_without_layer_base_but_with_the_four_methods(user_module_path):
    layer = python_layer("double", "Doubler")
    bottoms = make_bottoms([(2, 3)])
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    np.testing.assert_array_equal(tops[0].data, 2 * bottoms[0].data)
    check_gradient(layer, bottoms, tops)


def test_module_found_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "module_in_cwd.py").write_text(
        "import minicaffe as caffe\n"
        "class Negate(caffe.Layer):\n"
        "    def reshape(self, bottom, top):\n"
        "        top[0].reshape(bottom[0].num, bottom[0].channels)\n"
        "    def forward(self, bottom, top):\n"
        "        top[0].data[...] = -bottom[0].data\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "module_in_cwd", raising=False)
    layer = python_layer("neg", "Negate", module="module_in_cwd")
    bottoms = make_bottoms([(2, 3)])
    tops = setup_layer(layer, bottoms, 1)
    layer.forward(bottoms, tops)
    np.testing.assert_array_equal(tops[0].data, -bottoms[0].data)
    assert str(tmp_path) not in sys.path


def test_add_blob_takes_pycaffe_shape_forms():
    blobs = ParamBlobs()
    blobs.add_blob(2, 3)
    blobs.add_blob((4, 5))
    blobs.add_blob(np.int64(6))
    assert [b.shape for b in blobs] == [(2, 3), (4, 5), (6,)]
    assert all(isinstance(b, Blob) for b in blobs)


@pytest.mark.parametrize("module,class_name,param_str,message", [
    ("no_such_module_xyz", "Layer", "",
     r"layer 'py' \(Python\): python_param.module 'no_such_module_xyz' not found in the current directory "
     r"\(.*\) or on sys.path; add its folder to PYTHONPATH"),
    (MODULE, "EuclideanLos", "",
     r"layer 'py' \(Python\): module 'example_python_layers' \(.*example_python_layers.py\) has no class "
     r"'EuclideanLos'; did you mean 'EuclideanLossLayer'"),
    (MODULE, "ChannelScaleLayer", "{'scale': 2}",
     r"layer 'py' \(Python\): python_param module 'example_python_layers' layer 'ChannelScaleLayer': setup\(\) "
     r"failed: ValueError: param_str must be a dict with an 'init' value, got \"\{'scale': 2\}\" "
     r"\(at example_python_layers.py:\d+\)"),
    (MODULE, "NotALayer", "",
     r"layer 'NotALayer': the class does not define setup\(\), reshape\(\), forward\(\), backward\(\)"),
    (MODULE, "NoForward", "", r"layer 'NoForward': the class does not define forward\(\)"),
    (MODULE, "helper_function", "", r"'helper_function' is a builtin_function_or_method, not a class"),
])
def test_python_layer_errors(user_module_path, module, class_name, param_str, message):
    layer = python_layer("py", class_name, param_str, module)
    with pytest.raises(LayerError, match=message) as info:
        setup_layer(layer, make_bottoms([(2, 3, 1, 1)]), 1)
    assert "\n" not in str(info.value)


def test_user_self_error_names_the_python_layer(user_module_path):
    layer = python_layer("flat", "ChannelScaleLayer", "{'init': 1}")
    with pytest.raises(LayerError, match=r"^layer 'flat' \(Python\): needs a channel axis, got a bottom of "
                                         r"shape \(4,\)$"):
        setup_layer(layer, make_bottoms([(4,)]), 1)


def test_class_attribute_is_loss_gives_loss_weight_one(user_module_path):
    text = f"""
    layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ dim: 2 dim: 3 }} }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param {{ num_output: 2 }} }}
    layer {{ name: "loss" type: "Python" bottom: "y" top: "loss"
             python_param {{ module: "{MODULE}" layer: "MeanLoss" }} }}
    """
    net = minicaffe.Net(text_format.Parse(text, pb.NetParameter()), phase=pb.TRAIN)
    assert [w for _, w in net.loss_terms] == [1.0]
    net.blobs["x"].data[...] = 1.0
    net.forward_layers()
    net.backward_layers()
    np.testing.assert_allclose(net.params["ip"][1].diff, [0.5, 0.5])


def test_exception_in_forward_names_method_and_line(user_module_path):
    layer = python_layer("fails", "ForwardFails")
    bottoms = make_bottoms([(2, 3)])
    tops = setup_layer(layer, bottoms, 1)
    assert tops[0].shape == (2, 3, 1, 1)
    with pytest.raises(LayerError, match=r"layer 'fails' \(Python\): python_param module 'example_python_layers' "
                                         r"layer 'ForwardFails': forward\(\) failed: KeyError: 'missing key' "
                                         r"\(at example_python_layers.py:\d+\)"):
        layer.forward(bottoms, tops)


def test_error_while_importing_the_module_is_reported(tmp_path, monkeypatch):
    (tmp_path / "broken_import_xyz.py").write_text("import numpy\nimport not_installed_dependency_xyz\n")
    (tmp_path / "broken_syntax_xyz.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(LayerError, match=r"importing python_param.module 'broken_import_xyz' failed: "
                                         r"ModuleNotFoundError: No module named 'not_installed_dependency_xyz'"):
        setup_layer(python_layer("py", "L", module="broken_import_xyz"), make_bottoms([(2,)]), 1)
    with pytest.raises(LayerError, match=r"importing python_param.module 'broken_syntax_xyz' failed: "
                                         r"SyntaxError: .* \(at broken_syntax_xyz.py:1\)"):
        setup_layer(python_layer("py", "L", module="broken_syntax_xyz"), make_bottoms([(2,)]), 1)


def test_missing_python_param_and_net_error_location(user_module_path, tmp_path):
    with pytest.raises(LayerError, match=r"needs python_param \{ module"):
        setup_layer(create_layer(text_format.Parse('name: "p" type: "Python"', pb.LayerParameter()), pb.TRAIN),
                    make_bottoms([(2,)]), 1)
    path = tmp_path / "net.prototxt"
    path.write_text(regression_net(PYTHON_LOSS).replace("{'init': 0.5}", "oops"))
    with pytest.raises(MinicaffeError, match=r"net.prototxt:\d+: layer 'scale' \(Python\): .*setup\(\) failed: "
                                             r"ValueError: malformed node or string"):
        minicaffe.Net(str(path), phase=pb.TRAIN)
