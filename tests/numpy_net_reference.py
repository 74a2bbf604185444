"""A plain-NumPy float64 reference of a Caffe net's forward and backward passes, for checking minicaffe.

It walks the NetParameter itself (layers kept by their phase rules, in-place tops, blobs that feed
several layers) and implements each layer type of AlexNet and ResNet-50 directly from Caffe's
definitions: convolution by im2col (stride tricks) and matrix products, Caffe's pooling windows,
LRN across channels, BatchNorm with Caffe's statistics blobs, Scale, Eltwise SUM, InnerProduct,
ReLU, Dropout (TEST, or ratio 0), Softmax and SoftmaxWithLoss. It uses no minicaffe code.

    reference = NumpyNet(net_param, phase, {layer name: [parameter arrays]})
    blobs = reference.forward({"data": images, "label": labels})     # {blob: its last value}
    diffs, param_grads = reference.backward()                         # Caffe's blob diffs, grads

A blob's diff after backward is, as in Caffe after an in-place chain, the gradient with respect to
the blob's first value (the output of the layer that created it).
"""
import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

INPUT_TYPES = ("Input", "DummyData")
TRAIN, TEST = 0, 1


class NumpyNet:
    def __init__(self, net_param, phase, params):
        self.phase = phase
        self.layers = [lp for lp in net_param.layer if _included(lp, phase)]
        self.params = {name: [np.asarray(p, np.float64) for p in arrays] for name, arrays in params.items()}

    def forward(self, inputs, forced_outputs=None, own_outputs=None):
        """Runs every layer; returns {blob name: last value}.

        ``forced_outputs`` {(layer name, top index): array} replaces those outputs after the layer ran
        (its saved state for backward stays its own), so each layer runs on another implementation's
        inputs and backward happens at that implementation's forward point; ``own_outputs``, a dict,
        gets each layer's outputs before the replacement.
        """
        forced_outputs = forced_outputs or {}
        self.values = []       # one entry per blob version
        self.steps = []        # (layer, op, bottom versions, top versions)
        self.current = {}      # blob name -> its latest version
        self.first = {}        # blob name -> its first version
        for lp in self.layers:
            if lp.type in INPUT_TYPES:
                for name in lp.top:
                    self._new_version(name, np.asarray(inputs[name], np.float64))
                continue
            if lp.type not in OPS:
                raise NotImplementedError(f"layer '{lp.name}': the NumPy reference has no {lp.type}")
            bottoms = [self.current[name] for name in lp.bottom]
            op = OPS[lp.type](lp, self.phase, self.params.get(lp.name, []))
            tops = op.forward([self.values[v] for v in bottoms])
            versions = []
            for k, (name, value) in enumerate(zip(lp.top, tops)):
                if own_outputs is not None:
                    own_outputs[(lp.name, k)] = value
                if (lp.name, k) in forced_outputs:
                    value = np.asarray(forced_outputs[(lp.name, k)], np.float64).reshape(value.shape)
                versions.append(self._new_version(name, value))
            self.steps.append((lp, op, bottoms, versions))
        return {name: self.values[v] for name, v in self.current.items()}

    def _new_version(self, name, value):
        self.values.append(value)
        version = len(self.values) - 1
        self.current[name] = version
        self.first.setdefault(name, version)
        return version

    def backward(self):
        """Backward from the loss tops, each weighted by its loss weight (1 for a *Loss layer's first
        top unless given). Returns ({blob name: diff}, {layer name: [parameter gradients]})."""
        grads = {}
        for lp, _, _, versions in self.steps:
            for version, weight in zip(versions, _loss_weights(lp)):
                if weight:
                    grads[version] = np.full_like(self.values[version], weight)
        param_grads = {}
        for lp, op, bottoms, versions in reversed(self.steps):
            top_grads = [grads.get(v) for v in versions]
            if all(g is None for g in top_grads):
                continue
            top_grads = [np.zeros_like(self.values[v]) if g is None else g for v, g in zip(versions, top_grads)]
            bottom_grads, layer_param_grads = op.backward(top_grads)
            for version, grad in zip(bottoms, bottom_grads):
                if grad is not None:
                    grads[version] = grad if version not in grads else grads[version] + grad
            if layer_param_grads:
                param_grads[lp.name] = layer_param_grads
        diffs = {name: grads.get(v, np.zeros_like(self.values[v])) for name, v in self.first.items()}
        return diffs, param_grads


