"""minicaffe.prototxt: parsing and writing protos, and the one-line errors for bad files."""

import os
import stat

import numpy as np
import pytest

from minicaffe import prototxt
from minicaffe.errors import PrototxtError
from minicaffe.proto import minicaffe_pb2 as pb

NET_TEXT = """\
name: "tiny"
# layer { in a comment is no layer
layer {
  name: "data"
  type: "Input"
  top: "data"
  input_param { shape { dim: 2 dim: 3 } }
}
layer: {
  name: "ip{1}"
  type: "InnerProduct"
  bottom: "data"
  top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } }
}
layer <
  name: "loss"
  type: "Softmax"
  bottom: "ip"
  top: "prob"
>
"""


def parse_error(text, message=None, filename="net.prototxt"):
    with pytest.raises(PrototxtError) as caught:
        prototxt.parse_text(text, message if message is not None else pb.NetParameter(),
                            filename)
    message_text = str(caught.value)
    assert "\n" not in message_text
    return message_text


# ---------------------------------------------------------------------------------------
# Text parsing
# ---------------------------------------------------------------------------------------

def test_parse_text_fills_the_message():
    net = prototxt.parse_text(NET_TEXT, pb.NetParameter())
    assert [layer.name for layer in net.layer] == ["data", "ip{1}", "loss"]
    assert net.layer[1].inner_product_param.num_output == 4
    assert list(net.layer[0].input_param.shape[0].dim) == [2, 3]


def test_format_text_round_trips():
    net = prototxt.parse_text(NET_TEXT, pb.NetParameter())
    net.layer[0].name = "données"  # non-ASCII stays readable
    text = prototxt.format_text(net)
    assert 'name: "données"' in text
    assert prototxt.parse_text(text, pb.NetParameter()) == net


def test_read_net_records_where_each_layer_starts(tmp_path):
    path = tmp_path / "tiny.prototxt"
    path.write_text(NET_TEXT)
    parsed = prototxt.read_net(path)
    assert parsed.path == str(path)
    assert parsed.layer_lines == [3, 9, 16]
    assert parsed.location(1) == f"{path}:9"
    assert prototxt.read_net_param(path) == parsed.param


def test_layer_lines_in_list_syntax(tmp_path):
    path = tmp_path / "list.prototxt"
    path.write_text('name: "n"\nlayer: [\n  { name: "a" },\n  { name: "b" }\n]\n'
                    'layer { name: "c" }\n')
    parsed = prototxt.read_net(path)
    assert [layer.name for layer in parsed.param.layer] == ["a", "b", "c"]
    assert parsed.layer_lines == [3, 4, 6]


def test_read_solver(tmp_path):
    path = tmp_path / "solver.prototxt"
    path.write_text('net: "train.prototxt"\nbase_lr: 0.01\nlr_policy: "step"\n'
                    'solver_mode: CPU\nmax_iter: 100\n')
    solver = prototxt.read_solver(path)
    assert solver.net == "train.prototxt"
    assert solver.base_lr == pytest.approx(0.01)
    assert solver.solver_mode == pb.SolverParameter.CPU


# ---------------------------------------------------------------------------------------
# Text errors
# ---------------------------------------------------------------------------------------

def test_syntax_error_gives_file_line_and_column():
    text = 'name: "n"\nlayer {\n  name: "a"\n  top "x"\n}\n'
    assert parse_error(text) == "net.prototxt:4:7: expected \":\" (layer 'a')"


def test_stray_punctuation_gives_line_and_column():
    text = 'name: "n"\r\nlayer {\r\n  name: "a"\r\n  top: "x";;\r\n}\r\n'
    assert parse_error(text) == "net.prototxt:4:12: expected identifier or number, got ; " \
                                "(layer 'a')"


def test_unknown_field_names_field_message_and_layer():
    text = 'name: "n"\nlayer {\n  name: "conv1"\n  type: "Convolution"\n  foo: 3\n}\n'
    assert parse_error(text) == "net.prototxt:5:3: unknown field 'foo' in LayerParameter " \
                                "(layer 'conv1')"


