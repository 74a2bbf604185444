"""Normalization layers, as Caffe's: LRN, BatchNorm, and the Scale and Bias layers that give
BatchNorm its affine part (kernels in minicaffe/kernels/lrn.pyx and batchnorm.pyx)."""
import math

import numpy as np

from minicaffe.errors import MinicaffeError
from minicaffe.kernels import batchnorm, lrn
from minicaffe.kernels.parallel import num_threads
from minicaffe.layer import Layer, register
from minicaffe.proto import minicaffe_pb2 as pb


def _reuse(array, shape, dtype):
    """``array`` when it already has this shape and dtype, else a new one (reshape never allocates
    when shapes are unchanged)."""
    if array is not None and array.shape == tuple(shape) and array.dtype == dtype:
        return array
    return np.zeros(shape, dtype)


@register("LRN")
class LRNLayer(Layer):
    """Local response normalization: y = x * scale^-beta.

    ACROSS_CHANNELS: scale = k + alpha / local_size * (sum of x^2 over local_size neighbouring
    channels). WITHIN_CHANNEL: scale = 1 + alpha / local_size^2 * (sum of x^2 over a
    local_size x local_size square, zero padded); Caffe composes this from Power, Pooling and
    Eltwise layers, which give it no k, and so does this layer. It cannot run in place: its
    backward pass reads both its input and its output.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.param.lrn_param
        self.size = p.local_size
        if self.size % 2 == 0:
            raise self.error(f"local_size must be odd, got {self.size}")
        self.alpha, self.beta, self.k = p.alpha, p.beta, p.k
        self.across_channels = p.norm_region == pb.LRNParameter.ACROSS_CHANNELS
        self.scale = None

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"needs a 4-D bottom (num, channels, height, width), got shape {bottom[0].shape}")
        if bottom[0] is top[0]:
            raise self.error(f"cannot run in place (top '{top[0].name}' is its bottom): its backward pass "
                             f"reads both its input and its output")
        top[0].reshape(bottom[0].shape)
        self.scale = _reuse(self.scale, bottom[0].shape, bottom[0].dtype)

    def _planes(self, array):
        return array.reshape(-1, array.shape[2], array.shape[3])

    def forward(self, bottom, top):
        x, y = bottom[0].data, top[0].data
        if self.across_channels:
            lrn.lrn_across_forward(x, y, self.scale, self.size, self.alpha, self.beta, self.k, num_threads())
        else:
            lrn.lrn_within_forward(self._planes(x), self._planes(y), self._planes(self.scale), self.size,
                                   self.alpha, self.beta, num_threads())

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x, y, dy, dx = bottom[0].data, top[0].data, top[0].diff, bottom[0].diff
        if self.across_channels:
            lrn.lrn_across_backward(x, y, self.scale, dy, dx, self.size, self.alpha, self.beta, self.k,
                                    num_threads())
        else:
            planes = self._planes
            lrn.lrn_within_backward(planes(x), planes(y), planes(self.scale), planes(dy), planes(dx),
                                    self.size, self.alpha, self.beta, num_threads())


@register("BatchNorm")
class BatchNormLayer(Layer):
    """Normalizes each channel (axis 1) to zero mean and unit variance; no affine part (that is
    the Scale layer's).

    The blobs are Caffe's: running sums of the batch means [C] and of the bias-corrected batch
    variances [C], and their weight [1]. Each TRAIN forward with batch statistics multiplies all
    three by moving_average_fraction and adds the batch's values (weight 1); the estimates are the
    sums divided by the weight. With use_global_stats (the default in TEST) those estimates
    normalize instead. The blobs are statistics, never learned: like Caffe, setup gives them
    lr_mult 0 (and refuses any other), and backward leaves their diffs alone.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.param.batch_norm_param
        self.use_global_stats = p.use_global_stats if p.HasField("use_global_stats") else self.phase == pb.TEST
        self.moving_average_fraction = p.moving_average_fraction
        self.eps = p.eps
        if bottom[0].num_axes < 1:
            raise self.error(f"needs a bottom with a batch axis, got shape {bottom[0].shape}")
        self.channels = 1 if bottom[0].num_axes == 1 else bottom[0].shape[1]
        self.blobs = [self.new_param_blob((self.channels,), "mean"),
                      self.new_param_blob((self.channels,), "variance"),
                      self.new_param_blob((1,), "scale_factor")]
        self._freeze_statistics()
        # Per-channel statistics: the batch's in double; what normalizes, in the blobs' dtype.
        self.mean = np.zeros(self.channels)
        self.variance = np.zeros(self.channels)
        self.center = np.zeros(self.channels, self.blobs[0].dtype)
        self.inv_std = np.zeros(self.channels, self.blobs[0].dtype)
        self.x_norm = None

    def _freeze_statistics(self):
        specs = self.param.param
        for j in range(len(self.blobs)):
            if j == len(specs):
                specs.add().lr_mult = 0
            elif specs[j].lr_mult != 0:
                raise self.error(f"param {j} has lr_mult {specs[j].lr_mult:g}: the mean, variance and scale "
                                 f"factor are statistics, not learned (give lr_mult: 0, or no param)")

    def _layout(self, shape):
        num = shape[0]
        spatial = math.prod(shape[2:])
        return (num, self.channels, spatial)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        channels = 1 if len(shape) == 1 else (shape[1] if shape else None)
        if channels != self.channels:
            raise self.error(f"bottom shape {shape} has {channels} channels (axis 1), the statistics "
                             f"{self.channels}")
        top[0].reshape(shape)
        if not self.use_global_stats:
            self.x_norm = _reuse(self.x_norm, self._layout(shape), bottom[0].dtype)

    def forward(self, bottom, top):
        layout = self._layout(bottom[0].shape)
        x, y = bottom[0].data.reshape(layout), top[0].data.reshape(layout)
        if self.use_global_stats:
            self._global_estimates()
            batchnorm.channel_affine(x, self.center, self.inv_std, None, y, None, num_threads())
            return
        batchnorm.batch_norm_forward(x, y, self.x_norm, self.mean, self.variance, self.inv_std, self.eps,
                                     num_threads())
        self._update_running_sums(layout[0] * layout[2])

    def _global_estimates(self):
        """center = the mean estimate, inv_std = 1 / sqrt(the variance estimate + eps)."""
        weight = float(self.blobs[2].data[0])
        factor = 0.0 if weight == 0 else 1.0 / weight
        np.multiply(self.blobs[0].data, factor, out=self.center, casting="same_kind")
        # self.variance serves as scratch here: only batch statistics keep it.
        np.multiply(self.blobs[1].data, factor, out=self.variance)
        self.variance += self.eps
        np.sqrt(self.variance, out=self.variance)
        np.divide(1.0, self.variance, out=self.inv_std, casting="same_kind")

    def _update_running_sums(self, values_per_channel):
        mean, variance, weight = (b.data for b in self.blobs)
        fraction = self.moving_average_fraction
        weight *= fraction
        weight += 1
        mean *= fraction
        np.add(mean, self.mean, out=mean, casting="same_kind")
        # Caffe accumulates the unbiased variance, m / (m - 1) times the batch's.
        m = values_per_channel
        correction = m / (m - 1) if m > 1 else 1.0
        variance *= fraction
        self.variance *= correction
        np.add(variance, self.variance, out=variance, casting="same_kind")

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        layout = self._layout(bottom[0].shape)
        dy, dx = top[0].diff.reshape(layout), bottom[0].diff.reshape(layout)
        if self.use_global_stats:
            batchnorm.channel_affine(dy, None, self.inv_std, None, dx, None, num_threads())
        else:
            batchnorm.batch_norm_backward(dy, self.x_norm, self.inv_std, dx, num_threads())


# -- Scale and Bias --------------------------------------------------------------------------------

def _axis(layer, bottom, axis):
    try:
        return bottom.canonical_axis(axis)
    except MinicaffeError:
        raise layer.error(f"axis {axis} is out of range for bottom shape {bottom.shape}") from None


def _learned_operand_shape(layer, bottom, axis, num_axes):
    """The shape of a learned scale or bias: bottom's dimensions from ``axis``, ``num_axes`` of them
    (-1: through the last)."""
    axis = _axis(layer, bottom, axis)
    if num_axes < -1:
        raise layer.error(f"num_axes must be non-negative, or -1 to extend to the end of bottom[0]; "
                          f"got {num_axes}")
    end = bottom.num_axes if num_axes == -1 else axis + num_axes
    if end > bottom.num_axes:
        raise layer.error(f"axis {axis} with num_axes {num_axes} extends past bottom shape {bottom.shape}")
    return bottom.shape[axis:end]


def _broadcast_layout(layer, bottom, operand_shape, axis, what):
    """(outer, operand count, inner) for an operand that matches bottom's dimensions from ``axis``.

    A scalar operand uses axis 0, as Caffe does: any axis gives the same result.
    """
    axis = 0 if not operand_shape else _axis(layer, bottom, axis)
    end = axis + len(operand_shape)
    if tuple(bottom.shape[axis:end]) != tuple(operand_shape):
        raise layer.error(f"{what} shape {tuple(operand_shape)} does not match bottom shape {bottom.shape} "
                          f"from axis {axis}")
    return (bottom.count_range(0, axis), int(np.prod(operand_shape, dtype=np.int64)), bottom.count_range(end))


@register("Scale")
class ScaleLayer(Layer):
    """y = x * scale (+ bias), the scale broadcast over x's dimensions outside [axis, axis + its
    axes).

    With one bottom the scale is learned, of shape x.shape[axis : axis + num_axes] (num_axes -1:
    through the last axis), filled by ``filler`` (default: constant 1). With two, bottom[1] is the
    scale. ``bias_term`` adds a learned bias of the scale's shape (``bias_filler``, default 0).
    In place, the layer keeps a copy of its input for the scale gradient (none when a net runs it
    fused after a BatchNorm: see BatchNormChain).
    """

    min_bottom = 1
    max_bottom = 2
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.param.scale_param
        self.blobs = []
        if len(bottom) == 1:
            shape = _learned_operand_shape(self, bottom[0], p.axis, p.num_axes)
            filler = p.filler if p.HasField("filler") else pb.FillerParameter(type="constant", value=1)
            self.blobs.append(self.new_filled_blob(shape, "scale", filler, "filler"))
        self.bias_term = p.bias_term
        if self.bias_term:
            num_axes = p.num_axes if len(bottom) == 1 else bottom[1].num_axes
            shape = _learned_operand_shape(self, bottom[0], p.axis, num_axes)
            self.blobs.append(self.new_filled_blob(shape, "bias", p.bias_filler, "bias_filler"))
        # In place, the input as forward saw it, for the scale's gradient: the layer's own copy, or
        # the x_norm of a BatchNorm run fused with it (the same values).
        self.saved = None
        self.input_copy = None

    def _scale(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        axis = self.param.scale_param.axis
        self.layout = _broadcast_layout(self, bottom[0], self._scale(bottom).shape, axis, "scale")
        if self.bias_term and _broadcast_layout(self, bottom[0], self.blobs[-1].shape, axis, "bias") != self.layout:
            raise self.error(f"bias shape {self.blobs[-1].shape} does not match scale shape "
                             f"{self._scale(bottom).shape}")
        if bottom[0] is not top[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        x, y = bottom[0].data.reshape(self.layout), top[0].data.reshape(self.layout)
        bias = self.blobs[-1].data.reshape(-1) if self.bias_term else None
        if bottom[0] is top[0]:
            # Allocated at the first in-place forward, not in reshape: after a BatchNorm that the
            # net runs fused with this layer (BatchNormChain), the copy is never needed.
            self.saved = _reuse(self.saved, self.layout, bottom[0].dtype)
            self.input_copy = self.saved
        batchnorm.channel_affine(x, None, self._scale(bottom).data.reshape(-1), bias, y,
                                 self.input_copy if bottom[0] is top[0] else None, num_threads())

    def backward(self, top, propagate_down, bottom):
        scale = self._scale(bottom)
        if len(bottom) == 1:
            scale_diff = scale.diff.reshape(-1) if self.param_propagate_down[0] else None
        elif propagate_down[1]:
            # A bottom's diff is overwritten, a parameter's accumulated: clear, then let it add.
            scale.diff[...] = 0
            scale_diff = scale.diff.reshape(-1)
        else:
            scale_diff = None
        learn_bias = self.bias_term and self.param_propagate_down[-1]
        bias_diff = self.blobs[-1].diff.reshape(-1) if learn_bias else None
        x = self.input_copy if bottom[0] is top[0] else bottom[0].data.reshape(self.layout)
        batchnorm.scale_backward(top[0].diff.reshape(self.layout), x, scale.data.reshape(-1),
                                 bottom[0].diff.reshape(self.layout) if propagate_down[0] else None,
                                 scale_diff, bias_diff, num_threads())


@register("Bias")
class BiasLayer(Layer):
    """y = x + bias, the bias broadcast as Scale's scale is: learned (shape from axis and num_axes,
    filled by ``filler``, default 0) with one bottom, bottom[1] with two."""

    min_bottom = 1
    max_bottom = 2
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.param.bias_param
        self.blobs = []
        if len(bottom) == 1:
            shape = _learned_operand_shape(self, bottom[0], p.axis, p.num_axes)
            self.blobs.append(self.new_filled_blob(shape, "bias", p.filler, "filler"))

    def _bias(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        self.layout = _broadcast_layout(self, bottom[0], self._bias(bottom).shape, self.param.bias_param.axis,
                                        "bias")
        if bottom[0] is not top[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        batchnorm.channel_affine(bottom[0].data.reshape(self.layout), None, None,
                                 self._bias(bottom).data.reshape(-1), top[0].data.reshape(self.layout), None,
                                 num_threads())

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.layout)
        if len(bottom) == 1:
            if self.param_propagate_down[0]:
                batchnorm.channel_sums(dy, self.blobs[0].diff.reshape(-1), num_threads())
        elif propagate_down[1]:
            bottom[1].diff[...] = 0
            batchnorm.channel_sums(dy, bottom[1].diff.reshape(-1), num_threads())
        if propagate_down[0] and bottom[0] is not top[0]:
            np.copyto(bottom[0].diff, top[0].diff)


# -- BatchNorm -> Scale (-> ReLU) as one pass ------------------------------------------------------

class BatchNormChain:
    """A BatchNorm with batch statistics, the Scale right after it and optionally a ReLU after that,
    all in place on one blob, which a net runs as one kernel forward and one backward
    (``find_batch_norm_chains``): one read of the blob and two writes forward instead of three reads
    and five writes; two reads (the gradient and x_norm) and a write backward instead of six reads
    and three writes.

    An execution detail only: the layers, their blobs and parameters stay as they are, the results
    equal running them one by one (within float rounding), and each layer's own forward and backward
    still work alone (a net runs them so for a range that cuts a chain). Forward leaves the Scale's
    input where the Scale's own backward expects it, the BatchNorm's x_norm being exactly that.
    """

    def __init__(self, first, blob, batch_norm, scale, relu):
        self.first = first
        self.last = first + (2 if relu is not None else 1)
        self.blob = blob
        self.batch_norm, self.scale, self.relu = batch_norm, scale, relu
        self.negative_slope = relu.negative_slope if relu is not None else 0.0
        self.fuses_backward = True

    def _layout(self):
        """The (num, channels, spatial) view both layers use, or None when a reshape made the Scale's
        differ from the BatchNorm's (then the layers run one by one)."""
        layout = self.batch_norm._layout(self.blob.shape)
        return layout if self.scale.layout == layout else None

    def _layers(self):
        return [layer for layer in (self.batch_norm, self.scale, self.relu) if layer is not None]

    def forward(self):
        """Runs the chain's layers forward, as Net.forward_layers would one by one."""
        blob, layout = self.blob, self._layout()
        if layout is None:
            for layer in self._layers():
                layer.forward([blob], [blob])
            return
        bn, scale = self.batch_norm, self.scale
        x = blob.data.reshape(layout)
        shift = scale.blobs[-1].data.reshape(-1) if scale.bias_term else None
        batchnorm.batch_norm_forward(x, x, bn.x_norm, bn.mean, bn.variance, bn.inv_std, bn.eps, num_threads(),
                                     scale=scale.blobs[0].data.reshape(-1), shift=shift,
                                     relu=self.relu is not None, negative_slope=self.negative_slope)
        bn._update_running_sums(layout[0] * layout[2])
        scale.input_copy = bn.x_norm

    def backward(self):
        """Runs the chain's layers backward, as Net.backward_layers would one by one."""
        blob, layout = self.blob, self._layout()
        if layout is None:
            for layer in reversed(self._layers()):
                layer.backward([blob], [True], [blob])
            return
        bn, scale = self.batch_norm, self.scale
        learn = scale.param_propagate_down
        dy = blob.diff.reshape(layout)
        batchnorm.batch_norm_backward(
            dy, bn.x_norm, bn.inv_std, dy, num_threads(), scale=scale.blobs[0].data.reshape(-1),
            shift=scale.blobs[-1].data.reshape(-1) if scale.bias_term else None,
            scale_diff=scale.blobs[0].diff.reshape(-1) if learn[0] else None,
            shift_diff=scale.blobs[-1].diff.reshape(-1) if scale.bias_term and learn[-1] else None,
            relu=self.relu is not None, negative_slope=self.negative_slope)


def find_batch_norm_chains(layers, bottom_vecs, top_vecs, layer_need_backward, bottom_need_backward):
    """The BatchNormChains among a net's layers (lists indexed by layer, as Net keeps them).

    A chain is a BatchNorm using batch statistics, in place on blob B, then a Scale with a learned
    per-channel scale in place on B, then optionally a ReLU (negative_slope >= 0) in place on B,
    consecutive. Its backward is fused only where every member runs backward into B (otherwise each
    layer runs its own).
    """
    from minicaffe.layers.activation import ReLULayer

    def in_place_on(i, blob):
        return (i < len(layers) and len(bottom_vecs[i]) == 1 and len(top_vecs[i]) == 1
                and bottom_vecs[i][0] is blob and top_vecs[i][0] is blob)

    chains = []
    i = 0
    while i < len(layers):
        bn = layers[i]
        blob = bottom_vecs[i][0] if len(bottom_vecs[i]) == 1 else None
        starts_chain = (type(bn) is BatchNormLayer and not bn.use_global_stats and in_place_on(i, blob)
                        and in_place_on(i + 1, blob) and type(layers[i + 1]) is ScaleLayer
                        and layers[i + 1].layout == bn._layout(blob.shape))
        if not starts_chain:
            i += 1
            continue
        # In place, ReLU's backward masks by the sign of its output: the sign of its input only for a
        # slope >= 0, and the fused backward uses the input.
        relu = layers[i + 2] if in_place_on(i + 2, blob) and type(layers[i + 2]) is ReLULayer and \
            layers[i + 2].negative_slope >= 0 else None
        chain = BatchNormChain(i, blob, bn, layers[i + 1], relu)
        members = range(chain.first, chain.last + 1)
        chain.fuses_backward = all(layer_need_backward[j] and bottom_need_backward[j][0] for j in members)
        chains.append(chain)
        i = chain.last + 1
    return chains
