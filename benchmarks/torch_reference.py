"""The same network in PyTorch: translates a minicaffe net, layer by layer, into a ``torch.nn.Module``.

It is an independent implementation of Caffe's layer semantics (written from Caffe's definitions with
PyTorch primitives, sharing no code with minicaffe's kernels), used to check minicaffe's numerics
(benchmarks/compare_pytorch.py, tests/test_pytorch_reference.py) and to time PyTorch on the very
graph minicaffe runs.

    net = Net("prototxt/alexnet/alexnet_deploy.prototxt", phase=TEST)
    module, input_names = build_torch_model(net)     # input_names: ["data"]
    copy_weights(net, module)
    blobs = module(images)                     # {blob name: tensor}, in-place blobs at their last value
    loss = module.loss(blobs)                  # the weighted sum of the loss tops, as Caffe's

The graph is the one a minicaffe ``Net`` builds (layers filtered by phase, Split layers inserted where a
blob fans out), so every blob name of the net has its tensor here. Where Caffe and PyTorch differ,
Caffe wins: pooling sizes round up and drop a last window that starts in the padding; AVE pooling
divides by the window clipped to the padded input; LRN scales alpha by local_size; BatchNorm keeps
Caffe's three statistics blobs. PyTorch is optional: it is imported when a model is built.
"""
import functools
import math

from minicaffe import Net, TEST, TRAIN
from minicaffe.proto import minicaffe_pb2 as pb

INPUT_TYPES = ("Input", "DummyData", "Data")


def _torch():
    try:
        import torch
    except ImportError:
        raise RuntimeError("benchmarks/torch_reference.py needs PyTorch (pip install torch)") from None
    return torch


def build_torch_model(source, phase=TEST):
    """(module, input names) for a prototxt path, a NetParameter or a minicaffe Net.

    A path or NetParameter is first built as a minicaffe Net in ``phase``, for its graph and its
    parameter shapes; the module's parameters start at zero: fill them with ``copy_weights``.
    """
    net = source if isinstance(source, Net) else Net(source, phase=phase)
    module = _module_class()(net)
    return module, list(module.input_names)


def copy_weights(net, module):
    """Copies every parameter blob of the minicaffe ``net`` (BatchNorm statistics too) into ``module``."""
    torch = _torch()
    with torch.no_grad():
        for layer_name, blobs in net.params.items():
            for blob, tensor in zip(blobs, module.layer_tensors[layer_name]):
                tensor.copy_(torch.from_numpy(blob.data.reshape(tuple(tensor.shape))))


