""".caffemodel files: Caffe's wire format written byte by byte here, round trips, and shape errors.

The hand encoder below follows the protobuf wire format that Caffe's caffe.proto produces: a field
key is varint((field_number << 3) | wire_type); wire type 0 is a varint, 2 is length-delimited
(strings, sub-messages, packed repeated numbers) and 5 a 32-bit little-endian float. It shares
nothing with protobuf's serializer, so a schema field number or packing that drifted from Caffe's
would fail these tests.
"""
import struct

import numpy as np
import pytest
from google.protobuf import text_format

from conftest import REPO
from minicaffe import Net, TEST, prototxt
from minicaffe.errors import MinicaffeError
from minicaffe.proto import minicaffe_pb2 as pb

# Field numbers from BVLC caffe.proto.
NET_NAME, NET_LAYER = 1, 100
LAYER_NAME, LAYER_TYPE, LAYER_BLOBS = 1, 2, 7
BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH, BLOB_DATA, BLOB_SHAPE = 1, 2, 3, 4, 5, 7
SHAPE_DIM = 1
VARINT, LENGTH_DELIMITED, FIXED32 = 0, 2, 5


def varint(value):
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def key(field, wire_type):
    return varint(field << 3 | wire_type)


def length_delimited(field, payload):
    return key(field, LENGTH_DELIMITED) + varint(len(payload)) + payload


def string(field, text):
    return length_delimited(field, text.encode("utf-8"))


def int_field(field, value):
    return key(field, VARINT) + varint(value)


def packed_floats(field, values):
    return length_delimited(field, b"".join(struct.pack("<f", v) for v in values))


def unpacked_floats(field, values):
    # Old writers (and proto2 without [packed=true]) repeat the key before every value.
    return b"".join(key(field, FIXED32) + struct.pack("<f", v) for v in values)


def blob_with_shape(values, dims, shape_first=False):
    """A BlobProto; Caffe's C++ writer emits fields by number, so data (5) comes before shape (7)."""
    shape = length_delimited(BLOB_SHAPE, length_delimited(SHAPE_DIM, b"".join(varint(d) for d in dims)))
    data = packed_floats(BLOB_DATA, values)
    return shape + data if shape_first else data + shape


def blob_legacy_4d(values, num, channels, height, width):
    return (int_field(BLOB_NUM, num) + int_field(BLOB_CHANNELS, channels) + int_field(BLOB_HEIGHT, height)
            + int_field(BLOB_WIDTH, width) + unpacked_floats(BLOB_DATA, values))


def layer(name, type_name, blobs):
    body = string(LAYER_NAME, name) + string(LAYER_TYPE, type_name)
    return length_delimited(NET_LAYER, body + b"".join(length_delimited(LAYER_BLOBS, b) for b in blobs))


def caffemodel(*layers):
    return string(NET_NAME, "hand_written") + b"".join(layers)