def test_unknown_nested_field_names_the_layer_even_when_named_later():
    text = ('layer { name: "data" type: "Input" }\n'
            'layer {\n  convolution_param { kernal_size: 3 }\n  name: "conv1"\n}\n')
    assert parse_error(text) == ("net.prototxt:3:23: unknown field 'kernal_size' in "
                                 "ConvolutionParameter (layer 'conv1')")


def test_unnamed_layer_is_named_by_position():
    text = 'layer { name: "a" }\nlayer { type: "ReLU" bogus: 1 }\n'
    assert parse_error(text) == "net.prototxt:2:22: unknown field 'bogus' in LayerParameter " \
                                "(layer #2)"


def test_error_outside_any_layer_names_no_layer():
    assert parse_error('name: "n"\nforce_backward: maybe\n') == \
        'net.prototxt:2:17: expected "true" or "false"'


def test_bad_enum_name_lists_the_allowed_values():
    text = 'layer {\n  name: "pool1"\n  pooling_param { pool: MAXIMUM }\n}\n'
    assert parse_error(text) == (
        "net.prototxt:3:25: bad value 'MAXIMUM' for 'pool' (PoolingParameter.PoolMethod is one "
        "of MAX, AVE, STOCHASTIC) (layer 'pool1')")


def test_bad_enum_number():
    text = 'layer { name: "p" pooling_param { pool: 7 } }'
    assert parse_error(text) == (
        "net.prototxt:1:41: bad value 7 for 'pool' (PoolingParameter.PoolMethod is one of "
        "MAX, AVE, STOCHASTIC) (layer 'p')")


def test_bad_enum_in_solver():
    message = parse_error("base_lr: 0.1\nsolver_mode: TPU\n", pb.SolverParameter(),
                          "solver.prototxt")
    assert message == ("solver.prototxt:2:14: bad value 'TPU' for 'solver_mode' "
                       "(SolverParameter.SolverMode is one of CPU, GPU)")


def test_v1_layers_format_is_named_with_the_upgrade_tool():
    text = 'name: "old"\nlayers {\n  name: "conv1"\n  type: CONVOLUTION\n}\n'
    message = parse_error(text)
    assert message.startswith("net.prototxt:2:1: ")
    assert "deprecated V1 format" in message
    assert "upgrade_net_proto_text" in message


def test_singular_field_given_twice():
    assert parse_error('layer { name: "a" name: "b" }') == (
        "net.prototxt:1:25: field 'name' of LayerParameter is given more than once (layer 'a')")


def test_unclosed_block_says_where_it_opened():
    text = 'name: "n"\nlayer {\n  name: "p"\n  convolution_param {\n    num_output: 3\n'
    assert parse_error(text) == ("net.prototxt:5:17: the file ends before the '}' closing the "
                                 "block opened on line 4 (layer 'p')")


def test_bad_number_and_out_of_range():
    assert parse_error('layer { name: "c" convolution_param { num_output: -3 } }') == \
        "net.prototxt:1:51: value out of range: -3 (layer 'c')"
    assert parse_error('name: "x"\ninput_dim: 1.5') == \
        "net.prototxt:2:12: couldn't parse integer: 1.5"


def test_missing_required_field_names_the_layer_and_line():
    text = 'layer { name: "a" }\nlayer {\n  name: "clip"\n  clip_param { min: 0 }\n}\n'
    assert parse_error(text) == \
        "net.prototxt:2: missing required field clip_param.max (layer 'clip')"


def test_unknown_field_in_solver_has_no_layer_context():
    assert parse_error("base_lr: 0.1\nlearning_rate: 3\n", pb.SolverParameter(), "s") == \
        "s:2:1: unknown field 'learning_rate' in SolverParameter"


# ---------------------------------------------------------------------------------------
# File errors
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("reader", [
    prototxt.read_net, prototxt.read_net_param, prototxt.read_solver,
    lambda path: prototxt.read_binary(path, pb.NetParameter()),
])
def test_missing_file(tmp_path, reader):
    path = tmp_path / "absent.prototxt"
    with pytest.raises(PrototxtError) as caught:
        reader(path)
    assert str(caught.value) == f"{path}: no such file"


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(PrototxtError, match=r": is a directory, not a file$"):
        prototxt.read_net(tmp_path)


