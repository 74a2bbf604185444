"""Caffe's TransformationParameter, applied to a whole batch at once.

For each image: subtract the mean (``mean_file``, an image the size of the input, or ``mean_value``,
one per channel or one for all), crop ``crop_size`` x ``crop_size`` (at a random place in TRAIN, in
the center in TEST), flip left-right with probability 1/2 (``mirror``), multiply by ``scale``. As in
Caffe the mean image is taken at the same pixels as the crop. Unlike Caffe, ``mirror`` only flips in
TRAIN, so that test scores do not depend on a coin toss.

The random choices are drawn separately (``draw``) from applying them (``apply``), so a caller can
draw them for a larger batch and use a slice of them: this is how a data-parallel rank augments its
share of a global batch exactly as a single process would.
"""
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError
from numpy.lib.stride_tricks import sliding_window_view

from ..blob import Blob
from ..errors import DataError, MinicaffeError
from ..proto import minicaffe_pb2 as pb


@dataclass
class Augmentation:
    """Per-image random choices: crop offsets (rows, columns) and left-right flips."""

    row_offsets: np.ndarray
    col_offsets: np.ndarray
    flips: np.ndarray

    def __getitem__(self, items):
        return Augmentation(self.row_offsets[items], self.col_offsets[items], self.flips[items])


class DataTransformer:
    """Turns uint8 or float images [N,C,H,W] into the float network input [N,C,crop,crop]."""

    def __init__(self, param, phase, item_shape, error=DataError):
        channels, height, width = item_shape
        self.item_shape = tuple(item_shape)
        self.scale = param.scale
        self.random_crop = phase == pb.TRAIN
        self.mirror = param.mirror and phase == pb.TRAIN
        self.crop_size = param.crop_size
        if self.crop_size and (self.crop_size > height or self.crop_size > width):
            raise error(f"transform_param.crop_size {self.crop_size} is larger than the input images "
                        f"({height}x{width})")
        if param.mean_file and len(param.mean_value):
            raise error("transform_param: mean_file and mean_value cannot both be given")
        self.mean = None
        if param.mean_file:
            self.mean = load_mean_file(param.mean_file, self.item_shape, error)
        elif len(param.mean_value):
            if len(param.mean_value) not in (1, channels):
                raise error(f"transform_param.mean_value: {len(param.mean_value)} values for "
                            f"{channels} channels; give one value, or one per channel")
            values = np.broadcast_to(np.asarray(param.mean_value, np.float32), (channels,))
            self.mean = np.ascontiguousarray(values).reshape(channels, 1, 1)

    @property
    def output_shape(self):
        channels, height, width = self.item_shape
        if self.crop_size:
            return channels, self.crop_size, self.crop_size
        return channels, height, width

    def draw(self, rng, count):
        """The random choices for ``count`` images, drawn from ``rng`` in a fixed order."""
        _, height, width = self.item_shape
        flips = rng.random(count) < 0.5 if self.mirror else np.zeros(count, dtype=bool)
        if self.crop_size and self.random_crop:
            rows = rng.integers(0, height - self.crop_size + 1, count)
            cols = rng.integers(0, width - self.crop_size + 1, count)
        elif self.crop_size:
            rows = np.full(count, (height - self.crop_size) // 2)
            cols = np.full(count, (width - self.crop_size) // 2)
        else:
            rows = cols = np.zeros(count, dtype=np.int64)
        return Augmentation(rows, cols, flips)

    def apply(self, images, out, augmentation):
        """Writes the transformed ``images`` into ``out`` (float, [N, *output_shape])."""
        if self.crop_size:
            out[...] = _crops(images, augmentation, self.crop_size)
            if self.mean is not None:
                out -= self._mean_crops(augmentation)
        else:
            out[...] = images
            if self.mean is not None:
                out -= self.mean
        if augmentation.flips.any():
            out[augmentation.flips] = out[augmentation.flips, :, :, ::-1]
        if self.scale != 1:
            out *= self.scale

    def transform(self, images, out, rng):
        self.apply(images, out, self.draw(rng, len(images)))

    def _mean_crops(self, augmentation):
        if self.mean.shape[1:] == (1, 1):
            return self.mean
        return _crops(self.mean[np.newaxis], augmentation, self.crop_size, same_image=True)


def _crops(images, augmentation, size, same_image=False):
    """Image i cropped at (row_offsets[i], col_offsets[i]), [N, C, size, size], without a Python loop."""
    # windows[n, c, r, q] is the size x size window of image n, channel c whose corner is (r, q).
    windows = sliding_window_view(images, (size, size), axis=(2, 3))
    which = np.zeros_like(augmentation.row_offsets) if same_image else np.arange(len(images))
    return windows[which, :, augmentation.row_offsets, augmentation.col_offsets]


def load_mean_file(path, item_shape, error=DataError):
    """A mean image (BlobProto .binaryproto, as Caffe's compute_image_mean writes) as float32 [C,H,W]."""
    try:
        with open(path, "rb") as f:
            proto = pb.BlobProto.FromString(f.read())
    except OSError as exc:
        raise error(f"transform_param.mean_file '{path}': cannot read: {exc.strerror}") from None
    except DecodeError:
        raise error(f"transform_param.mean_file '{path}': not a BlobProto (.binaryproto) file") from None
    blob = Blob(name=path)
    try:
        blob.from_proto(proto, what=f"transform_param.mean_file '{path}'")
    except MinicaffeError as exc:
        raise error(str(exc)) from None
    shape = blob.shape[1:] if len(blob.shape) == 4 and blob.shape[0] == 1 else blob.shape
    if tuple(shape) != tuple(item_shape):
        raise error(f"transform_param.mean_file '{path}': the mean is {tuple(blob.shape)}, the data is "
                    f"{tuple(item_shape)} (channels, height, width)")
    return blob.data.reshape(item_shape).astype(np.float32)