def _included(lp, phase):
    for rule in list(lp.include) + list(lp.exclude):
        if rule.HasField("min_level") or rule.HasField("max_level") or rule.stage or rule.not_stage:
            raise NotImplementedError(f"layer '{lp.name}': only phase rules are supported")
    if lp.include:
        return any(not rule.HasField("phase") or rule.phase == phase for rule in lp.include)
    return not any(not rule.HasField("phase") or rule.phase == phase for rule in lp.exclude)


def _loss_weights(lp):
    if lp.loss_weight:
        return list(lp.loss_weight)
    return [1.0] + [0.0] * (len(lp.top) - 1) if lp.type.endswith("Loss") else [0.0] * len(lp.top)


def _spatial(p, name, default):
    """(h, w) of a pooling or convolution setting: name_h/name_w, or ``name`` (repeated or not)."""
    if name != "dilation" and p.HasField(f"{name}_h"):
        return getattr(p, f"{name}_h"), getattr(p, f"{name}_w")
    value = getattr(p, name)
    values = (list(value) or [default]) if hasattr(value, "__len__") else [value]
    return (values[0], values[-1])


def _add_strided(target, index_h, index_w, count_h, count_w, stride_h, stride_w, values):
    """target[..., index_h + stride_h * i, index_w + stride_w * j] += values[..., i, j]."""
    target[..., index_h:index_h + stride_h * (count_h - 1) + 1:stride_h,
           index_w:index_w + stride_w * (count_w - 1) + 1:stride_w] += values


# -- layers: op.forward(bottom values) -> top values; op.backward(top grads) -> (bottom grads, param grads)

class Convolution:
    def __init__(self, lp, phase, params):
        p = lp.convolution_param
        self.weight = params[0]
        self.bias = params[1] if p.bias_term else None
        self.stride, self.pad = _spatial(p, "stride", 1), _spatial(p, "pad", 0)
        self.dilation, self.group = _spatial(p, "dilation", 1), p.group

    def _columns(self, x):
        """(N * OH * OW, C/group * kh * kw) matrices, one per group, and the output size."""
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.pad, self.dilation
        kh, kw = self.weight.shape[2:]
        padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        windows = sliding_window_view(padded, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
        windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]
        n, c, oh, ow = windows.shape[:4]
        per_group = c // self.group
        columns = [windows[:, g * per_group:(g + 1) * per_group].transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, -1)
                   for g in range(self.group)]
        return columns, (oh, ow)

    def forward(self, bottoms):
        self.x = bottoms[0]
        columns, (oh, ow) = self._columns(self.x)
        m = self.weight.shape[0] // self.group
        outputs = [cols @ self.weight[g * m:(g + 1) * m].reshape(m, -1).T for g, cols in enumerate(columns)]
        y = np.concatenate(outputs, axis=1).reshape(self.x.shape[0], oh, ow, -1).transpose(0, 3, 1, 2)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return [np.ascontiguousarray(y)]

    def backward(self, top_grads):
        dy = top_grads[0]
        columns, (oh, ow) = self._columns(self.x)
        n, c, height, width = self.x.shape
        m, per_group = self.weight.shape[0] // self.group, c // self.group
        kh, kw = self.weight.shape[2:]
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.pad, self.dilation
        dweight = np.zeros_like(self.weight)
        dx = np.zeros((n, c, height + 2 * ph, width + 2 * pw))
        for g, cols in enumerate(columns):
            dy_g = dy[:, g * m:(g + 1) * m].transpose(0, 2, 3, 1).reshape(-1, m)
            w_g = self.weight[g * m:(g + 1) * m].reshape(m, -1)
            dweight[g * m:(g + 1) * m] = (dy_g.T @ cols).reshape(m, per_group, kh, kw)
            dcols = (dy_g @ w_g).reshape(n, oh, ow, per_group, kh, kw).transpose(0, 3, 4, 5, 1, 2)
            for i in range(kh):
                for j in range(kw):
                    _add_strided(dx[:, g * per_group:(g + 1) * per_group], i * dh, j * dw, oh, ow, sh, sw,
                                 dcols[:, :, i, j])
        grads = [dweight] + ([dy.sum(axis=(0, 2, 3))] if self.bias is not None else [])
        return [dx[:, :, ph:ph + height, pw:pw + width]], grads


