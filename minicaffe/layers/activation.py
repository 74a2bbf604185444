"""Element-wise activations, with Caffe's parameters and defaults: ReLU, Sigmoid, TanH, AbsVal, BNLL,
ELU, Power, Exp, Log, Threshold, Clip and PReLU.

Each layer writes its forward and backward side by side over flat views of the blobs. Exp, log, tanh
and friends run as NumPy ufuncs writing into the top (SIMD, no temporaries); the arithmetic around them
runs in one pass in minicaffe/kernels/activation.pyx.

All of them run in place (top is bottom) except AbsVal, which Caffe refuses too. Where backward reads
the bottom data, an in-place layer keeps a copy of it during forward, as Caffe's PReLU does, so the
gradient stays right where Caffe's Clip, Log, Power and BNLL would read the overwritten output.
"""
import math

import numpy as np

from minicaffe.errors import MinicaffeError
from minicaffe.filler import fill_blob
from minicaffe.kernels import activation
from minicaffe.kernels.parallel import num_threads
from minicaffe.layer import Layer, register
from minicaffe.proto import minicaffe_pb2 as pb


def grown(buffer, size, dtype):
    """``buffer`` when it holds ``size`` elements of ``dtype``, else a new one: reshape-time storage."""
    if buffer is not None and buffer.size >= size and buffer.dtype == dtype:
        return buffer
    return np.empty(size, dtype)


class ElementwiseLayer(Layer):
    """One bottom, one top of the same shape; subclasses implement ``forward_flat(x, y)`` and
    ``backward_flat(x, y, dy, dx)`` on flat arrays.

    ``x`` is the bottom data as it was on input to forward: for an in-place layer that sets
    ``keeps_input_in_place`` it is a copy taken in forward; otherwise it is the bottom's own data,
    which in place is the output (fine for layers whose backward reads only signs or the output).
    """

    exact_num_bottom = 1
    exact_num_top = 1
    keeps_input_in_place = False
    allows_in_place = True

    _saved_input = None

    def reshape(self, bottom, top):
        in_place = top[0] is bottom[0]
        if in_place and not self.allows_in_place:
            raise self.error("cannot run in place, as in Caffe (give the top a name of its own)")
        top[0].reshape(bottom[0].shape)
        self._keeps_input = in_place and self.keeps_input_in_place
        if self._keeps_input:
            self._saved_input = grown(self._saved_input, bottom[0].count, bottom[0].dtype)

    def take_input(self, bottom):
        """The flat bottom data for forward, copied first where backward will need it (see above)."""
        x = bottom[0].data.reshape(-1)
        if self._keeps_input:
            np.copyto(self._saved_input[:x.size], x)
            return self._saved_input[:x.size]
        return x

    def input_data(self, bottom):
        """The flat bottom data as forward saw it, for backward."""
        if self._keeps_input:
            return self._saved_input[:bottom[0].count]
        return bottom[0].data.reshape(-1)

    def forward(self, bottom, top):
        self.forward_flat(self.take_input(bottom), top[0].data.reshape(-1))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            self.backward_flat(self.input_data(bottom), top[0].data.reshape(-1),
                               top[0].diff.reshape(-1), bottom[0].diff.reshape(-1))

    def forward_flat(self, x, y):
        raise NotImplementedError

    def backward_flat(self, x, y, dy, dx):
        raise NotImplementedError


@register("ReLU")
class ReLULayer(ElementwiseLayer):
    """y = max(x, 0) + negative_slope * min(x, 0)."""

    def setup(self, bottom, top):
        self.negative_slope = float(self.param.relu_param.negative_slope)

    def forward_flat(self, x, y):
        activation.relu_forward(x, y, self.negative_slope, num_threads())

    def backward_flat(self, x, y, dy, dx):
        # In place, x is the output: same sign as the input for a slope >= 0 (Caffe relies on this too).
        activation.relu_backward(x, dy, dx, self.negative_slope, num_threads())


@register("Sigmoid")
class SigmoidLayer(ElementwiseLayer):
    """y = 1 / (1 + exp(-x)), computed as Caffe does: 0.5 * tanh(0.5 * x) + 0.5 (no overflow)."""

    def forward_flat(self, x, y):
        np.multiply(x, 0.5, out=y)
        np.tanh(y, out=y)
        activation.affine(y, y, 0.5, 0.5, num_threads())

    def backward_flat(self, x, y, dy, dx):
        activation.sigmoid_backward(y, dy, dx, num_threads())


@register("TanH")
class TanHLayer(ElementwiseLayer):
    """y = tanh(x)."""

    def forward_flat(self, x, y):
        np.tanh(x, out=y)

    def backward_flat(self, x, y, dy, dx):
        activation.tanh_backward(y, dy, dx, num_threads())


@register("AbsVal")
class AbsValLayer(ElementwiseLayer):
    """y = |x|; the gradient at 0 is 0."""

    allows_in_place = False

    def forward_flat(self, x, y):
        np.abs(x, out=y)

    def backward_flat(self, x, y, dy, dx):
        activation.absval_backward(x, dy, dx, num_threads())


