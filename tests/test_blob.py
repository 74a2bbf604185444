"""Blob: shapes, pycaffe's reshape forms and legacy accessors, sharing, and BlobProto I/O."""
import numpy as np
import pytest

from minicaffe.blob import Blob, blob_dtype
from minicaffe.errors import MinicaffeError
from minicaffe.proto import minicaffe_pb2 as pb


def test_reshape_forms_and_legacy_accessors():
    b = Blob((2, 3))
    b.reshape(4, 5, 6)
    assert b.shape == (4, 5, 6) and (b.num, b.channels, b.height, b.width) == (4, 5, 6, 1)
    b.reshape((7,))
    assert b.shape == (7,) and b.count == 7
    b.reshape([2, 2])
    assert b.shape == (2, 2)
    b.reshape(np.int64(3))
    assert b.shape == (3,)
    b.reshape(())
    assert b.shape == () and b.count == 1
    b.reshape(1, 2, 3, 4, 5)
    with pytest.raises(MinicaffeError, match="5 axes"):
        b.num
    with pytest.raises(MinicaffeError, match="negative"):
        b.reshape(2, -1)


def test_reshape_smaller_keeps_the_buffer_and_growing_reallocates():
    b = Blob((4, 4))
    buffer = b.data.base if b.data.base is not None else b.data
    b.reshape(2, 2)
    assert np.shares_memory(b.data, buffer)
    b.reshape(10, 10)
    assert b.data.shape == (10, 10) and not np.shares_memory(b.data, buffer)


def test_shared_data_and_diff_follow_the_owner():
    owner, user = Blob((3,)), Blob((3,))
    user.share_data(owner)
    user.share_diff(owner)
    owner.data[...] = [1, 2, 3]
    user.diff[...] = 5
    assert list(user.data) == [1, 2, 3] and list(owner.diff) == [5, 5, 5]


def test_proto_round_trip_and_legacy_shape():
    with blob_dtype(np.float64):
        b = Blob((2, 3))
    assert b.dtype == np.float64
    b.data[...] = np.arange(6).reshape(2, 3)
    proto = b.to_proto(pb.BlobProto(), write_diff=True)
    c = Blob()
    c.from_proto(proto)
    assert c.shape == (2, 3) and c.data.tolist() == [[0, 1, 2], [3, 4, 5]]
    legacy = pb.BlobProto(num=1, channels=1, height=2, width=3, data=range(6))
    c.from_proto(legacy, reshape=False, what="legacy")  # 1x1x2x3 fits a 2x3 blob
    with pytest.raises(MinicaffeError, match="shape mismatch"):
        Blob((3, 2)).from_proto(legacy, reshape=False, what="legacy")