class InnerProduct:
    def __init__(self, lp, phase, params):
        p = lp.inner_product_param
        self.axis, self.transpose = p.axis, p.transpose
        self.weight = params[0].T if p.transpose else params[0]
        self.bias = params[1] if p.bias_term else None

    def forward(self, bottoms):
        x = bottoms[0]
        axis = self.axis % x.ndim
        self.shape = x.shape
        self.x = x.reshape(math.prod(x.shape[:axis]), -1)
        y = self.x @ self.weight.T
        if self.bias is not None:
            y = y + self.bias
        return [y.reshape(x.shape[:axis] + (y.shape[1],))]

    def backward(self, top_grads):
        dy = top_grads[0].reshape(self.x.shape[0], -1)
        dweight = dy.T @ self.x
        grads = [dweight.T if self.transpose else dweight] + ([dy.sum(axis=0)] if self.bias is not None else [])
        return [(dy @ self.weight).reshape(self.shape)], grads


def _pooled_size(size, kernel, stride, pad, padded):
    pooled = -(-(size + 2 * pad - kernel) // stride) + 1
    if padded and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


class Pooling:
    """MAX and AVE pooling with Caffe's window rules (ceil rounding, padded windows clipped)."""

    def __init__(self, lp, phase, params):
        p = lp.pooling_param
        if p.round_mode != 0 or p.pool not in (0, 1):
            raise NotImplementedError(f"layer '{lp.name}': the reference pools MAX or AVE, rounding up")
        self.param, self.max = p, p.pool == 0

    def _geometry(self, x):
        p = self.param
        height, width = x.shape[2:]
        if p.global_pooling:
            self.kernel, self.stride, self.pad = (height, width), (1, 1), (0, 0)
        else:
            self.kernel = (p.kernel_h, p.kernel_w) if p.HasField("kernel_h") else (p.kernel_size,) * 2
            self.stride, self.pad = _spatial(p, "stride", 1), _spatial(p, "pad", 0)
        padded = any(self.pad)
        self.out = tuple(_pooled_size(size, k, s, pd, padded)
                         for size, k, s, pd in zip((height, width), self.kernel, self.stride, self.pad))
        # Pad on the right as far as the last window reaches (it may pass the padding).
        self.extra = tuple(max(0, (o - 1) * s + k - size - pd) for o, s, k, size, pd
                           in zip(self.out, self.stride, self.kernel, (height, width), self.pad))

    def _padded(self, x, fill):
        (ph, pw), (eh, ew) = self.pad, self.extra
        return np.pad(x, ((0, 0), (0, 0), (ph, eh), (pw, ew)), constant_values=fill)

    def _windows(self, padded):
        (oh, ow), (sh, sw) = self.out, self.stride
        return sliding_window_view(padded, self.kernel, axis=(2, 3))[:, :, ::sh, ::sw][:, :, :oh, :ow]

    def _divisor(self):
        """Caffe's AVE divisor: the window clipped to the padded input [-pad, size + pad)."""
        sizes = []
        for o, s, k, size, pd in zip(self.out, self.stride, self.kernel, self.shape[2:], self.pad):
            starts = np.arange(o) * s - pd
            sizes.append(np.minimum(starts + k, size + pd) - starts)
        return sizes[0][:, None] * sizes[1][None, :]

    def forward(self, bottoms):
        x = bottoms[0]
        self.shape = x.shape
        self._geometry(x)
        if self.max:
            windows = self._windows(self._padded(x, -np.inf))
            flat = windows.reshape(windows.shape[:4] + (-1,))
            # argmax takes the first maximum in row-major window order, as Caffe's scan does.
            self.argmax = flat.argmax(axis=-1)
            return [np.take_along_axis(flat, self.argmax[..., None], axis=-1)[..., 0]]
        windows = self._windows(self._padded(x, 0.0))
        return [windows.sum(axis=(-2, -1)) / self._divisor()]

    def backward(self, top_grads):
        dy = top_grads[0]
        n, c, height, width = self.shape
        (ph, pw), (eh, ew), (sh, sw), (oh, ow) = self.pad, self.extra, self.stride, self.out
        padded_shape = (n, c, height + ph + eh, width + pw + ew)
        if self.max:
            kw = self.kernel[1]
            rows = np.arange(oh)[:, None] * sh + self.argmax // kw
            cols = np.arange(ow)[None, :] * sw + self.argmax % kw
            planes = np.arange(n * c).reshape(n, c, 1, 1)
            index = (planes * padded_shape[2] + rows) * padded_shape[3] + cols
            dx = np.bincount(index.ravel(), weights=dy.ravel(), minlength=math.prod(padded_shape))
            dx = dx.reshape(padded_shape)
        else:
            dx = np.zeros(padded_shape)
            share = dy / self._divisor()
            for i in range(self.kernel[0]):
                for j in range(self.kernel[1]):
                    _add_strided(dx, i, j, oh, ow, sh, sw, share)
        return [dx[:, :, ph:ph + height, pw:pw + width]], []


class LRN:
    """ACROSS_CHANNELS: y = x * (k + alpha / size * sum of x^2 over ``size`` channels)^-beta."""

    def __init__(self, lp, phase, params):
        p = lp.lrn_param
        if p.norm_region != 0:
            raise NotImplementedError(f"layer '{lp.name}': the reference has LRN ACROSS_CHANNELS only")
        self.size, self.alpha, self.beta, self.k = p.local_size, p.alpha, p.beta, p.k

    def _window_sum(self, a):
        half = (self.size - 1) // 2
        padded = np.pad(a, ((0, 0), (half, half), (0, 0), (0, 0)))
        return sum(padded[:, i:i + a.shape[1]] for i in range(self.size))

    def forward(self, bottoms):
        self.x = bottoms[0]
        self.scale = self.k + self.alpha / self.size * self._window_sum(self.x ** 2)
        self.y = self.x * self.scale ** -self.beta
        return [self.y]

    def backward(self, top_grads):
        dy = top_grads[0]
        window = self._window_sum(dy * self.y / self.scale)
        dx = dy * self.scale ** -self.beta - 2 * self.alpha * self.beta / self.size * self.x * window
        return [dx], []


class ReLU:
    def __init__(self, lp, phase, params):
        self.slope = lp.relu_param.negative_slope

    def forward(self, bottoms):
        self.positive = bottoms[0] > 0
        return [np.where(self.positive, bottoms[0], self.slope * bottoms[0])]

    def backward(self, top_grads):
        return [top_grads[0] * np.where(self.positive, 1.0, self.slope)], []


class BatchNorm:
    """Caffe's BatchNorm: statistics blobs [mean sum, variance sum, their weight]; normalizes with
    the estimates (sum / weight) under use_global_stats (TEST's default), else with the batch's
    biased statistics."""

    def __init__(self, lp, phase, params):
        p = lp.batch_norm_param
        self.global_stats = p.use_global_stats if p.HasField("use_global_stats") else phase == TEST
        self.eps = p.eps
        self.params = params

    def forward(self, bottoms):
        x = bottoms[0]
        axes = (0,) + tuple(range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if self.global_stats:
            weight = self.params[2][0]
            factor = 0.0 if weight == 0 else 1.0 / weight
            mean, variance = self.params[0] * factor, self.params[1] * factor
        else:
            mean = x.mean(axis=axes)
            variance = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)
        self.inv_std = (1.0 / np.sqrt(variance + self.eps)).reshape(shape)
        self.axes = axes
        self.x_norm = (x - mean.reshape(shape)) * self.inv_std
        return [self.x_norm]

    def backward(self, top_grads):
        dy = top_grads[0]
        if self.global_stats:
            return [dy * self.inv_std], []
        mean_dy = dy.mean(axis=self.axes, keepdims=True)
        mean_dy_x = (dy * self.x_norm).mean(axis=self.axes, keepdims=True)
        return [(dy - mean_dy - self.x_norm * mean_dy_x) * self.inv_std], []


class Scale:
    """y = x * scale + bias, the learned scale spanning x's axes [axis, axis + num_axes)."""

    def __init__(self, lp, phase, params):
        p = lp.scale_param
        if len(lp.bottom) != 1:
            raise NotImplementedError(f"layer '{lp.name}': the reference has the one-bottom Scale only")
        self.axis, self.bias_term = p.axis, p.bias_term
        self.scale, self.bias = params[0], (params[1] if p.bias_term else None)

    def _layout(self, shape):
        if self.scale.size == 1:
            return (math.prod(shape), 1, 1)
        axis = self.axis % len(shape)
        end = axis + self.scale.ndim
        return (math.prod(shape[:axis]), math.prod(shape[axis:end]), math.prod(shape[end:]))

    def forward(self, bottoms):
        x = bottoms[0]
        self.shape = x.shape
        self.x = x.reshape(self._layout(x.shape))
        y = self.x * self.scale.reshape(1, -1, 1)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1)
        return [y.reshape(x.shape)]

    def backward(self, top_grads):
        dy = top_grads[0].reshape(self.x.shape)
        grads = [(dy * self.x).sum(axis=(0, 2)).reshape(self.scale.shape)]
        if self.bias is not None:
            grads.append(dy.sum(axis=(0, 2)).reshape(self.bias.shape))
        return [(dy * self.scale.reshape(1, -1, 1)).reshape(self.shape)], grads