@register("BNLL")
class BNLLLayer(ElementwiseLayer):
    """y = log(1 + exp(x)) ("binomial normal log likelihood"), as max(x, 0) + log1p(exp(-|x|)),
    which never overflows (Caffe's two branches for x > 0 and x <= 0, in one formula)."""

    keeps_input_in_place = True
    _scratch = None

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if self._keeps_input:
            # In place the bottom diff is the top diff, so the sigmoid needs a buffer of its own.
            self._scratch = grown(self._scratch, bottom[0].count, bottom[0].dtype)

    def forward_flat(self, x, y):
        np.abs(x, out=y)
        np.negative(y, out=y)
        np.exp(y, out=y)
        np.log1p(y, out=y)
        activation.bnll_finish(x, y, y, num_threads())

    def backward_flat(self, x, y, dy, dx):
        # dy/dx is the sigmoid of x, 0.5 * tanh(0.5 * x) + 0.5.
        half_tanh = self._scratch[:x.size] if self._keeps_input else dx
        np.multiply(x, 0.5, out=half_tanh)
        np.tanh(half_tanh, out=half_tanh)
        activation.scaled_product(half_tanh, dy, dx, 0.5, 0.5, num_threads())


@register("ELU")
class ELULayer(ElementwiseLayer):
    """y = x where x > 0, else alpha * (exp(x) - 1) (elu_param.alpha, default 1)."""

    keeps_input_in_place = True

    def setup(self, bottom, top):
        self.alpha = float(self.param.elu_param.alpha)

    def forward_flat(self, x, y):
        np.minimum(x, 0, out=y)
        np.expm1(y, out=y)
        activation.elu_finish(x, y, y, self.alpha, num_threads())

    def backward_flat(self, x, y, dy, dx):
        activation.elu_backward(x, y, dy, dx, self.alpha, num_threads())


@register("Power")
class PowerLayer(ElementwiseLayer):
    """y = (shift + scale * x)^power (power_param; defaults power 1, scale 1, shift 0).

    As Caffe: when power * scale is 0 the output is the constant shift^power (1 for power 0) and the
    gradient 0; power 1 has the constant gradient scale; power 2 computes its gradient from x alone;
    the other cases from y: power * scale * y / (shift + scale * x).
    """

    def setup(self, bottom, top):
        param = self.param.power_param
        self.power, self.scale, self.shift = float(param.power), float(param.scale), float(param.shift)
        self.diff_scale = self.power * self.scale
        self.keeps_input_in_place = self.diff_scale != 0 and self.power != 1
        # NumPy's pow, like C's, gives NaN or inf where Python's would be complex or raise.
        self.constant_output = 1.0 if self.power == 0 else float(np.float64(self.shift) ** self.power)

    def forward_flat(self, x, y):
        if self.diff_scale == 0:
            y.fill(self.constant_output)
            return
        activation.affine(x, y, self.scale, self.shift, num_threads())
        if self.power != 1:
            np.power(y, self.power, out=y)

    def backward_flat(self, x, y, dy, dx):
        threads = num_threads()
        if self.diff_scale == 0:
            dx.fill(0)
        elif self.power == 1:
            activation.affine(dy, dx, self.diff_scale, 0.0, threads)
        elif self.power == 2:
            activation.scaled_product(x, dy, dx, self.diff_scale * self.scale, self.diff_scale * self.shift,
                                      threads)
        elif self.shift == 0:
            activation.power_backward(x, y, dy, dx, self.power, 1.0, 0.0, threads)
        else:
            activation.power_backward(x, y, dy, dx, self.diff_scale, self.scale, self.shift, threads)


def log_of_base(layer, section, base):
    """log(base), with base -1 meaning e, or a LayerError as Caffe's checks in Exp and Log."""
    if base == -1:
        return 1.0
    if not base > 0:
        raise layer.error(f"{section}.base must be strictly positive (or -1 for e), got {base:g}")
    log_base = math.log(base)
    if math.isinf(log_base):
        raise layer.error(f"{section}.base {base:g} has an infinite logarithm")
    return log_base


@register("Exp")
class ExpLayer(ElementwiseLayer):
    """y = base^(shift + scale * x) (exp_param; base -1, the default, means e; scale 1, shift 0)."""

    def setup(self, bottom, top):
        param = self.param.exp_param
        base, scale, shift = float(param.base), float(param.scale), float(param.shift)
        self.inner_scale = log_of_base(self, "exp_param", base) * scale
        if shift == 0:
            self.outer_scale = 1.0
        else:
            self.outer_scale = float(np.exp(np.float64(shift)) if base == -1 else np.float64(base) ** shift)

    def forward_flat(self, x, y):
        if self.inner_scale == 1:
            np.exp(x, out=y)
        else:
            np.multiply(x, self.inner_scale, out=y)
            np.exp(y, out=y)
        if self.outer_scale != 1:
            activation.affine(y, y, self.outer_scale, 0.0, num_threads())

    def backward_flat(self, x, y, dy, dx):
        activation.scaled_product(y, dy, dx, self.inner_scale, 0.0, num_threads())


