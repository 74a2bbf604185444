"""Python layers for tests/test_python_layer.py, written the way a pycaffe user writes them: the
only change from a pycaffe module is ``import minicaffe as caffe`` in place of ``import caffe``."""
import ast

import numpy as np

import minicaffe as caffe


class EuclideanLossLayer(caffe.Layer):
    """sum((bottom[0] - bottom[1])^2) / (2 N) in a (1,)-shaped top, like Caffe's EuclideanLoss."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("needs two bottoms: predictions and targets")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise ValueError(f"the bottoms must have the same count, got {bottom[0].count} and {bottom[1].count}")
        self.difference = np.zeros_like(bottom[0].data)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.difference[...] = bottom[0].data - bottom[1].data.reshape(bottom[0].data.shape)
        top[0].data[0] = np.sum(self.difference ** 2) / bottom[0].num / 2.0

    def backward(self, top, propagate_down, bottom):
        for i, sign in enumerate((1.0, -1.0)):
            if propagate_down[i]:
                # top[0].diff holds the loss weight, so loss_weight in the prototxt scales this gradient.
                scale = sign * top[0].diff[0] / bottom[i].num
                bottom[i].diff[...] = scale * self.difference.reshape(bottom[i].data.shape)


class ChannelScaleLayer(caffe.Layer):
    """top[n, c, ...] = s[c] * bottom[n, c, ...] with a learnable scale s; param_str: "{'init': value}"."""

    def setup(self, bottom, top):
        if len(bottom[0].shape) < 2:
            raise self.error(f"needs a channel axis, got a bottom of shape {bottom[0].shape}")
        params = ast.literal_eval(self.param_str) if self.param_str else None
        if not isinstance(params, dict) or "init" not in params:
            raise ValueError(f"param_str must be a dict with an 'init' value, got {self.param_str!r}")
        self.blobs.add_blob(bottom[0].channels)
        self.blobs[0].data[...] = float(params["init"])

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def _scale(self, ndim):
        return self.blobs[0].data.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data * self._scale(bottom[0].data.ndim)

    def backward(self, top, propagate_down, bottom):
        summed_axes = (0,) + tuple(range(2, top[0].data.ndim))
        self.blobs[0].diff[...] += np.sum(top[0].diff * bottom[0].data, axis=summed_axes)
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * self._scale(top[0].data.ndim)


class MeanLoss(caffe.Layer):
    """The mean of bottom[0]; a loss without loss_weight in the prototxt because it sets is_loss."""

    is_loss = True

    def reshape(self, bottom, top):
        top[0].reshape(())

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data.mean()

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff / bottom[0].count


class Doubler:
    """Not a minicaffe.Layer subclass: accepted because it defines the four methods."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = 2 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 2 * top[0].diff


class ForwardFails(caffe.Layer):
    def reshape(self, bottom, top):
        top[0].reshape((bottom[0].num, bottom[0].channels, bottom[0].height, bottom[0].width))

    def forward(self, bottom, top):
        return {}["missing key"]


class NoForward(caffe.Layer):
    def reshape(self, bottom, top):
        top[0].reshape(1)


class NotALayer:
    """Has none of the methods a layer needs."""


helper_function = len
