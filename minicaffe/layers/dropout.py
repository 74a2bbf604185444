"""Dropout, as Caffe's: in TRAIN each element is kept with probability 1 - dropout_ratio and the kept
ones are scaled by 1 / (1 - dropout_ratio); in TEST the layer passes its input through.

With ``scale_train: false`` (a DropoutParameter field of some Caffe forks) the kept elements are not
scaled in TRAIN and TEST multiplies by 1 - dropout_ratio instead.

The mask of forward number b is a pure function of (the layer's seed, b): the seed is drawn from the
framework RNG at setup, so a given random_seed repeats the training run, and ``set_position(b)``
(called by Net.set_data_position when a solver resumes) makes the next forward use mask b, as an
uninterrupted run would. Backward recomputes the mask of the last forward instead of storing it.
"""
import numpy as np

from minicaffe import rng
from minicaffe.kernels import activation
from minicaffe.kernels.parallel import num_threads
from minicaffe.layer import register
from minicaffe.layers.activation import ElementwiseLayer
from minicaffe.proto import minicaffe_pb2 as pb


@register("Dropout")
class DropoutLayer(ElementwiseLayer):
    """dropout_param.dropout_ratio (default 0.5) is the probability of dropping an element."""

    def setup(self, bottom, top):
        param = self.param.dropout_param
        self.ratio = float(param.dropout_ratio)
        if not 0 <= self.ratio < 1:
            raise self.error(f"dropout_param.dropout_ratio must be in [0, 1), got {self.ratio:g}")
        # Read only where the schema has the field (it is not in BVLC's caffe.proto).
        self.scale_train = getattr(param, "scale_train", True)
        self.train_scale = 1.0 / (1.0 - self.ratio) if self.scale_train else 1.0
        self.test_scale = 1.0 if self.scale_train else 1.0 - self.ratio
        # The drop threshold on a uniform 32-bit word; exact for the float ratios a prototxt can hold.
        self.drop_below = int(round(self.ratio * 2.0**32))
        self.seed = rng.derive_seed()
        self.position = 0
        self._mask_key = None

    def set_position(self, batch_index):
        """Makes the next forward draw the mask of forward number ``batch_index``."""
        self.position = int(batch_index)

    def forward_flat(self, x, y):
        if self.phase == pb.TRAIN:
            self._mask_key = activation.dropout_key(self.seed, self.position)
            self.position += 1
            activation.dropout_apply(x, y, self._mask_key, self.drop_below, self.train_scale, num_threads())
        else:
            self._pass_through(x, y)

    def backward_flat(self, x, y, dy, dx):
        if self.phase == pb.TRAIN:
            if self._mask_key is None:
                raise self.error("backward before any forward: there is no mask to apply")
            activation.dropout_apply(dy, dx, self._mask_key, self.drop_below, self.train_scale, num_threads())
        else:
            self._pass_through(dy, dx)

    def _pass_through(self, source, target):
        if self.test_scale != 1:
            activation.affine(source, target, self.test_scale, 0.0, num_threads())
        elif not np.may_share_memory(target, source):
            np.copyto(target, source)
