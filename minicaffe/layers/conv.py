"""2-D convolution and deconvolution, as Caffe's ConvolutionLayer and DeconvolutionLayer (kernels in
minicaffe/kernels/conv.pyx)."""
import threading

import numpy as np

from minicaffe.kernels import batchnorm, conv
from minicaffe.kernels.parallel import num_threads
from minicaffe.layer import Layer, register
from minicaffe.precision import LowPrecisionConvolution, check_float32, layer_precision


class _Scratch(threading.local):
    """Scratch memory shared by every convolution run from one thread.

    Layers run one after another, so one grow-only buffer per dtype serves them all: a deep net
    needs the largest layer's workspace once instead of every layer's.
    """

    def __init__(self):
        self.buffers = {}

    def get(self, size, dtype):
        buffer = self.buffers.get(dtype)
        if buffer is None or buffer.size < size:
            buffer = self.buffers[dtype] = np.empty(max(size, 1), dtype)
        return buffer


_scratch = _Scratch()


def spatial_pair(layer, param, field, default, h_field=None, w_field=None):
    """One 2-D setting from ``field`` (repeated: one value or two) or from ``h_field``/``w_field``."""
    values = list(getattr(param, field))
    if h_field and (param.HasField(h_field) or param.HasField(w_field)):
        if values:
            raise layer.error(f"give {field} or {h_field}/{w_field}, not both")
        return getattr(param, h_field), getattr(param, w_field)
    if len(values) > 2:
        raise layer.error(f"{field} has {len(values)} values; a 2-D convolution takes one or two")
    if not values:
        if default is None:
            raise layer.error(f"needs {field}, or {h_field} and {w_field}")
        return default, default
    return (values[0], values[0]) if len(values) == 1 else tuple(values)


class _ConvolutionBase(Layer):
    """What Convolution and Deconvolution share: convolution_param, the weight and bias blobs, and
    the checks on the bottoms.

    A subclass defines ``_weight_shape(channels)``, ``_input_channels()`` (the bottom channels its
    weights take), ``_output_size(size, axis)`` and ``_workspace_for(bottom_shape, top_shape, dtype)``.
    """

    min_bottom = 1
    min_top = 1

    def setup(self, bottom, top):
        p = self.param.convolution_param
        if len(bottom) != len(top):
            raise self.error(f"needs one top per bottom, got {len(bottom)} bottoms and {len(top)} tops")
        if len(bottom[0].shape) != 4:
            raise self.error(f"needs a 4-D bottom (N, C, H, W), got shape {bottom[0].shape}; "
                             f"only 2-D convolution is supported")
        if p.axis not in (1, -3):
            raise self.error(f"axis {p.axis} is not supported; channels must be axis 1 of (N, C, H, W)")
        self.kernel = spatial_pair(self, p, "kernel_size", None, "kernel_h", "kernel_w")
        self.pad = spatial_pair(self, p, "pad", 0, "pad_h", "pad_w")
        self.stride = spatial_pair(self, p, "stride", 1, "stride_h", "stride_w")
        self.dilation = spatial_pair(self, p, "dilation", 1)
        for name, pair in (("kernel size", self.kernel), ("stride", self.stride),
                           ("dilation", self.dilation)):
            if min(pair) < 1:
                raise self.error(f"{name} must be positive, got {pair[0]} x {pair[1]}")
        self.num_output = p.num_output
        if self.num_output < 1:
            raise self.error("num_output must be positive")
        self.group = p.group
        channels = bottom[0].shape[1]
        if self.group < 1 or channels % self.group or self.num_output % self.group:
            raise self.error(f"group {self.group} must divide both the input channels ({channels}) "
                             f"and num_output ({self.num_output})")
        self.bias_term = p.bias_term
        self.blobs = self.weight_and_bias(self._weight_shape(channels), self.num_output, p)

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        weight_shape = self.blobs[0].shape
        if len(shape) != 4:
            raise self.error(f"needs a 4-D bottom (N, C, H, W), got shape {shape}")
        if shape[1] != self._input_channels():
            raise self.error(f"bottom shape {shape} does not fit weight shape {weight_shape} with group "
                             f"{self.group}: expected {self._input_channels()} channels")
        for i, b in enumerate(bottom[1:], start=1):
            if b.shape != shape:
                raise self.error(f"all bottoms must have the same shape; bottom 0 is {shape}, "
                                 f"bottom {i} is {b.shape}")
        out = [self._output_size(shape[2 + axis], axis) for axis in range(2)]
        if min(out) < 1:
            raise self.error(f"a {self.kernel[0]}x{self.kernel[1]} kernel (dilation "
                             f"{self.dilation[0]}x{self.dilation[1]}, pad {self.pad[0]}x{self.pad[1]}, "
                             f"stride {self.stride[0]}x{self.stride[1]}) does not fit bottom shape {shape}")
        for t in top:
            t.reshape((shape[0], self.num_output, *out))
        self._workspace_for(shape, top[0].shape, bottom[0].dtype)


