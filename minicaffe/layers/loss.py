"""Softmax, the softmax cross-entropy loss, and the Euclidean (least-squares) loss."""
import numpy as np

from minicaffe.blob import Blob, blob_dtype
from minicaffe.errors import MinicaffeError
from minicaffe.kernels import softmax
from minicaffe.kernels.parallel import num_threads
from minicaffe.layer import Layer, register
from minicaffe.proto import minicaffe_pb2 as pb

NORM = pb.LossParameter


def _class_axis(layer, blob, axis):
    """(outer, channels, inner) of ``blob`` around ``axis``, with errors naming the layer."""
    try:
        axis = blob.canonical_axis(axis)
    except MinicaffeError as e:
        raise layer.error(f"softmax_param.axis: {e}") from None
    return blob.count_range(0, axis), blob.shape[axis], blob.count_range(axis + 1)


@register("Softmax")
class SoftmaxLayer(Layer):
    """Softmax over ``softmax_param.axis`` (default 1, the channels), computed stably."""

    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        self.dims = _class_axis(self, bottom[0], self.param.softmax_param.axis)
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        softmax.softmax_forward(bottom[0].data.reshape(self.dims), top[0].data.reshape(self.dims),
                                num_threads())

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            softmax.softmax_backward(top[0].data.reshape(self.dims), top[0].diff.reshape(self.dims),
                                     bottom[0].diff.reshape(self.dims), num_threads())


@register("SoftmaxWithLoss")
class SoftmaxWithLossLayer(Layer):
    """Mean cross-entropy of softmax(bottom[0]) against the integer labels in bottom[1].

    The loss is normalized as loss_param.normalization says (VALID by default); labels equal to
    loss_param.ignore_label add neither loss nor gradient. A second top receives the probabilities.
    """

    exact_num_bottom = 2
    min_top = 1
    max_top = 2
    is_loss = True
    no_backward_bottoms = (1,)

    def setup(self, bottom, top):
        p = self.param.loss_param
        self.has_ignore = p.HasField("ignore_label")
        self.ignore_label = p.ignore_label
        if p.HasField("normalization") or not p.HasField("normalize"):
            self.normalization = p.normalization
        else:
            # The deprecated bool, as Caffe reads it when normalization is unset.
            self.normalization = NORM.VALID if p.normalize else NORM.BATCH_SIZE
        with blob_dtype(bottom[0].dtype):
            self.prob = Blob(name=f"{self.name}.prob")
        self.valid_count = 0

    def reshape(self, bottom, top):
        scores, labels = bottom
        if scores.num_axes and labels.num_axes and scores.shape[0] != labels.shape[0]:
            raise self.error(f"predictions {scores.shape} and labels {labels.shape} differ in their "
                             f"first dimension")
        self.dims = _class_axis(self, scores, self.param.softmax_param.axis)
        outer, _, inner = self.dims
        if outer * inner != labels.count:
            raise self.error(f"needs one label per prediction: {outer * inner} for predictions of shape "
                             f"{scores.shape}, got {labels.count} (labels shape {labels.shape})")
        self.prob.reshape(scores.shape)
        top[0].reshape(())
        if len(top) > 1:
            top[1].share_data(self.prob)
            top[1].reshape(scores.shape)

    def _labels(self, bottom):
        return bottom[1].data.reshape(self.dims[0], self.dims[2])

    def _normalizer(self, valid_count):
        outer, _, inner = self.dims
        if self.normalization == NORM.FULL:
            normalizer = outer * inner
        elif self.normalization == NORM.VALID:
            normalizer = valid_count
        elif self.normalization == NORM.BATCH_SIZE:
            normalizer = outer
        else:
            normalizer = 1
        # Caffe never divides by less than one, so an all-ignored batch gives loss 0, not NaN.
        return max(1.0, float(normalizer))

    def forward(self, bottom, top):
        prob = self.prob.data.reshape(self.dims)
        softmax.softmax_forward(bottom[0].data.reshape(self.dims), prob, num_threads())
        loss, valid, bad = softmax.softmax_loss_forward(
            prob, self._labels(bottom), self.ignore_label, self.has_ignore, num_threads())
        if bad >= 0:
            value = bottom[1].data.reshape(-1)[bad]
            raise self.error(f"label {value:g} (at position {bad}) is out of range: the predictions "
                             f"have {self.dims[1]} classes, so labels must be in [0, {self.dims[1] - 1}]")
        self.valid_count = valid
        top[0].data[...] = loss / self._normalizer(valid)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            raise self.error("cannot back-propagate to the labels (bottom 1)")
        if not propagate_down[0]:
            return
        # top[0].diff holds the loss weight the net assigned to this loss.
        scale = float(top[0].diff.reshape(-1)[0]) / self._normalizer(self.valid_count)
        softmax.softmax_loss_backward(self.prob.data.reshape(self.dims), self._labels(bottom),
                                      bottom[0].diff.reshape(self.dims), self.ignore_label,
                                      self.has_ignore, scale, num_threads())


@register("EuclideanLoss")
class EuclideanLossLayer(Layer):
    """sum((bottom[0] - bottom[1])^2) / (2 N), with N the batch size; both bottoms get gradients."""

    exact_num_bottom = 2
    exact_num_top = 1
    is_loss = True

    def reshape(self, bottom, top):
        if bottom[0].count_range(1) != bottom[1].count_range(1):
            raise self.error(f"the two bottoms must have the same size per example, got shapes "
                             f"{bottom[0].shape} and {bottom[1].shape}")
        top[0].reshape(())
        if getattr(self, "difference", None) is None or self.difference.shape != bottom[0].shape:
            self.difference = np.empty(bottom[0].shape, dtype=bottom[0].dtype)

    def forward(self, bottom, top):
        np.subtract(bottom[0].data, bottom[1].data.reshape(bottom[0].shape), out=self.difference)
        flat = self.difference.reshape(-1)
        top[0].data[...] = np.dot(flat, flat) / bottom[0].shape[0] / 2

    def backward(self, top, propagate_down, bottom):
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                alpha = sign * float(top[0].diff) / bottom[i].shape[0]
                np.multiply(self.difference.reshape(bottom[i].shape), alpha, out=bottom[i].diff)
