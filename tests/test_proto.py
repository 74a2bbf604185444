"""The schema: the committed minicaffe_pb2 is current, and it is wire-compatible with Caffe."""

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from minicaffe import prototxt
from minicaffe.proto import minicaffe_pb2 as pb

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_RELATIVE = "minicaffe/proto/minicaffe.proto"
CAFFE_PROTOTXT_DIR = REPO_ROOT.parent / "shared" / "caffe-prototxt"


# ---------------------------------------------------------------------------------------
# The generated module is current
# ---------------------------------------------------------------------------------------

def _canonical(file_proto):
    """Drop what protoc versions render differently but that means the same schema."""
    def visit(messages):
        for message in messages:
            for field in message.field:
                # --descriptor_set_out records json_name; python gencode leaves it out.
                field.ClearField("json_name")
                # Float defaults: "1e-08" vs "9.99999994e-09" depending on the protoc.
                if field.HasField("default_value") and field.type in (
                        FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
                    code = "f" if field.type == FieldDescriptor.TYPE_FLOAT else "d"
                    value = struct.unpack(code, struct.pack(code, float(field.default_value)))[0]
                    field.default_value = repr(value)
            visit(message.nested_type)
    visit(file_proto.message_type)
    return file_proto


def test_committed_module_matches_the_proto(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    descriptor_set = tmp_path / "minicaffe.pb"
    status = protoc.main(["protoc", f"-I{REPO_ROOT}", f"--descriptor_set_out={descriptor_set}",
                          str(REPO_ROOT / PROTO_RELATIVE)])
    assert status == 0, "protoc failed on minicaffe.proto"
    compiled = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    assert len(compiled.file) == 1
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert _canonical(compiled.file[0]) == _canonical(committed), \
        "minicaffe_pb2.py is stale: run `python scripts/gen_proto.py`"


def _version_tuple(text):
    return tuple(int(part) for part in text.split("."))


def test_protobuf_floor_covers_the_generated_code():
    # The generated module refuses to import on a protobuf runtime older than the protoc
    # that wrote it, so the dependency floor in pyproject.toml must be at least that.
    module_source = (REPO_ROOT / "minicaffe/proto/minicaffe_pb2.py").read_text()
    gencode = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
                        r"\s*(\d+),\s*(\d+),\s*(\d+),", module_source)
    assert gencode, "no runtime version check found in minicaffe_pb2.py"
    gencode_version = tuple(int(part) for part in gencode.groups())
    floor = re.search(r'"protobuf>=([\d.]+)', (REPO_ROOT / "pyproject.toml").read_text())
    assert floor, "pyproject.toml names no protobuf floor"
    floor_version = _version_tuple(floor.group(1))
    padded_floor = floor_version + (0,) * (3 - len(floor_version))
    assert padded_floor >= gencode_version, (
        f"pyproject.toml allows protobuf {floor.group(1)}, but minicaffe_pb2.py needs "
        f"{'.'.join(map(str, gencode_version))} or newer")


def test_module_imports_in_a_fresh_interpreter():
    # Catches a runtime-version mismatch that an already-imported module would hide.
    completed = subprocess.run(
        [sys.executable, "-c", "from minicaffe.proto import minicaffe_pb2; "
                               "print(minicaffe_pb2.LayerParameter.DESCRIPTOR.full_name)"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "minicaffe.LayerParameter"


# ---------------------------------------------------------------------------------------
# Binary compatibility with BVLC caffe.proto
# ---------------------------------------------------------------------------------------

INT32, INT64, UINT32 = FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, \
    FieldDescriptor.TYPE_UINT32
FLOAT, DOUBLE, STRING = FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE, \
    FieldDescriptor.TYPE_STRING
MESSAGE, ENUM, BOOL, BYTES = FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_ENUM, \
    FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_BYTES

# (message, field, number, wire-relevant type) as in BVLC caffe.proto.
CAFFE_FIELDS = [
    ("BlobShape", "dim", 1, INT64),
    ("BlobProto", "num", 1, INT32), ("BlobProto", "channels", 2, INT32),
    ("BlobProto", "height", 3, INT32), ("BlobProto", "width", 4, INT32),
    ("BlobProto", "data", 5, FLOAT), ("BlobProto", "diff", 6, FLOAT),
    ("BlobProto", "shape", 7, MESSAGE),
    ("BlobProto", "double_data", 8, DOUBLE), ("BlobProto", "double_diff", 9, DOUBLE),
    ("BlobProtoVector", "blobs", 1, MESSAGE),
    ("Datum", "channels", 1, INT32), ("Datum", "height", 2, INT32), ("Datum", "width", 3, INT32),
    ("Datum", "data", 4, BYTES), ("Datum", "label", 5, INT32),
    ("Datum", "float_data", 6, FLOAT), ("Datum", "encoded", 7, BOOL),
    ("NetParameter", "name", 1, STRING), ("NetParameter", "input", 3, STRING),
    ("NetParameter", "input_dim", 4, INT32), ("NetParameter", "input_shape", 8, MESSAGE),
    ("NetParameter", "state", 6, MESSAGE), ("NetParameter", "layer", 100, MESSAGE),
    ("LayerParameter", "name", 1, STRING), ("LayerParameter", "type", 2, STRING),
    ("LayerParameter", "bottom", 3, STRING), ("LayerParameter", "top", 4, STRING),
    ("LayerParameter", "loss_weight", 5, FLOAT), ("LayerParameter", "param", 6, MESSAGE),
    ("LayerParameter", "blobs", 7, MESSAGE), ("LayerParameter", "include", 8, MESSAGE),
    ("LayerParameter", "exclude", 9, MESSAGE), ("LayerParameter", "phase", 10, ENUM),
    ("LayerParameter", "propagate_down", 11, BOOL),
    ("LayerParameter", "transform_param", 100, MESSAGE),
    ("LayerParameter", "loss_param", 101, MESSAGE),
    ("LayerParameter", "convolution_param", 106, MESSAGE),
    ("LayerParameter", "data_param", 107, MESSAGE),
    ("LayerParameter", "inner_product_param", 117, MESSAGE),
    ("LayerParameter", "pooling_param", 121, MESSAGE),
    ("LayerParameter", "python_param", 130, MESSAGE),
    ("LayerParameter", "batch_norm_param", 139, MESSAGE),
    ("LayerParameter", "scale_param", 142, MESSAGE),
    ("LayerParameter", "input_param", 143, MESSAGE),
    ("LayerParameter", "swish_param", 147, MESSAGE),
    ("LayerParameter", "clip_param", 148, MESSAGE),
    ("ParamSpec", "name", 1, STRING), ("ParamSpec", "share_mode", 2, ENUM),
    ("ParamSpec", "lr_mult", 3, FLOAT), ("ParamSpec", "decay_mult", 4, FLOAT),
    ("SolverState", "iter", 1, INT32), ("SolverState", "learned_net", 2, STRING),
    ("SolverState", "history", 3, MESSAGE), ("SolverState", "current_step", 4, INT32),
    ("SolverParameter", "net", 24, STRING), ("SolverParameter", "test_iter", 3, INT32),
    ("SolverParameter", "base_lr", 5, FLOAT), ("SolverParameter", "max_iter", 7, INT32),
    ("SolverParameter", "snapshot_prefix", 15, STRING),
    ("SolverParameter", "random_seed", 20, INT64), ("SolverParameter", "type", 40, STRING),
    ("SolverParameter", "layer_wise_reduce", 41, BOOL),
    ("SolverParameter", "weights", 42, STRING),
    ("ConvolutionParameter", "num_output", 1, UINT32),
    ("ConvolutionParameter", "kernel_size", 4, UINT32),
    ("ConvolutionParameter", "dilation", 18, UINT32),
    ("PoolingParameter", "round_mode", 13, ENUM),
    ("FillerParameter", "sparse", 7, INT32),
    ("NetState", "level", 2, INT32), ("NetStateRule", "min_level", 2, INT32),
]


@pytest.mark.parametrize("message, field, number, field_type", CAFFE_FIELDS,
                         ids=[f"{message}.{field}" for message, field, *_ in CAFFE_FIELDS])
def test_field_numbers_and_types_match_caffe(message, field, number, field_type):
    descriptor = getattr(pb, message).DESCRIPTOR.fields_by_name[field]
    assert descriptor.number == number
    assert descriptor.type == field_type


def test_packed_fields_match_caffe():
    # Packed-ness changes the bytes written, so it must be Caffe's: data/diff and dim are
    # packed; loss_weight and Datum.float_data are not.
    packed = {(message, field): getattr(pb, message).DESCRIPTOR.fields_by_name[field].is_packed
              for message, field in [("BlobProto", "data"), ("BlobProto", "diff"),
                                     ("BlobProto", "double_data"), ("BlobProto", "double_diff"),
                                     ("BlobShape", "dim"), ("LayerParameter", "loss_weight"),
                                     ("Datum", "float_data")]}
    assert packed == {("BlobProto", "data"): True, ("BlobProto", "diff"): True,
                      ("BlobProto", "double_data"): True, ("BlobProto", "double_diff"): True,
                      ("BlobShape", "dim"): True, ("LayerParameter", "loss_weight"): False,
                      ("Datum", "float_data"): False}


def test_blob_bytes_are_what_caffe_writes():
    blob = pb.BlobProto()
    blob.shape.dim.append(2)
    blob.data.extend([1.0, 2.0])
    # data: field 5, length-delimited (tag 0x2A), 8 bytes of little-endian float32;
    # shape: field 7 (tag 0x3A), 3 bytes: BlobShape.dim packed (tag 0x0A), 1 byte, value 2.
    expected = b"\x2a\x08" + struct.pack("<2f", 1.0, 2.0) + b"\x3a\x03\x0a\x01\x02"
    assert blob.SerializeToString() == expected


def test_enum_values_match_caffe():
    assert (pb.TRAIN, pb.TEST) == (0, 1)
    assert (pb.PoolingParameter.MAX, pb.PoolingParameter.AVE,
            pb.PoolingParameter.STOCHASTIC) == (0, 1, 2)
    assert (pb.PoolingParameter.CEIL, pb.PoolingParameter.FLOOR) == (0, 1)
    assert (pb.EltwiseParameter.PROD, pb.EltwiseParameter.SUM, pb.EltwiseParameter.MAX) == (0, 1, 2)
    assert (pb.LossParameter.FULL, pb.LossParameter.VALID, pb.LossParameter.BATCH_SIZE,
            pb.LossParameter.NONE) == (0, 1, 2, 3)
    assert (pb.DataParameter.LEVELDB, pb.DataParameter.LMDB) == (0, 1)
    assert pb.SolverParameter.ADAM == 5
    assert pb.SolverParameter.BINARYPROTO == 1


def test_defaults_match_caffe():
    assert pb.NetState().phase == pb.TEST
    assert pb.ParamSpec().lr_mult == 1.0
    assert pb.ConvolutionParameter().bias_term is True
    assert pb.ConvolutionParameter().group == 1
    assert pb.PoolingParameter().stride == 1
    assert pb.LRNParameter().local_size == 5
    assert pb.LRNParameter().beta == pytest.approx(0.75)
    assert pb.BatchNormParameter().moving_average_fraction == pytest.approx(0.999)
    assert pb.SolverParameter().type == "SGD"
    assert pb.SolverParameter().random_seed == -1
    assert pb.SolverParameter().delta == pytest.approx(1e-8)
    assert pb.FillerParameter().type == "constant"
    assert pb.DataParameter().prefetch == 4


def _all_messages(descriptors):
    for descriptor in descriptors:
        yield descriptor
        yield from _all_messages(descriptor.nested_types)


def test_minicaffe_extensions_use_the_reserved_range():
    # Everything of ours lives in 5000-5999, and nothing else does: a number outside it
    # that is not Caffe's would be a silent binary incompatibility.
    ours = {(message.name, field.name, field.number)
            for message in _all_messages(pb.DESCRIPTOR.message_types_by_name.values())
            for field in message.fields if field.number >= 1000}
    precision = {(message, field, number) for message in ("NetParameter", "LayerParameter", "SolverParameter")
                 for field, number in (("precision", 5000), ("precision_param", 5001))}
    assert ours == {("DataParameter", "shuffle", 5000), ("DataParameter", "label_source", 5001)} | precision
    assert pb.DataParameter.IDX == 5000
    assert pb.DataParameter().shuffle is False


def test_v1_layer_format_is_not_in_the_schema():
    assert "layers" not in pb.NetParameter.DESCRIPTOR.fields_by_name
    assert not hasattr(pb, "V1LayerParameter")


def test_caffemodel_round_trip_keeps_every_value():
    net = pb.NetParameter(name="tiny")
    layer = net.layer.add(name="ip", type="InnerProduct", bottom=["data"], top=["ip"])
    layer.inner_product_param.num_output = 3
    weights = layer.blobs.add()
    weights.shape.dim.extend([3, 2])
    weights.data.extend([0.5, -1.25, 3.0, 1e-30, -0.0, 7.5])
    restored = pb.NetParameter.FromString(net.SerializeToString())
    assert restored == net
    assert list(restored.layer[0].blobs[0].data) == [0.5, -1.25, 3.0, pytest.approx(1e-30), -0.0,
                                                     7.5]


# ---------------------------------------------------------------------------------------
# Caffe's own prototxts parse unchanged
# ---------------------------------------------------------------------------------------

def _caffe_prototxts():
    if not CAFFE_PROTOTXT_DIR.is_dir():
        return []
    return sorted(CAFFE_PROTOTXT_DIR.glob("*.prototxt"))


@pytest.mark.skipif(not _caffe_prototxts(), reason=f"{CAFFE_PROTOTXT_DIR} is absent")
@pytest.mark.parametrize("path", _caffe_prototxts(), ids=lambda path: path.name)
def test_caffe_prototxt_parses(path):
    if path.name.endswith("solver.prototxt"):
        solver = prototxt.read_solver(path)
        assert solver.base_lr > 0
        assert solver.max_iter > 0
    else:
        parsed = prototxt.read_net(path)
        assert len(parsed.param.layer) > 0
        assert len(parsed.layer_lines) == len(parsed.param.layer)
        lines = path.read_text().splitlines()
        for line_number, layer in zip(parsed.layer_lines, parsed.param.layer):
            assert lines[line_number - 1].lstrip().startswith("layer"), (line_number, layer.name)
