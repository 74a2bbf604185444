"""Blob: an N-d array of data with its gradient (diff), as in Caffe.

``data`` and ``diff`` are NumPy views into backing buffers that only grow, so reshaping a blob to a
smaller or equal size never allocates. Shapes are tuples of ints; most layers use NCHW.

Blobs are float32. The gradient checker builds layers inside ``blob_dtype(np.float64)`` so that
kernels written over Cython's fused ``floating`` type can be checked in double precision.
"""
import contextlib
import math

import numpy as np

from .errors import MinicaffeError


_default_dtype = np.float32


@contextlib.contextmanager
def blob_dtype(dtype):
    """Blobs created inside this block use ``dtype`` (float32 or float64)."""
    global _default_dtype
    saved, _default_dtype = _default_dtype, np.dtype(dtype).type
    try:
        yield
    finally:
        _default_dtype = saved


class Blob:
    __slots__ = ("_shape", "_count", "_data_buf", "_diff_buf", "_data_owner", "_diff_owner", "name", "dtype")

    def __init__(self, shape=(), name=""):
        self.name = name
        self.dtype = _default_dtype
        self._shape = ()
        self._count = 1
        self._data_buf = np.zeros(0, dtype=self.dtype)
        self._diff_buf = np.zeros(0, dtype=self.dtype)
        self._data_owner = self
        self._diff_owner = self
        self.reshape(shape)

    # -- shape -------------------------------------------------------------------------------------
    @property
    def shape(self):
        return self._shape

    @property
    def num_axes(self):
        return len(self._shape)

    @property
    def count(self):
        return self._count

    def count_range(self, start, end=None):
        """Product of the dimensions in [start, end)."""
        end = self.num_axes if end is None else end
        return math.prod(self._shape[start:end])

    def canonical_axis(self, axis):
        """Turns a negative axis into a positive one, checking its range (Caffe's CanonicalAxisIndex)."""
        n = self.num_axes
        if not -n <= axis < n:
            raise MinicaffeError(f"axis {axis} out of range for a blob of shape {self._shape}")
        return axis + n if axis < 0 else axis

    def reshape(self, *shape):
        """``reshape((2, 3))`` or, as pycaffe's Blob, ``reshape(2, 3)``."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = shape[0]
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise MinicaffeError(f"blob '{self.name}': negative dimension in shape {shape}")
        self._shape = shape
        # Kept, not recomputed: data and diff, read hundreds of times an iteration, need it.
        self._count = n = math.prod(shape)
        if self._data_owner is self and self._data_buf.size < n:
            self._data_buf = np.zeros(n, dtype=self.dtype)
        if self._diff_owner is self and self._diff_buf.size < n:
            self._diff_buf = np.zeros(n, dtype=self.dtype)

    # pycaffe's legacy 4-D accessors.
    num = property(lambda self: self._legacy_dim(0))
    channels = property(lambda self: self._legacy_dim(1))
    height = property(lambda self: self._legacy_dim(2))
    width = property(lambda self: self._legacy_dim(3))

    def _legacy_dim(self, index):
        if self.num_axes > 4:
            raise MinicaffeError(f"blob '{self.name}' has {self.num_axes} axes; use .shape")
        padded = self._shape + (1,) * (4 - self.num_axes)
        return padded[index]

    def reshape_like(self, other):
        self.reshape(other.shape)

    # -- storage -----------------------------------------------------------------------------------
    @property
    def data(self):
        buf, n = self._data_owner._data_buf, self._count
        if buf.size < n:
            raise MinicaffeError(f"blob '{self.name}' shares data with a smaller blob")
        return buf[:n].reshape(self._shape)

    @data.setter
    def data(self, value):
        self.data[...] = value

    @property
    def diff(self):
        buf, n = self._diff_owner._diff_buf, self._count
        if buf.size < n:
            raise MinicaffeError(f"blob '{self.name}' shares diff with a smaller blob")
        return buf[:n].reshape(self._shape)

    @diff.setter
    def diff(self, value):
        self.diff[...] = value

    def share_data(self, other):
        """Makes this blob read and write ``other``'s data buffer (Caffe's ShareData)."""
        self._data_owner = other._data_owner

    def share_diff(self, other):
        self._diff_owner = other._diff_owner

    # -- serialization -----------------------------------------------------------------------------
    def to_proto(self, proto, write_diff=False):
        proto.Clear()
        proto.shape.dim.extend(self._shape)
        proto.data.extend(self.data.ravel().tolist())
        if write_diff:
            proto.diff.extend(self.diff.ravel().tolist())
        return proto

    def from_proto(self, proto, reshape=True, what="blob"):
        """Reads a BlobProto, accepting the legacy num/channels/height/width shape as Caffe does."""
        if proto.HasField("shape"):
            shape = tuple(proto.shape.dim)
        elif proto.HasField("num") or proto.HasField("channels") or proto.HasField("height") \
                or proto.HasField("width"):
            shape = (proto.num, proto.channels, proto.height, proto.width)
        else:
            shape = (len(proto.data) or len(proto.double_data),)
        if reshape:
            self.reshape(shape)
        elif not _same_count_shape(shape, self._shape):
            raise MinicaffeError(f"{what}: shape mismatch, the file has {shape} and the net has {self._shape}")
        values = proto.data if len(proto.data) else proto.double_data
        if len(values) != self.count:
            raise MinicaffeError(f"{what}: holds {len(values)} values, shape {self._shape} needs {self.count}")
        self.data[...] = np.asarray(values, dtype=self.dtype).reshape(self._shape)
        diffs = proto.diff if len(proto.diff) else proto.double_diff
        if len(diffs) == self.count:
            self.diff[...] = np.asarray(diffs, dtype=self.dtype).reshape(self._shape)

    def __repr__(self):
        return f"Blob({self.name!r}, shape={self._shape})"


def _same_count_shape(a, b):
    """True when two shapes agree, allowing Caffe's legacy 4-D padding with leading ones."""
    if tuple(a) == tuple(b):
        return True
    strip = lambda s: tuple(s)[next((i for i, d in enumerate(s) if d != 1), len(s)):]
    return strip(a) == strip(b)
