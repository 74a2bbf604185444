"""IDX files, the format of MNIST and Fashion-MNIST, gzip-compressed or raw.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values. Images are ``0x00000803`` (uint8, 3 dimensions:
count, rows, columns) and labels ``0x00000801`` (uint8, 1 dimension). Every check runs on the
decompressed stream, so a file is accepted or rejected the same way whichever tool compressed it.
"""
import gzip
import os
import struct
import zlib

import numpy as np

from ..errors import DataError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_KIND_OF_MAGIC = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}
_MAGIC_OF_KIND = {kind: magic for magic, kind in _KIND_OF_MAGIC.items()}
_GZIP_SIGNATURE = b"\x1f\x8b"
_CHUNK = 1 << 20
# zlib, gzip and the OS report a damaged or unreadable stream with these.
_STREAM_ERRORS = (OSError, EOFError, zlib.error)


class IdxDataset:
    """A labelled image set held in memory: ``images`` uint8 [N,1,H,W], ``labels`` uint8 [N]."""

    def __init__(self, images, labels, description):
        if len(images) != len(labels):
            raise DataError(f"{description}: {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.description = description

    @property
    def count(self):
        return len(self.images)

    @property
    def item_shape(self):
        return self.images.shape[1:]

    @property
    def dtype(self):
        return self.images.dtype

    def gather(self, indices, images_out, labels_out):
        np.take(self.images, indices, axis=0, out=images_out)
        labels_out[...] = self.labels[indices]


def open_idx_stream(path):
    """Opens ``path`` for reading, decompressing it when it starts with the gzip signature."""
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an IDX file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc.strerror}") from None
    if raw.peek(2)[:2] != _GZIP_SIGNATURE:
        return raw
    raw.close()
    return gzip.open(path, "rb")


def read_header(stream, path):
    """Reads the magic number and dimensions; returns (kind, dims) with kind 'images' or 'labels'."""
    magic_bytes = _read_exactly(stream, 4, path, "the magic number")
    (magic,) = struct.unpack(">I", magic_bytes)
    kind = _KIND_OF_MAGIC.get(magic)
    if kind is None:
        raise DataError(f"{path}: bad magic number 0x{magic:08x}, expected 0x{IMAGES_MAGIC:08x} "
                        f"(images) or 0x{LABELS_MAGIC:08x} (labels): not an IDX file of uint8")
    num_dims = magic & 0xFF
    dims = struct.unpack(f">{num_dims}I", _read_exactly(stream, 4 * num_dims, path, "the dimensions"))
    return kind, dims


def inspect_file(path, kind):
    """Checks a whole file (magic, dimensions, payload length) without keeping it; returns the dims."""
    with open_idx_stream(path) as stream:
        dims = _checked_header(stream, path, kind)
        expected = int(np.prod(dims, dtype=np.int64))
        received = 0
        try:
            while chunk := stream.read(_CHUNK):
                received += len(chunk)
        except _STREAM_ERRORS as exc:
            raise DataError(f"{path}: corrupt compressed data after {received} payload bytes ({exc})") \
                from None
        _check_payload_length(path, dims, expected, received)
        return dims


def read_images(path):
    """The images of an IDX file as uint8 [N, 1, rows, cols]."""
    with open_idx_stream(path) as stream:
        count, rows, cols = _checked_header(stream, path, "images")
        return _read_payload(stream, path, (count, rows, cols)).reshape(count, 1, rows, cols)


def read_labels(path):
    """The labels of an IDX file as uint8 [N]."""
    with open_idx_stream(path) as stream:
        dims = _checked_header(stream, path, "labels")
        return _read_payload(stream, path, dims)


def read_pair(images_path, labels_path):
    images = read_images(images_path)
    labels = read_labels(labels_path)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                        f"{len(labels)} labels")
    return IdxDataset(images, labels, description=os.fspath(images_path))


def _checked_header(stream, path, kind):
    try:
        found, dims = read_header(stream, path)
    except _STREAM_ERRORS as exc:
        raise DataError(f"{path}: corrupt compressed data in the header ({exc})") from None
    if found != kind:
        raise DataError(f"{path}: is an IDX {found} file (magic 0x{_MAGIC_OF_KIND[found]:08x}), "
                        f"expected {kind} (magic 0x{_MAGIC_OF_KIND[kind]:08x})")
    expected_dims = 3 if kind == "images" else 1
    if len(dims) != expected_dims:
        raise DataError(f"{path}: {kind} file with {len(dims)} dimensions, expected {expected_dims}")
    if kind == "images" and (dims[1] == 0 or dims[2] == 0):
        raise DataError(f"{path}: images of size {dims[1]}x{dims[2]}")
    return dims


def _read_payload(stream, path, dims):
    expected = int(np.prod(dims, dtype=np.int64))
    values = np.empty(expected, dtype=np.uint8)
    view = memoryview(values)
    received = 0
    try:
        while received < expected:
            n = stream.readinto(view[received:])
            if not n:
                break
            received += n
        if received == expected:
            received += len(stream.read(_CHUNK))
    except _STREAM_ERRORS as exc:
        raise DataError(f"{path}: corrupt compressed data after {received} payload bytes ({exc})") from None
    _check_payload_length(path, dims, expected, received)
    return values.reshape(dims)


def _check_payload_length(path, dims, expected, received):
    shape = "x".join(str(d) for d in dims)
    if received < expected:
        raise DataError(f"{path}: truncated: the header announces {shape} = {expected} bytes of data, "
                        f"the file holds {received}")
    if received > expected:
        raise DataError(f"{path}: trailing bytes after the {expected} bytes of data that the header "
                        f"({shape}) announces")


def _read_exactly(stream, n, path, what):
    data = stream.read(n)
    if len(data) != n:
        raise DataError(f"{path}: truncated: the file ends inside {what}")
    return data