SMALL_NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
"""


def small_net(num_output=2, bias_term=True):
    param = text_format.Parse(SMALL_NET, pb.NetParameter())
    param.layer[1].inner_product_param.num_output = num_output
    param.layer[1].inner_product_param.bias_term = bias_term
    return Net(param, phase=TEST)


WEIGHTS = [0.5, -1.25, 2.0, 3.5, -0.125, 1e-3]
BIAS = [0.25, -7.0]


def test_hand_encoded_caffemodel_loads_by_layer_name(tmp_path):
    path = tmp_path / "hand.caffemodel"
    path.write_bytes(caffemodel(
        layer("unknown_layer", "InnerProduct", [blob_with_shape([9.0], [1])]),   # ignored, as in Caffe
        layer("ip", "InnerProduct", [blob_with_shape(WEIGHTS, [2, 3]), blob_with_shape(BIAS, [2], shape_first=True)])))
    net = small_net()
    net.copy_from(path)
    np.testing.assert_array_equal(net.params["ip"][0].data, np.array(WEIGHTS, np.float32).reshape(2, 3))
    np.testing.assert_array_equal(net.params["ip"][1].data, np.array(BIAS, np.float32))
    net.forward(data=np.array([[1.0, 2.0, 3.0]]))
    out = net.blobs["ip"].data
    expected = np.maximum(np.array(WEIGHTS, np.float32).reshape(2, 3) @ [1, 2, 3] + BIAS, 0)
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)


def test_legacy_4d_blob_shape_loads(tmp_path):
    # Caffe before BlobShape stored an InnerProduct weight as num=1, channels=1, height=out, width=in.
    path = tmp_path / "legacy.caffemodel"
    path.write_bytes(caffemodel(layer("ip", "InnerProduct", [blob_legacy_4d(WEIGHTS, 1, 1, 2, 3),
                                                             blob_legacy_4d(BIAS, 1, 1, 1, 2)])))
    net = small_net()
    net.copy_from(path)
    np.testing.assert_array_equal(net.params["ip"][0].data, np.array(WEIGHTS, np.float32).reshape(2, 3))
    np.testing.assert_array_equal(net.params["ip"][1].data, np.array(BIAS, np.float32))


def test_hand_encoding_matches_what_protobuf_reads():
    parsed = pb.NetParameter.FromString(caffemodel(layer("ip", "InnerProduct", [blob_with_shape(WEIGHTS, [2, 3])])))
    assert parsed.name == "hand_written" and parsed.layer[0].name == "ip"
    assert list(parsed.layer[0].blobs[0].shape.dim) == [2, 3]
    assert list(parsed.layer[0].blobs[0].data) == pytest.approx(WEIGHTS)


def test_our_caffemodel_bytes_are_caffes_wire_format(tmp_path):
    net = small_net()
    net.params["ip"][0].data[...] = np.array(WEIGHTS).reshape(2, 3)
    net.params["ip"][1].data[...] = BIAS
    path = tmp_path / "saved.caffemodel"
    net.save(path)
    data = path.read_bytes()
    # Packed floats, then the BlobShape: byte for byte what Caffe's SerializeToString writes.
    assert blob_with_shape(WEIGHTS, [2, 3]) in data and blob_with_shape(BIAS, [2]) in data
    assert string(LAYER_NAME, "ip") in data


def test_save_then_copy_from_round_trips_a_zoo_net(tmp_path):
    deploy = prototxt.read_net_param(REPO / "prototxt" / "resnet_fmnist" / "resnet_fmnist_deploy.prototxt")
    deploy.layer[0].input_param.shape[0].dim[0] = 2
    source = Net(deploy, phase=TEST)
    rng = np.random.default_rng(3)
    for blobs in source.params.values():
        for blob in blobs:
            blob.data[...] = rng.uniform(0.5, 1.5, size=blob.shape)   # positive: valid BatchNorm variances
    path = tmp_path / "resnet_fmnist.caffemodel"
    source.save(path)
    loaded = Net(deploy, weights=str(path), phase=TEST)
    assert list(loaded.params) == list(source.params)
    for name, blobs in source.params.items():
        for j, blob in enumerate(blobs):
            np.testing.assert_array_equal(loaded.params[name][j].data, blob.data, err_msg=f"{name}[{j}]")
    image = rng.normal(size=(2, 1, 28, 28))
    np.testing.assert_array_equal(loaded.forward(data=image)["prob"], source.forward(data=image)["prob"])
    stored = prototxt.read_binary(path, pb.NetParameter())
    assert [len(l.blobs) for l in stored.layer if l.type == "BatchNorm"][0] == 3


def test_shape_mismatch_names_the_layer_and_both_shapes(tmp_path):
    path = tmp_path / "two_outputs.caffemodel"
    path.write_bytes(caffemodel(layer("ip", "InnerProduct", [blob_with_shape(WEIGHTS, [2, 3]),
                                                             blob_with_shape(BIAS, [2])])))
    net = small_net(num_output=4)
    with pytest.raises(MinicaffeError) as error:
        net.copy_from(path)
    message = str(error.value)
    assert "layer 'ip'" in message and "(2, 3)" in message and "(4, 3)" in message and "\n" not in message
    assert str(path) in message


def test_blob_count_mismatch_names_the_layer(tmp_path):
    path = tmp_path / "with_bias.caffemodel"
    path.write_bytes(caffemodel(layer("ip", "InnerProduct", [blob_with_shape(WEIGHTS, [2, 3]),
                                                             blob_with_shape(BIAS, [2])])))
    with pytest.raises(MinicaffeError, match=r"layer 'ip' has 2 blobs in the file but 1 in the net"):
        small_net(bias_term=False).copy_from(path)


def test_truncated_caffemodel_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(caffemodel(layer("ip", "InnerProduct", [blob_with_shape(WEIGHTS, [2, 3])]))[:-5])
    with pytest.raises(MinicaffeError, match=r"cut\.caffemodel: truncated or corrupt caffemodel"):
        small_net().copy_from(path)