class Eltwise:
    def __init__(self, lp, phase, params):
        p = lp.eltwise_param
        if p.operation != 1:
            raise NotImplementedError(f"layer '{lp.name}': the reference has Eltwise SUM only")
        self.coeffs = list(p.coeff) or [1.0] * len(lp.bottom)

    def forward(self, bottoms):
        return [sum(c * x for c, x in zip(self.coeffs, bottoms))]

    def backward(self, top_grads):
        return [c * top_grads[0] for c in self.coeffs], []


class Dropout:
    def __init__(self, lp, phase, params):
        if phase == TRAIN and lp.dropout_param.dropout_ratio != 0:
            raise NotImplementedError(f"layer '{lp.name}': random dropout masks cannot be reproduced; "
                                      f"use the TEST phase or dropout_ratio 0")

    def forward(self, bottoms):
        return [bottoms[0]]

    def backward(self, top_grads):
        return [top_grads[0]], []


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class Softmax:
    def __init__(self, lp, phase, params):
        self.axis = lp.softmax_param.axis

    def forward(self, bottoms):
        self.y = _softmax(bottoms[0], self.axis % bottoms[0].ndim)
        return [self.y]

    def backward(self, top_grads):
        dy = top_grads[0]
        axis = self.axis % dy.ndim
        return [self.y * (dy - (dy * self.y).sum(axis=axis, keepdims=True))], []