@register("Convolution")
class ConvolutionLayer(_ConvolutionBase):
    """Convolves each bottom (N, C, H, W) with weights [num_output, C / group, kh, kw].

    Several bottoms share the weights, each giving its own top. The output size follows Caffe:
    (H + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1.
    """

    lowp = None

    def set_precision(self, setting):
        """FP32, or a reduced-precision driver (the net resolves the setting; see precision/)."""
        self.precision = setting
        self.lowp = None if setting.is_fp32 else LowPrecisionConvolution(self, setting)

    def setup(self, bottom, top):
        super().setup(bottom, top)
        self.set_precision(layer_precision(self.param))

    def _weight_shape(self, channels):
        return (self.num_output, channels // self.group, *self.kernel)

    def _input_channels(self):
        return self.blobs[0].shape[1] * self.group

    def _output_size(self, size, axis):
        extent = self.dilation[axis] * (self.kernel[axis] - 1) + 1
        return (size + 2 * self.pad[axis] - extent) // self.stride[axis] + 1

    def _workspace_for(self, bottom_shape, top_shape, dtype):
        return _workspace(bottom_shape, self.blobs[0].shape, self.pad, self.stride, self.dilation,
                          self.group, dtype)

    def forward(self, bottom, top):
        if self.lowp is not None:
            check_float32(self, bottom[0].data)
            self.lowp.forward(bottom, top)
            return
        workspace = self._workspace_for(bottom[0].shape, top[0].shape, bottom[0].dtype)
        weight = self.blobs[0].data
        bias = self.blobs[1].data if self.bias_term else None
        for b, t in zip(bottom, top):
            conv.conv_forward(b.data, weight, bias, t.data, self.pad, self.stride, self.dilation,
                              self.group, workspace)

    def backward(self, top, propagate_down, bottom):
        if self.lowp is not None:
            self.lowp.backward(top, propagate_down, bottom)
            return
        workspace = self._workspace_for(bottom[0].shape, top[0].shape, bottom[0].dtype)
        weight = self.blobs[0]
        weight_diff = weight.diff if self.param_propagate_down[0] else None
        bias_diff = self.blobs[1].diff if self.bias_term and self.param_propagate_down[1] else None
        for t, down, b in zip(top, propagate_down, bottom):
            conv.conv_backward(b.data, weight.data, t.diff, b.diff if down else None, weight_diff, bias_diff,
                               self.pad, self.stride, self.dilation, self.group, workspace)


@register("Deconvolution")
class DeconvolutionLayer(_ConvolutionBase):
    """Transposed convolution, as Caffe's DeconvolutionLayer: the adjoint of a Convolution whose
    input is this layer's top and whose output is this layer's bottom.

    Weights are [C, num_output / group, kh, kw] (the convolution's layout with the two channel
    counts swapped), so a trained Convolution's weights transpose it. The output size is
    (H - 1) * stride - 2 * pad + dilation * (kernel - 1) + 1. Forward is that convolution's
    backward-data pass, and backward is its forward pass (for the bottom diff) plus its weight
    gradient with the roles of data and diff exchanged.
    """

    def _weight_shape(self, channels):
        return (channels, self.num_output // self.group, *self.kernel)

    def _input_channels(self):
        return self.blobs[0].shape[0]

    def _output_size(self, size, axis):
        extent = self.dilation[axis] * (self.kernel[axis] - 1) + 1
        return (size - 1) * self.stride[axis] - 2 * self.pad[axis] + extent

    def _workspace_for(self, bottom_shape, top_shape, dtype):
        # The convolution this layer transposes reads the top.
        return _workspace(top_shape, self.blobs[0].shape, self.pad, self.stride, self.dilation,
                          self.group, dtype)

    def _channel_view(self, array):
        return array.reshape(array.shape[0], array.shape[1], -1)

    def forward(self, bottom, top):
        workspace = self._workspace_for(bottom[0].shape, top[0].shape, bottom[0].dtype)
        weight = self.blobs[0].data
        for b, t in zip(bottom, top):
            # Only dx requested: the top stands in for the convolution input, which is then not read.
            conv.conv_backward(t.data, weight, b.data, t.data, None, None, self.pad, self.stride,
                               self.dilation, self.group, workspace)
            if self.bias_term:
                y = self._channel_view(t.data)
                batchnorm.channel_affine(y, None, None, self.blobs[1].data, y, None, num_threads())

    def backward(self, top, propagate_down, bottom):
        workspace = self._workspace_for(bottom[0].shape, top[0].shape, bottom[0].dtype)
        weight = self.blobs[0]
        for t, down, b in zip(top, propagate_down, bottom):
            if down:
                conv.conv_forward(t.diff, weight.data, None, b.diff, self.pad, self.stride, self.dilation,
                                  self.group, workspace)
            if self.param_propagate_down[0]:
                conv.conv_backward(t.diff, weight.data, b.data, None, weight.diff, None, self.pad, self.stride,
                                   self.dilation, self.group, workspace)
            if self.bias_term and self.param_propagate_down[1]:
                batchnorm.channel_sums(self._channel_view(t.diff), self.blobs[1].diff, num_threads())


def _workspace(input_shape, weight_shape, pad, stride, dilation, group, dtype):
    dtype = np.dtype(dtype)
    size = conv.conv_workspace_size(input_shape, weight_shape, pad, stride, dilation, group, dtype.itemsize,
                                    num_threads())
    return _scratch.get(size, dtype)