def test_binary_file_given_as_prototxt(tmp_path):
    path = tmp_path / "weights.prototxt"
    path.write_bytes(b"\x0a\x04tiny\xa2\x06\xff\xfe")
    with pytest.raises(PrototxtError) as caught:
        prototxt.read_net(path)
    assert str(caught.value) == f"{path}: not a text prototxt (byte 6 is not UTF-8)"


def test_read_net_error_names_the_file(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('layer {\n  name: "x"\n  tpye: "ReLU"\n}\n')
    with pytest.raises(PrototxtError) as caught:
        prototxt.read_net(path)
    assert str(caught.value) == f"{path}:3:3: unknown field 'tpye' in LayerParameter (layer 'x')"


# ---------------------------------------------------------------------------------------
# Binary files
# ---------------------------------------------------------------------------------------

def caffemodel_like_net():
    """A NetParameter as Caffe writes weights: layers carrying float blobs."""
    rng = np.random.default_rng(0)
    net = pb.NetParameter(name="lenet-ish")
    conv = net.layer.add(name="conv1", type="Convolution", bottom=["data"], top=["conv1"])
    conv.convolution_param.num_output = 4
    for shape in ([4, 1, 3, 3], [4]):
        blob = conv.blobs.add()
        blob.shape.dim.extend(shape)
        blob.data.extend(rng.standard_normal(int(np.prod(shape))).astype(np.float32).tolist())
    ip = net.layer.add(name="ip1", type="InnerProduct", bottom=["conv1"], top=["ip1"])
    legacy = ip.blobs.add(num=1, channels=1, height=3, width=5)
    legacy.data.extend(rng.standard_normal(15).astype(np.float32).tolist())
    return net


def top_level_boundaries(net):
    """Byte offsets between NetParameter's top-level fields (name, then each layer)."""
    partial = pb.NetParameter(name=net.name)
    boundaries = [0, partial.ByteSize()]
    for layer in net.layer:
        partial.layer.add().CopyFrom(layer)
        boundaries.append(partial.ByteSize())
    return boundaries


def test_binary_round_trip(tmp_path):
    net = caffemodel_like_net()
    path = tmp_path / "net.caffemodel"
    prototxt.write_binary_atomic(path, net)
    assert prototxt.read_binary(path, pb.NetParameter()) == net


def test_every_truncation_inside_a_field_is_reported(tmp_path):
    net = caffemodel_like_net()
    data = net.SerializeToString()
    boundaries = top_level_boundaries(net)
    assert boundaries[-1] == len(data)
    path = tmp_path / "cut.caffemodel"
    inside_fields = [cut for cut in range(len(data)) if cut not in boundaries]
    assert len(inside_fields) > 200
    for cut in inside_fields:
        path.write_bytes(data[:cut])
        with pytest.raises(PrototxtError) as caught:
            prototxt.read_binary(path, pb.NetParameter())
        assert str(caught.value).startswith(f"{path}: truncated or corrupt caffemodel ("), cut


def test_truncation_message_says_what_is_missing(tmp_path):
    data = caffemodel_like_net().SerializeToString()
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(data[:len(data) - 10])
    with pytest.raises(PrototxtError) as caught:
        prototxt.read_binary(path, pb.NetParameter())
    assert "field 100 at byte" in str(caught.value)
    assert "only" in str(caught.value)


def test_cut_between_top_level_fields_reads_as_a_shorter_net(tmp_path):
    # The one cut no reader can detect: what is left is a complete, shorter message.
    net = caffemodel_like_net()
    data = net.SerializeToString()
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(data[:top_level_boundaries(net)[2]])
    shorter = prototxt.read_binary(path, pb.NetParameter())
    assert [layer.name for layer in shorter.layer] == ["conv1"]


def test_empty_binary_file_is_truncated(tmp_path):
    path = tmp_path / "empty.solverstate"
    path.write_bytes(b"")
    with pytest.raises(PrototxtError) as caught:
        prototxt.read_binary(path, pb.SolverState(), what="solverstate")
    assert str(caught.value) == f"{path}: truncated or corrupt solverstate (the file is empty)"


@pytest.mark.parametrize("garbage", [
    b"\xff" * 12,                   # a varint tag that never ends
    b"\x07abc",                     # wire type 7 does not exist
    b'name: "lenet"\nlayer {\n',    # a text prototxt given as weights
    b"\x0a\x50abc",                 # a string field longer than the file
    b"\xa2\x06\x03\xff\xff\xff",      # a layer whose own first tag never ends
])
def test_corrupt_binary_is_reported(tmp_path, garbage):
    path = tmp_path / "garbage.binaryproto"
    path.write_bytes(garbage)
    with pytest.raises(PrototxtError) as caught:
        prototxt.read_binary(path, pb.NetParameter(), what="mean file")
    assert str(caught.value).startswith(f"{path}: truncated or corrupt mean file (")
    assert "\n" not in str(caught.value)


def test_text_file_given_as_weights_is_named(tmp_path):
    path = tmp_path / "lenet.prototxt"
    path.write_text(NET_TEXT)
    with pytest.raises(PrototxtError) as caught:
        prototxt.read_binary(path, pb.NetParameter())
    assert str(caught.value).startswith(
        f"{path}: truncated or corrupt caffemodel (it looks like a text file, not a binary proto: ")


def test_v1_caffemodel_is_named(tmp_path):
    path = tmp_path / "old.caffemodel"
    # name "old", then field 2 (V1 `layers`) holding an empty message.
    path.write_bytes(b"\x0a\x03old\x12\x00")
    with pytest.raises(PrototxtError, match=r"deprecated V1 format.*upgrade_net_proto_binary"):
        prototxt.read_binary(path, pb.NetParameter())


def test_solverstate_round_trip(tmp_path):
    state = pb.SolverState(iter=1200, learned_net="snap_iter_1200.caffemodel", current_step=2)
    history = state.history.add()
    history.shape.dim.extend([3])
    history.data.extend([0.25, -0.5, 1.0])
    path = tmp_path / "snap_iter_1200.solverstate"
    prototxt.write_binary_atomic(path, state)
    assert prototxt.read_binary(path, pb.SolverState(), what="solverstate") == state


# ---------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------

def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text("old content")
    net = prototxt.parse_text(NET_TEXT, pb.NetParameter())
    prototxt.write_text_atomic(path, net)
    assert prototxt.read_net_param(path) == net
    assert os.listdir(tmp_path) == ["net.prototxt"]


def test_atomic_write_gives_normal_permissions(tmp_path):
    previous_umask = os.umask(0o022)
    try:
        prototxt.write_bytes_atomic(tmp_path / "file.bin", b"abc")
    finally:
        os.umask(previous_umask)
    assert stat.S_IMODE(os.stat(tmp_path / "file.bin").st_mode) == 0o644


def test_failed_serialization_keeps_the_old_file(tmp_path):
    path = tmp_path / "net.caffemodel"
    path.write_bytes(b"old weights")
    incomplete = pb.NetParameter()
    incomplete.layer.add(name="clip").clip_param.min = 0.0  # required `max` missing
    with pytest.raises(PrototxtError) as caught:
        prototxt.write_binary_atomic(path, incomplete)
    assert str(caught.value).startswith(f"{path}: cannot serialize NetParameter (")
    assert "clip_param.max" in str(caught.value)
    assert path.read_bytes() == b"old weights"
    assert os.listdir(tmp_path) == ["net.caffemodel"]


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "net.caffemodel"
    path.write_bytes(b"old weights")

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prototxt.write_bytes_atomic(path, b"new weights" * 1000)
    assert path.read_bytes() == b"old weights"
    assert os.listdir(tmp_path) == ["net.caffemodel"]


def test_disk_error_during_write_is_one_line_and_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "net.caffemodel"
    path.write_bytes(b"old weights")

    def disk_full(_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(PrototxtError) as caught:
        prototxt.write_bytes_atomic(path, b"new weights")
    assert str(caught.value) == f"{path}: cannot write (No space left on device)"
    assert path.read_bytes() == b"old weights"
    assert os.listdir(tmp_path) == ["net.caffemodel"]


def test_write_into_missing_directory(tmp_path):
    path = tmp_path / "no" / "such" / "dir.caffemodel"
    with pytest.raises(PrototxtError) as caught:
        prototxt.write_bytes_atomic(path, b"x")
    assert str(caught.value) == f"{path}: cannot write (No such file or directory)"
