"""MemoryData: batches from NumPy arrays that the caller hands over, as Caffe's MemoryDataLayer.

``reset(data, labels)`` is Caffe's ``MemoryDataLayer::Reset`` (pycaffe's ``net.set_input_arrays``):
the layer keeps the arrays themselves, not a copy, so later writes into them show in later batches,
and each forward copies the next ``batch_size`` rows into the tops, wrapping around at the end.

As in Caffe, arrays given to ``reset`` are used as they are, and transform_param applies only to
images given to ``add_images`` (Caffe's ``AddMatVector``/``AddDatumVector``): those are transformed
(mean, crop, mirror, scale) into an array the layer owns, which then serves batches as above.
"""
import numpy as np

from .. import rng
from ..data.transformer import DataTransformer
from ..layer import Layer, register
from ..log import get_logger


@register("MemoryData")
class MemoryDataLayer(Layer):
    """Tops: data [batch_size, channels, height, width] and label [batch_size]."""

    exact_num_bottom = 0
    exact_num_top = 2

    def setup(self, bottom, top):
        param = self.param.memory_data_param
        self.batch_size = param.batch_size
        self.item_shape = (param.channels, param.height, param.width)
        if self.batch_size == 0 or 0 in self.item_shape:
            raise self.error("memory_data_param: batch_size, channels, height and width must all be set "
                             "to positive numbers")
        self._data = None
        self._labels = None
        self._next_batch = 0
        self._augmentation_rng = np.random.default_rng(rng.derive_seed())
        self._transformers = {}
        self._warned_untransformed = False

    def reshape(self, bottom, top):
        top[0].reshape((self.batch_size,) + self.item_shape)
        top[1].reshape((self.batch_size,))

    def forward(self, bottom, top):
        if self._data is None:
            raise self.error("has no data yet: call reset(data, labels) (pycaffe: net.set_input_arrays) "
                             "or add_images(images, labels) first")
        # The row count is a multiple of batch_size, so a batch never wraps in its middle.
        start = self._next_batch * self.batch_size % len(self._data)
        top[0].data[...] = self._data[start:start + self.batch_size]
        top[1].data[...] = self._labels[start:start + self.batch_size]
        self._next_batch += 1

    # -- feeding -----------------------------------------------------------------------------------
    def reset(self, data, labels):
        """Serves batches from ``data`` [N, C, H, W] and ``labels`` [N] (or [N, 1, 1, 1]), both
        float32 and C-contiguous, N a positive multiple of batch_size; the next batch is rows 0..."""
        if self._has_transformation() and not self._warned_untransformed:
            self._warned_untransformed = True
            get_logger().warning(f"layer '{self.name}' (MemoryData): transform_param is not applied to "
                                 "arrays given to reset/set_input_arrays (as in Caffe); use add_images")
        # The checks pycaffe's set_input_arrays makes, except that labels may also be 1-D.
        self._check_buffer(data, "data")
        self._check_buffer(labels, "labels")
        if data.ndim != 4 or data.shape[1:] != self.item_shape:
            raise self.error(f"data array must be [N, {', '.join(map(str, self.item_shape))}] as "
                             f"memory_data_param says, got shape {data.shape}")
        if labels.ndim == 0 or labels.shape[1:] not in ((), (1, 1, 1)):
            raise self.error(f"labels array must be [N] or [N, 1, 1, 1], got shape {labels.shape}")
        self._check_rows(len(data), len(labels))
        self._serve(data, labels.reshape(-1))

    def add_images(self, images, labels):
        """Transforms ``images`` [N, C, H', W'] (uint8 or float) by transform_param into the layer's
        [C, H, W] and serves batches from them, as Caffe's AddMatVector; N a multiple of batch_size."""
        images = np.asarray(images)
        labels = np.ascontiguousarray(labels, dtype=np.float32).reshape(-1)
        if images.ndim != 4 or images.shape[1] != self.item_shape[0]:
            raise self.error(f"add_images takes [N, {self.item_shape[0]}, height, width] images, got "
                             f"shape {images.shape}")
        transformer = self._transformer(images.shape[1:])
        if transformer.output_shape != self.item_shape:
            raise self.error(f"transform_param turns {images.shape[1:]} images into "
                             f"{transformer.output_shape}, but memory_data_param says {self.item_shape}")
        self._check_rows(len(images), len(labels))
        data = np.empty((len(images),) + self.item_shape, np.float32)
        transformer.apply(images, data, transformer.draw(self._augmentation_rng, len(images)))
        self._serve(data, labels)

    # -- position (resuming) -----------------------------------------------------------------------
    @property
    def position(self):
        """The number of the batch the next forward produces (counted from the last reset)."""
        return self._next_batch

    def set_position(self, batch_index):
        self._next_batch = batch_index

    # -- helpers -----------------------------------------------------------------------------------
    def _serve(self, data, labels):
        self._data, self._labels = data, labels
        self._next_batch = 0

    def _check_buffer(self, array, what):
        if not isinstance(array, np.ndarray):
            raise self.error(f"{what} must be a NumPy array, got {type(array).__name__}")
        if array.dtype != np.float32:
            raise self.error(f"{what} array must be float32, got {array.dtype}")
        if not array.flags.c_contiguous:
            raise self.error(f"{what} array must be C contiguous (use np.ascontiguousarray)")

    def _check_rows(self, num_data, num_labels):
        if num_data != num_labels:
            raise self.error(f"data and labels must have the same first dimension, got {num_data} "
                             f"and {num_labels}")
        if num_data == 0 or num_data % self.batch_size:
            raise self.error(f"the first dimension of the input arrays ({num_data}) must be a positive "
                             f"multiple of batch_size ({self.batch_size})")

    def _has_transformation(self):
        return self.param.transform_param.ListFields() != []

    def _transformer(self, item_shape):
        transformer = self._transformers.get(item_shape)
        if transformer is None:
            transformer = DataTransformer(self.param.transform_param, self.phase, item_shape,
                                          error=self.error)
            self._transformers[item_shape] = transformer
        return transformer