@functools.cache
def _module_class():
    torch = _torch()

    class CaffeNetModule(torch.nn.Module):
        """Runs the layers in the minicaffe net's order; see the module docstring."""

        def __init__(self, net):
            super().__init__()
            self.phase = net.phase
            self.steps = []            # (LayerParameter, layer function, its tensors)
            self.input_names = []
            self.layer_tensors = {}    # layer name -> [Parameter or buffer], in Caffe's blob order
            self.loss_weights = {}     # top name -> its weight in the loss
            shared = {}
            for layer, bottoms in zip(net.layers, net.bottom_vecs):
                lp = layer.param
                if lp.type in INPUT_TYPES:
                    self.input_names.extend(lp.top)
                    continue
                if lp.type not in LAYERS:
                    raise RuntimeError(f"layer '{lp.name}': type {lp.type} has no PyTorch translation")
                tensors = self._register_tensors(lp, [b.shape for b in layer.blobs], shared)
                self.layer_tensors[lp.name] = tensors
                fn = LAYERS[lp.type](lp, [b.shape for b in bottoms], self.phase)
                self.steps.append((lp, fn, tensors))
                for top, weight in zip(lp.top, _loss_weights(lp)):
                    if weight:
                        self.loss_weights[top] = weight

        def _register_tensors(self, lp, shapes, shared):
            """Parameters (trainable unless lr_mult is 0) and, for BatchNorm, buffers; shared by name
            as Caffe's ParamSpec.name shares them."""
            tensors = []
            for j, shape in enumerate(shapes):
                spec = lp.param[j] if j < len(lp.param) else pb.ParamSpec()
                if spec.name and spec.name in shared:
                    tensors.append(shared[spec.name])
                    continue
                key = f"l{len(self.layer_tensors)}_{j}"
                zeros = torch.zeros(shape, dtype=torch.float32)
                if lp.type == "BatchNorm":
                    self.register_buffer(key, zeros)
                    tensor = getattr(self, key)
                else:
                    tensor = torch.nn.Parameter(zeros, requires_grad=spec.lr_mult != 0)
                    self.register_parameter(key, tensor)
                if spec.name:
                    shared[spec.name] = tensor
                tensors.append(tensor)
            return tensors

        def forward(self, *inputs, produced=None, forced_outputs=None, own_outputs=None, **named_inputs):
            """Runs the net; returns {blob name: tensor} with each blob at its last value.

            Inputs come positionally in ``input_names`` order, or by name. ``produced``, a dict, gets
            each blob's first tensor (its gradient is what Caffe leaves in the blob's diff after an
            in-place chain), with ``retain_grad`` where it needs a gradient. ``forced_outputs`` maps
            (layer name, top index) to an array that replaces that output's value while gradients
            pass straight through, so that each layer runs on another implementation's inputs and
            the backward pass at its forward point (its ReLU signs, max-pooling winners and batch
            statistics); ``own_outputs``, a dict, then gets each layer's output before the swap.
            """
            blobs = dict(zip(self.input_names, inputs))
            blobs.update(named_inputs)
            missing = [name for name in self.input_names if name not in blobs]
            if missing:
                raise RuntimeError(f"missing input(s) {', '.join(missing)}")
            if produced is not None:
                for name in self.input_names:
                    produced.setdefault(name, blobs[name])
            forced_outputs = forced_outputs or {}
            for lp, fn, tensors in self.steps:
                outputs = fn([blobs[name] for name in lp.bottom], tensors)
                for k, (name, value) in enumerate(zip(lp.top, outputs)):
                    if own_outputs is not None:
                        own_outputs[(lp.name, k)] = value.detach()
                    forced = forced_outputs.get((lp.name, k))
                    if forced is not None:
                        forced = torch.as_tensor(forced, dtype=value.dtype).reshape(value.shape)
                        value = value + (forced - value).detach()
                    if produced is not None and name not in produced:
                        if value.requires_grad:
                            value.retain_grad()
                        produced[name] = value
                    blobs[name] = value
            return blobs

        def loss(self, blobs):
            """The net's loss: the sum over loss tops of weight x the top's sum, as Caffe's."""
            terms = [weight * blobs[name].sum() for name, weight in self.loss_weights.items()]
            return sum(terms) if terms else torch.zeros(())

    return CaffeNetModule


def _loss_weights(lp):
    if lp.loss_weight:
        return list(lp.loss_weight)
    return [1.0] + [0.0] * (len(lp.top) - 1) if lp.type.endswith("Loss") else [0.0] * len(lp.top)


# -- layer translations: each returns fn(bottom tensors, layer tensors) -> top tensors --------------

def _pair(p, name, default):
    """A 2-D spatial setting given as name_h/name_w (dilation has none) or as a repeated ``name`` of 0,
    1 or 2 values."""
    if name != "dilation" and (p.HasField(f"{name}_h") or p.HasField(f"{name}_w")):
        return getattr(p, f"{name}_h"), getattr(p, f"{name}_w")
    values = list(getattr(p, name)) or [default]
    if len(values) == 1:
        values *= 2
    if len(values) != 2:
        raise RuntimeError(f"only 2-D {name} is translated, got {values}")
    return tuple(values)


