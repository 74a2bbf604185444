"""ImageData: batches of image files listed in a text file of ``path label`` lines, as Caffe's
ImageDataLayer.

Images are decoded with Pillow (an optional dependency: ``pip install Pillow``) into the layout that
Caffe gets from OpenCV: color images (``is_color``, the default) as 3 channels in BGR order, others
as one channel of luma (0.299 R + 0.587 G + 0.114 B in both libraries); an alpha channel is dropped.
With ``new_height`` and ``new_width`` each image is resized with OpenCV's INTER_LINEAR conventions
(pixel centers at half-integers, edge pixels repeated, no antialiasing when shrinking), so the pixels
match what Caffe feeds to within rounding. The uint8 images then go through transform_param.

Order, ``shuffle``, ``rand_skip``, augmentation, ``set_position`` and ``set_shard`` are the Data
layer's: batch b is a pure function of (seed, b). As in Caffe, ``root_folder`` is prefixed to each
listed path as is (end it with '/'). Unlike Caffe, which lets the image size change from batch to
batch, every image must have the size of the first; set new_height and new_width when they differ.
"""
import os

import numpy as np

from ..data import read_list_file
from ..data.prefetch import RecordSchedule
from ..errors import DataError
from ..layer import register
from ..proto import minicaffe_pb2 as pb
from .data import DataLayer

# Deprecated image_data_param fields that Caffe ignores; their transform_param namesakes work.
_MOVED_TO_TRANSFORM_PARAM = ("scale", "mean_file", "crop_size", "mirror")
_DEFAULTS = pb.ImageDataParameter()


@register("ImageData")
class ImageDataLayer(DataLayer):
    """Tops: data [batch_size, C, H, W] (after transform_param) and label [batch_size]."""

    exact_num_top = 2
    min_top = None
    max_top = None

    def _open_source(self, top):
        param = self.param.image_data_param
        for field in _MOVED_TO_TRANSFORM_PARAM:
            if getattr(param, field) != getattr(_DEFAULTS, field):
                raise self.error(f"image_data_param.{field} is deprecated and ignored by Caffe; "
                                 f"use transform_param.{field}")
        if param.batch_size == 0:
            raise self.error("image_data_param.batch_size must be a positive number")
        if bool(param.new_height) != bool(param.new_width):
            raise self.error("image_data_param: set new_height and new_width together, or neither")
        self.batch_size = param.batch_size
        source = ImageList(param, where=f"layer '{self.name}' ({self.type_name})")
        self._prepare_transform(source)
        return source

    def _new_schedule(self, rank, num_ranks):
        param = self.param.image_data_param
        return RecordSchedule(self.source.count, self.batch_size, self.seed, shuffle=param.shuffle,
                              rand_skip=param.rand_skip, rank=rank, num_ranks=num_ranks)


class ImageList:
    """The images of a list file, read by index: ``count``, ``item_shape``, ``dtype``, ``gather``."""

    dtype = np.uint8

    def __init__(self, param, where):
        self.where = where
        self._image_module = _import_pillow(where)
        self.root_folder = param.root_folder
        self.paths, self.labels = read_image_list(param.source, where)
        self.count = len(self.paths)
        self.is_color = param.is_color
        self.size = (param.new_height, param.new_width) if param.new_height else None
        # Caffe too takes the shape of the batches from an image.
        self.item_shape = self.read(0).shape

    def path(self, index):
        return self.root_folder + self.paths[index]

    def read(self, index):
        """Image ``index`` as uint8 [C, H, W], channels BGR (color) or luma (gray), resized if asked."""
        path = self.path(index)
        image_module = self._image_module
        try:
            with image_module.open(path) as image:
                pixels = np.asarray(image.convert("RGB" if self.is_color else "L"))
        except FileNotFoundError:
            hint = ""
            if self.root_folder and not self.root_folder.endswith(("/", os.sep)):
                hint = f" (root_folder '{self.root_folder}' is prefixed as is; end it with '/')"
            raise DataError(f"{self.where}: image '{path}': no such file{hint}") from None
        except (OSError, ValueError, image_module.DecompressionBombError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{self.where}: image '{path}': cannot decode it ({reason})") from None
        if self.size is not None:
            pixels = resize_bilinear(pixels, *self.size)
        if pixels.ndim == 2:
            return pixels[np.newaxis]
        return np.ascontiguousarray(pixels[:, :, ::-1].transpose(2, 0, 1))

    def gather(self, indices, images_out, labels_out):
        for slot, index in enumerate(indices):
            image = self.read(index)
            if image.shape != self.item_shape:
                raise DataError(f"{self.where}: image '{self.path(index)}' is "
                                f"{_size(image.shape)}, the first image is {_size(self.item_shape)}; set "
                                "image_data_param new_height and new_width to resize them all")
            images_out[slot] = image
            labels_out[slot] = self.labels[index]


def read_image_list(path, where):
    """The paths and integer labels of a list file; as in Caffe the label follows the last space,
    so paths may hold spaces."""
    lines = read_list_file(path, where, "image_data_param.source", "of 'path label' lines").splitlines()
    paths, labels = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name, _, label = line.rstrip().rpartition(" ")
        try:
            labels.append(int(label))
        except ValueError:
            raise DataError(f"{where}: {path}:{number}: expected 'image_path label' with an integer "
                            f"label, got {line!r}") from None
        if not name:
            raise DataError(f"{where}: {path}:{number}: expected 'image_path label', got {line!r}")
        paths.append(name)
    if not paths:
        raise DataError(f"{where}: image_data_param.source '{path}' lists no images")
    return paths, np.asarray(labels, dtype=np.float32)


def resize_bilinear(image, height, width):
    """Resizes a uint8 [H, W] or [H, W, C] image as OpenCV's ``cv::resize(..., INTER_LINEAR)``."""
    rows, next_rows, row_weights = _linear_taps(image.shape[0], height)
    cols, next_cols, col_weights = _linear_taps(image.shape[1], width)
    pixels = image.astype(np.float32)
    trailing = (1,) * (image.ndim - 2)
    row_weights = row_weights.reshape((-1, 1) + trailing)
    col_weights = col_weights.reshape((1, -1) + trailing)
    vertical = pixels[rows] * (1 - row_weights) + pixels[next_rows] * row_weights
    blended = vertical[:, cols] * (1 - col_weights) + vertical[:, next_cols] * col_weights
    return np.floor(blended + 0.5).clip(0, 255).astype(np.uint8)


def _linear_taps(source_size, target_size):
    """For each output pixel: the two source pixels it lies between and the weight of the second."""
    centers = (np.arange(target_size) + 0.5) * (source_size / target_size) - 0.5
    first = np.floor(centers).astype(np.intp)
    weights = (centers - first).astype(np.float32)
    # Outside the outermost pixel centers OpenCV repeats the edge pixel: before the first center by
    # clamping here, after the last one by blending the last pixel with itself.
    before = first < 0
    first[before], weights[before] = 0, 0
    return first, np.minimum(first + 1, source_size - 1), weights


def _size(shape):
    channels, height, width = shape
    return f"{height}x{width} with {channels} channel{'s' if channels != 1 else ''}"


def _import_pillow(where):
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{where}: reading images needs Pillow, which is not installed: "
                        "pip install Pillow") from None
    return Image