class SoftmaxWithLoss:
    """-sum(log softmax(x)[label]) / normalizer; normalization VALID (the default), BATCH_SIZE,
    FULL or NONE; labels equal to ignore_label count for nothing."""

    def __init__(self, lp, phase, params):
        p = lp.loss_param
        self.axis = lp.softmax_param.axis
        self.ignore = p.ignore_label if p.HasField("ignore_label") else None
        self.mode = p.normalization
        if p.HasField("normalize") and not p.HasField("normalization"):
            self.mode = 1 if p.normalize else 2
        self.two_tops = len(lp.top) > 1

    def forward(self, bottoms):
        scores, labels = bottoms
        axis = self.axis % scores.ndim
        outer, classes = math.prod(scores.shape[:axis]), scores.shape[axis]
        self.shape = scores.shape
        self.prob = _softmax(scores, axis)
        prob = self.prob.reshape(outer, classes, -1)
        self.labels = labels.reshape(outer, 1, -1).astype(np.int64)
        self.valid = np.ones(self.labels.shape, bool) if self.ignore is None else self.labels != self.ignore
        picked = np.take_along_axis(prob, np.where(self.valid, self.labels, 0), axis=1)
        full = outer * prob.shape[2]
        count = {0: full, 1: int(self.valid.sum()), 2: outer, 3: 1}[self.mode]
        self.normalizer = max(1, count)
        loss = -np.log(picked)[self.valid].sum() / self.normalizer
        return [np.array([loss])] + ([self.prob] if self.two_tops else [])

    def backward(self, top_grads):
        axis = self.axis % len(self.shape)
        classes = self.shape[axis]
        outer = math.prod(self.shape[:axis])
        dscores = self.prob.reshape(outer, classes, -1).copy()
        onehot = np.arange(classes).reshape(1, -1, 1) == self.labels
        dscores -= onehot
        dscores *= self.valid
        dscores *= top_grads[0].reshape(()) / self.normalizer
        return [dscores.reshape(self.shape), None], []


OPS = {
    "Convolution": Convolution,
    "InnerProduct": InnerProduct,
    "Pooling": Pooling,
    "LRN": LRN,
    "ReLU": ReLU,
    "BatchNorm": BatchNorm,
    "Scale": Scale,
    "Eltwise": Eltwise,
    "Dropout": Dropout,
    "Softmax": Softmax,
    "SoftmaxWithLoss": SoftmaxWithLoss,
}