def _convolution(lp, bottom_shapes, phase):
    F = _torch().nn.functional
    p = lp.convolution_param
    if len(bottom_shapes[0]) != 4 or p.axis != 1:
        raise RuntimeError(f"layer '{lp.name}': only 2-D NCHW convolution is translated")
    stride, pad, dilation = _pair(p, "stride", 1), _pair(p, "pad", 0), _pair(p, "dilation", 1)

    def run(bottoms, tensors):
        bias = tensors[1] if p.bias_term else None
        return [F.conv2d(x, tensors[0], bias, stride, pad, dilation, p.group) for x in bottoms]
    return run


def _inner_product(lp, bottom_shapes, phase):
    p = lp.inner_product_param
    axis = p.axis % len(bottom_shapes[0])
    outer_shape = tuple(bottom_shapes[0][:axis])

    def run(bottoms, tensors):
        x = bottoms[0].reshape(math.prod(outer_shape), -1)
        weight = tensors[0].t() if p.transpose else tensors[0]
        y = x @ weight.t()
        if p.bias_term:
            y = y + tensors[1]
        return [y.reshape(outer_shape + (y.shape[1],))]
    return run


def _pooled_size(size, kernel, stride, pad, round_up, padded):
    span = size + 2 * pad - kernel
    pooled = (-(-span // stride) if round_up else span // stride) + 1
    # Caffe drops a last window that starts in the padding, on both axes when either is padded.
    if padded and (pooled - 1) * stride >= size + pad:
        pooled -= 1
    return pooled


def _pooling(lp, bottom_shapes, phase):
    torch = _torch()
    F = torch.nn.functional
    p = lp.pooling_param
    _, _, height, width = bottom_shapes[0]
    if p.global_pooling:
        kernel, stride, pad = (height, width), (1, 1), (0, 0)
    else:
        kernel = (p.kernel_h, p.kernel_w) if p.HasField("kernel_h") else (p.kernel_size,) * 2
        stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride,) * 2
        pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad,) * 2
    round_up = p.round_mode == pb.PoolingParameter.CEIL
    padded = bool(pad[0] or pad[1])
    out = [_pooled_size(size, k, s, pd, round_up, padded)
           for size, k, s, pd in zip((height, width), kernel, stride, pad)]
    # Explicit padding: pad on the left, and on the right as far as the last window reaches.
    extra = [max(0, (o - 1) * s + k - size - pd)
             for o, s, k, size, pd in zip(out, stride, kernel, (height, width), pad)]
    spec = (pad[1], extra[1], pad[0], extra[0])

    if p.pool == pb.PoolingParameter.MAX:
        def run(bottoms, tensors):
            x = F.pad(bottoms[0], spec, value=-math.inf)
            return [F.max_pool2d(x, kernel, stride)[:, :, :out[0], :out[1]]]
        return run
    if p.pool != pb.PoolingParameter.AVE:
        raise RuntimeError(f"layer '{lp.name}': only MAX and AVE pooling are translated")
    # Caffe divides by the window clipped to the padded input [-pad, size + pad), padding included.
    divisors = []
    for o, s, k, size, pd in zip(out, stride, kernel, (height, width), pad):
        starts = torch.arange(o, dtype=torch.float64) * s - pd
        divisors.append(torch.clamp(starts + k, max=size + pd) - starts)
    divisor = divisors[0][:, None] * divisors[1][None, :]

    def run(bottoms, tensors):
        x = F.pad(bottoms[0], spec)
        sums = F.avg_pool2d(x, kernel, stride, divisor_override=1)[:, :, :out[0], :out[1]]
        return [sums / divisor.to(sums.dtype)]
    return run


def _lrn(lp, bottom_shapes, phase):
    F = _torch().nn.functional
    p = lp.lrn_param
    size, alpha, beta, k = p.local_size, p.alpha, p.beta, p.k
    half = (size - 1) // 2
    if p.norm_region == pb.LRNParameter.ACROSS_CHANNELS:
        channels = bottom_shapes[0][1]

        def run(bottoms, tensors):
            x = bottoms[0]
            squares = F.pad(x * x, (0, 0, 0, 0, half, half))
            window_sums = sum(squares[:, i:i + channels] for i in range(size))
            return [x * (k + alpha / size * window_sums) ** -beta]
        return run

    def run_within(bottoms, tensors):
        # Caffe builds this from Power, AVE Pooling (divisor size^2, padding counted) and Power: no k.
        x = bottoms[0]
        mean_squares = F.avg_pool2d(x * x, size, 1, half, count_include_pad=True)
        return [x * (1 + alpha * mean_squares) ** -beta]
    return run_within


