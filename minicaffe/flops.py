"""Arithmetic cost of a built ``Net``: FLOPs per layer for one forward and one backward pass, and parameters.

Conventions, so that the numbers can be compared with published ones:
  * A multiply-add counts as 2 FLOPs. Convolution, Deconvolution and InnerProduct are counted
    exactly from their GEMMs: forward is 2 x (top or bottom elements) x (weights per output channel),
    plus one add per output element for the bias. Backward is the data-gradient GEMM (only when the
    net back-propagates into the bottom), the weight-gradient GEMM and the bias-gradient sum (each only
    when the net computes that parameter's gradient, i.e. lr_mult != 0), so a first convolution
    costs one GEMM less backward than the others, as it runs.
  * Every other layer is memory-bound: its time goes into reading and writing the blobs, not into
    arithmetic, so it is counted roughly, as a small constant number of FLOPs per element (the table
    below; exp, pow and divisions count as 1). Forward is counted per element of the tops or of the
    first bottom, whichever is larger (a loss reads N x C scores to write one value), backward per
    element of the bottoms that receive a gradient. Pooling is counted per window element instead
    (one compare or add per input element of each window).
Counts are for the whole batch the net was built with, at its current shapes.
"""
import dataclasses

# (forward FLOPs per output element, backward FLOPs per back-propagated bottom element).
ELEMENTWISE_FLOPS = {
    "ReLU": (1, 1), "PReLU": (2, 3), "ELU": (3, 2), "Sigmoid": (3, 2), "TanH": (3, 2), "AbsVal": (1, 1),
    "BNLL": (3, 3), "Power": (3, 3), "Exp": (2, 2), "Log": (2, 2), "Threshold": (1, 0), "Clip": (2, 1),
    "Dropout": (2, 1),
    # mean (add), variance (square, add), normalize (subtract, multiply); backward two reductions + 2.
    "BatchNorm": (5, 6),
    # scale (multiply) and bias (add); backward: data gradient, scale gradient (multiply-add), bias sum.
    "Scale": (2, 4), "Bias": (1, 1),
    # across channels with a sliding window: square, window add and subtract, scale, pow, multiply.
    "LRN": (6, 9),
    "Eltwise": (1, 1),
    # max, subtract, exp, sum, divide; the loss adds a log; backward subtracts the one-hot label.
    "Softmax": (5, 4), "SoftmaxWithLoss": (6, 1),
    "EuclideanLoss": (3, 1), "SigmoidCrossEntropyLoss": (5, 2), "HingeLoss": (3, 1),
    "InfogainLoss": (2, 2), "MultinomialLogisticLoss": (1, 1), "ContrastiveLoss": (4, 3),
    "Reduction": (1, 1), "Accuracy": (1, 0),
    # Split's backward adds the gradients of its tops.
    "Split": (0, 1),
}
# Data movement only (copies, views, gathers, inputs): no arithmetic.
NO_ARITHMETIC = {"Input", "DummyData", "Data", "MemoryData", "HDF5Data", "ImageData", "Python",
                 "Concat", "Slice", "Flatten", "Reshape", "Crop", "Tile", "Silence", "ArgMax", "Embed"}
# Layers not named above are counted as 1 FLOP per element each way.
DEFAULT_ELEMENTWISE_FLOPS = (1, 1)


@dataclasses.dataclass(frozen=True)
class LayerCost:
    name: str
    type: str
    forward_flops: int
    backward_flops: int
    param_count: int
    param_bytes: int


@dataclasses.dataclass(frozen=True)
class NetCost:
    batch: int
    forward_flops: int
    backward_flops: int
    param_count: int
    param_bytes: int

    @property
    def total_flops(self):
        return self.forward_flops + self.backward_flops


def layer_costs(net):
    """One LayerCost per layer of ``net``, in the net's order."""
    costs = []
    for i, layer in enumerate(net.layers):
        forward, backward = _layer_flops(layer, net.bottom_vecs[i], net.top_vecs[i],
                                         net.bottom_need_backward[i], net.layer_need_backward[i])
        costs.append(LayerCost(name=layer.name, type=layer.type_name, forward_flops=forward,
                               backward_flops=backward,
                               param_count=sum(blob.count for blob in layer.blobs),
                               param_bytes=sum(blob.data.nbytes for blob in layer.blobs)))
    return costs


def net_flops(net):
    """The NetCost totals of ``layer_costs(net)`` (for the whole batch; see ``batch``)."""
    costs = layer_costs(net)
    return NetCost(batch=net.batch_size(),
                   forward_flops=sum(c.forward_flops for c in costs),
                   backward_flops=sum(c.backward_flops for c in costs),
                   param_count=sum(c.param_count for c in costs),
                   param_bytes=sum(c.param_bytes for c in costs))


def _layer_flops(layer, bottoms, tops, bottom_need_backward, layer_need_backward):
    kind = layer.type_name
    if kind in ("Convolution", "Deconvolution", "InnerProduct"):
        forward, backward = _gemm_layer_flops(layer, bottoms, tops, bottom_need_backward)
    elif kind == "Pooling":
        window = layer.kernel_h * layer.kernel_w
        forward = window * tops[0].count
        backward = window * tops[0].count if bottom_need_backward[0] else 0
    elif kind in NO_ARITHMETIC:
        forward = backward = 0
    else:
        per_top, per_bottom = ELEMENTWISE_FLOPS.get(kind, DEFAULT_ELEMENTWISE_FLOPS)
        forward = per_top * max(sum(top.count for top in tops), bottoms[0].count if bottoms else 0)
        backward = per_bottom * sum(b.count for b, need in zip(bottoms, bottom_need_backward) if need)
    return forward, (backward if layer_need_backward else 0)


def _gemm_layer_flops(layer, bottoms, tops, bottom_need_backward):
    weight = layer.blobs[0]
    # Multiply-adds: each output element of the GEMM sums over one output channel's weights.
    if layer.type_name == "InnerProduct":
        macs = tops[0].count * (weight.count // layer.num_output)
    elif layer.type_name == "Convolution":
        macs = tops[0].count * (weight.count // weight.shape[0])
    else:  # Deconvolution runs a convolution's data-gradient GEMM over its bottom
        macs = bottoms[0].count * (weight.count // weight.shape[0])
    has_bias = len(layer.blobs) > 1
    propagate = list(layer.param_propagate_down) + [False] * len(layer.blobs)
    forward = 2 * macs + (tops[0].count if has_bias else 0)
    backward = 2 * macs if bottom_need_backward[0] else 0
    backward += 2 * macs if propagate[0] else 0
    backward += tops[0].count if has_bias and propagate[1] else 0
    return forward, backward