@register("Log")
class LogLayer(ElementwiseLayer):
    """y = log_base(shift + scale * x) (log_param; base -1, the default, means e; scale 1, shift 0)."""

    keeps_input_in_place = True

    def setup(self, bottom, top):
        param = self.param.log_param
        log_base = log_of_base(self, "log_param", float(param.base))
        if log_base == 0:
            raise self.error(f"log_param.base {param.base:g} gives 1 / log(base) = inf")
        self.base_scale = 1.0 / log_base
        self.scale, self.shift = float(param.scale), float(param.shift)
        self.backward_numerator = self.scale / log_base

    def forward_flat(self, x, y):
        if self.scale == 1 and self.shift == 0:
            np.log(x, out=y)
        else:
            activation.affine(x, y, self.scale, self.shift, num_threads())
            np.log(y, out=y)
        if self.base_scale != 1:
            activation.affine(y, y, self.base_scale, 0.0, num_threads())

    def backward_flat(self, x, y, dy, dx):
        activation.log_backward(x, dy, dx, self.backward_numerator, self.scale, self.shift, num_threads())


@register("Threshold")
class ThresholdLayer(ElementwiseLayer):
    """y = 1 where x > threshold_param.threshold (default 0), else 0. It has no gradient: Caffe's
    backward is not implemented, and asking for one here is an error."""

    def setup(self, bottom, top):
        self.threshold = float(self.param.threshold_param.threshold)

    def forward_flat(self, x, y):
        activation.threshold_forward(x, y, self.threshold, num_threads())

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise self.error("has no backward pass (a step function has no useful gradient); "
                             "set propagate_down: false or keep it out of the path to the loss")


@register("Clip")
class ClipLayer(ElementwiseLayer):
    """y = min(max(x, clip_param.min), clip_param.max); the gradient passes where min <= x <= max."""

    keeps_input_in_place = True

    def setup(self, bottom, top):
        param = self.param.clip_param
        missing = [f"clip_param.{field}" for field in ("min", "max") if not param.HasField(field)]
        if missing:
            raise self.error(f"needs {' and '.join(missing)}")
        self.low, self.high = float(param.min), float(param.max)
        if self.low > self.high:
            raise self.error(f"clip_param.min {self.low:g} is greater than clip_param.max {self.high:g}")

    def forward_flat(self, x, y):
        activation.clip_forward(x, y, self.low, self.high, num_threads())

    def backward_flat(self, x, y, dy, dx):
        activation.clip_backward(x, dy, dx, self.low, self.high, num_threads())


@register("PReLU")
class PReLULayer(ElementwiseLayer):
    """y = x where x > 0, else slope * x, with a learned slope per channel (axis 1), or one shared by
    all channels (prelu_param.channel_shared). The slopes are the layer's one blob, shaped [C] or, when
    shared, [] as in Caffe; prelu_param.filler initializes them (default: constant 0.25)."""

    keeps_input_in_place = True
    _plane_sums = None

    def setup(self, bottom, top):
        self._check_axes(bottom[0])
        param = self.param.prelu_param
        self.channel_shared = param.channel_shared
        slopes = self.new_param_blob(() if self.channel_shared else (bottom[0].shape[1],), "slope")
        filler = param.filler if param.HasField("filler") else pb.FillerParameter(type="constant", value=0.25)
        try:
            fill_blob(slopes, filler, where="prelu_param.filler")
        except MinicaffeError as err:
            raise self.error(str(err)) from None
        self.blobs = [slopes]

    def reshape(self, bottom, top):
        self._check_axes(bottom[0])
        channels = bottom[0].shape[1]
        if not self.channel_shared and self.blobs[0].count != channels:
            raise self.error(f"has {self.blobs[0].count} slopes but the bottom {bottom[0].shape} has "
                             f"{channels} channels")
        super().reshape(bottom, top)
        self._plane_sums = grown(self._plane_sums, bottom[0].count_range(0, 2), np.float64)

    def _check_axes(self, blob):
        if blob.num_axes < 2:
            raise self.error(f"needs a bottom with at least 2 axes (N, C, ...), got shape {blob.shape}")

    def _geometry(self, bottom):
        return bottom[0].shape[1], bottom[0].count_range(2)

    def forward(self, bottom, top):
        channels, dim = self._geometry(bottom)
        activation.prelu_forward(self.take_input(bottom), top[0].data.reshape(-1),
                                 self.blobs[0].data.reshape(-1), channels, dim, num_threads())

    def backward(self, top, propagate_down, bottom):
        channels, dim = self._geometry(bottom)
        x, dy = self.input_data(bottom), top[0].diff.reshape(-1)
        slopes = self.blobs[0]
        # The slope gradient reads the top diff first: in place, the bottom diff overwrites it.
        if self.param_propagate_down[0]:
            activation.prelu_slope_gradient(x, dy, slopes.diff.reshape(-1), self._plane_sums, channels, dim,
                                            num_threads())
        if propagate_down[0]:
            activation.prelu_backward(x, dy, bottom[0].diff.reshape(-1), slopes.data.reshape(-1), channels,
                                      dim, num_threads())