def _relu(lp, bottom_shapes, phase):
    torch = _torch()
    slope = lp.relu_param.negative_slope

    def run(bottoms, tensors):
        x = bottoms[0]
        return [torch.where(x > 0, x, slope * x)]
    return run


def _channel_view(vector, ndim):
    return vector.reshape((1, -1) + (1,) * (ndim - 2))


def _batch_norm(lp, bottom_shapes, phase):
    torch = _torch()
    p = lp.batch_norm_param
    use_global_stats = p.use_global_stats if p.HasField("use_global_stats") else phase == TEST
    eps, fraction = p.eps, p.moving_average_fraction
    ndim = len(bottom_shapes[0])
    axes = (0,) + tuple(range(2, ndim))
    per_channel = math.prod(bottom_shapes[0]) // (bottom_shapes[0][1] if ndim > 1 else 1)

    def run(bottoms, tensors):
        x = bottoms[0]
        mean_sum, variance_sum, weight = tensors
        if use_global_stats:
            factor = 0.0 if float(weight[0]) == 0 else 1.0 / float(weight[0])
            mean, variance = mean_sum * factor, variance_sum * factor
        else:
            mean = x.mean(dim=axes)
            variance = ((x - _channel_view(mean, ndim)) ** 2).mean(dim=axes)
            with torch.no_grad():
                correction = per_channel / (per_channel - 1) if per_channel > 1 else 1.0
                weight.mul_(fraction).add_(1)
                mean_sum.mul_(fraction).add_(mean)
                variance_sum.mul_(fraction).add_(variance * correction)
        inv_std = 1.0 / torch.sqrt(variance + eps)
        return [(x - _channel_view(mean, ndim)) * _channel_view(inv_std, ndim)]
    return run


def _broadcast(operand, bottom_shape, axis):
    """``operand`` shaped to broadcast against bottom from ``axis`` (a scalar operand: anywhere)."""
    if operand.numel() == 1:
        return operand.reshape(())
    axis = axis % len(bottom_shape)
    return operand.reshape((1,) * axis + tuple(operand.shape) + (1,) * (len(bottom_shape) - axis - operand.dim()))


def _scale(lp, bottom_shapes, phase):
    p = lp.scale_param
    shape = bottom_shapes[0]

    def run(bottoms, tensors):
        scale = bottoms[1] if len(bottoms) > 1 else tensors[0]
        y = bottoms[0] * _broadcast(scale, shape, p.axis)
        if p.bias_term:
            y = y + _broadcast(tensors[-1].reshape(scale.shape), shape, p.axis)
        return [y]
    return run


def _bias(lp, bottom_shapes, phase):
    p = lp.bias_param
    shape = bottom_shapes[0]

    def run(bottoms, tensors):
        bias = bottoms[1] if len(bottoms) > 1 else tensors[0]
        return [bottoms[0] + _broadcast(bias, shape, p.axis)]
    return run


def _eltwise(lp, bottom_shapes, phase):
    torch = _torch()
    p = lp.eltwise_param
    coeffs = list(p.coeff) or [1.0] * len(bottom_shapes)

    def run(bottoms, tensors):
        if p.operation == pb.EltwiseParameter.PROD:
            return [functools.reduce(lambda a, b: a * b, bottoms)]
        if p.operation == pb.EltwiseParameter.SUM:
            return [sum(c * x if c != 1 else x for c, x in zip(coeffs, bottoms))]
        # MAX: a later bottom wins only when strictly larger, so ties go to the first, as Caffe's mask.
        return [functools.reduce(lambda best, x: torch.where(x > best, x, best), bottoms)]
    return run


def _concat(lp, bottom_shapes, phase):
    torch = _torch()
    p = lp.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis

    def run(bottoms, tensors):
        return [torch.cat(bottoms, dim=axis % bottoms[0].dim())]
    return run


def _split(lp, bottom_shapes, phase):
    # Each top is its own view so that it carries its own gradient, as each Split top has its own diff.
    return lambda bottoms, tensors: [bottoms[0].view_as(bottoms[0]) for _ in lp.top]


def _dropout(lp, bottom_shapes, phase):
    ratio = lp.dropout_param.dropout_ratio
    F = _torch().nn.functional
    if phase == TRAIN:
        # Random masks cannot match minicaffe's; comparisons use ratio 0 (or the TEST phase).
        return lambda bottoms, tensors: [F.dropout(bottoms[0], ratio, training=True)]
    return lambda bottoms, tensors: [bottoms[0]]


def _softmax(lp, bottom_shapes, phase):
    F = _torch().nn.functional
    axis = lp.softmax_param.axis
    return lambda bottoms, tensors: [F.softmax(bottoms[0], dim=axis % bottoms[0].dim())]


def _softmax_with_loss(lp, bottom_shapes, phase):
    torch = _torch()
    F = torch.nn.functional
    p = lp.loss_param
    shape = bottom_shapes[0]
    axis = lp.softmax_param.axis % len(shape)
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    mode = p.normalization
    if p.HasField("normalize") and not p.HasField("normalization"):
        mode = pb.LossParameter.VALID if p.normalize else pb.LossParameter.BATCH_SIZE
    ignore = p.ignore_label if p.HasField("ignore_label") else None

    def run(bottoms, tensors):
        scores, labels = bottoms
        log_prob = F.log_softmax(scores, dim=axis).reshape(outer, shape[axis], inner)
        labels = labels.reshape(outer, 1, inner).long()
        valid = torch.ones_like(labels, dtype=torch.bool) if ignore is None else labels != ignore
        picked = torch.gather(log_prob, 1, torch.where(valid, labels, 0))
        total = -(picked * valid).sum()
        count = {pb.LossParameter.FULL: outer * inner, pb.LossParameter.VALID: int(valid.sum()),
                 pb.LossParameter.BATCH_SIZE: outer, pb.LossParameter.NONE: 1}[mode]
        outputs = [total / max(1, count)]
        if len(lp.top) > 1:
            outputs.append(F.softmax(scores, dim=axis))
        return outputs
    return run


def _accuracy(lp, bottom_shapes, phase):
    torch = _torch()
    p = lp.accuracy_param
    shape = bottom_shapes[0]
    axis = p.axis % len(shape)
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    ignore = p.ignore_label if p.HasField("ignore_label") else None
    if len(lp.top) > 1:
        raise RuntimeError(f"layer '{lp.name}': the per-class accuracy top is not translated")

    def run(bottoms, tensors):
        scores = bottoms[0].detach().reshape(outer, shape[axis], inner)
        labels = bottoms[1].detach().reshape(outer, 1, inner).long()
        valid = torch.ones_like(labels, dtype=torch.bool) if ignore is None else labels != ignore
        true_score = torch.gather(scores, 1, torch.where(valid, labels, 0))
        # Caffe counts the classes scoring at least the true one, the true one excluded: ties count against.
        better = (scores >= true_score).sum(dim=1, keepdim=True) - 1
        correct = ((better < p.top_k) & valid).sum()
        return [correct.to(scores.dtype) / max(1, int(valid.sum()))]
    return run


LAYERS = {
    "Convolution": _convolution,
    "InnerProduct": _inner_product,
    "Pooling": _pooling,
    "LRN": _lrn,
    "ReLU": _relu,
    "BatchNorm": _batch_norm,
    "Scale": _scale,
    "Bias": _bias,
    "Eltwise": _eltwise,
    "Concat": _concat,
    "Split": _split,
    "Dropout": _dropout,
    "Softmax": _softmax,
    "SoftmaxWithLoss": _softmax_with_loss,
    "Accuracy": _accuracy,
}
