"""Which layers compute in which precision, and with which options.

A net-level ``precision`` (or the solver's, or ``--precision``) is the default of every Convolution
and InnerProduct layer; a layer-level ``precision`` wins over it. As in the paper's recipe, the first
Convolution (it sees raw pixels) and the last InnerProduct (its output feeds the loss) stay FP32
unless they set their own precision. ``precision_param`` merges the same way, field by field: the
net's (or the solver's), then the layer's.
"""
from dataclasses import dataclass, field

from ..proto import minicaffe_pb2 as pb

FP32, BF16, DFP16 = pb.FP32, pb.BF16, pb.DFP16
# The layer types whose GEMMs can run in reduced precision; every other layer stays FP32.
GEMM_LAYER_TYPES = ("Convolution", "InnerProduct")
# The paper's INT32 accumulation chain: 256 input channels times the kernel area.
CHUNK_CHANNELS = 256


def precision_name(mode):
    return pb.Precision.Name(mode)


def parse_precision(value):
    """A Precision enum value from an int or a name such as 'dfp16' (None stays None)."""
    if value is None or isinstance(value, int):
        return value
    try:
        return pb.Precision.Value(str(value).upper())
    except ValueError:
        raise ValueError(f"unknown precision '{value}' (known: FP32, BF16, DFP16)") from None


@dataclass
class LayerPrecision:
    """The resolved setting of one layer: the mode, its options and where statistics go."""
    mode: int = FP32
    options: pb.PrecisionParameter = field(default_factory=pb.PrecisionParameter)
    # Print this layer's statistics every this many training backward passes (0: never print).
    stats_interval: int = 0

    @property
    def name(self):
        return precision_name(self.mode)

    @property
    def is_fp32(self):
        return self.mode == FP32

    @property
    def emulate_bf16(self):
        return self.mode == BF16 and self.options.bf16_mode == pb.PrecisionParameter.EMULATE

    @property
    def keeps_stats(self):
        return self.options.precision_stats or self.options.debug_overflow or self.stats_interval > 0

    def k_chunk(self, kernel_area=1):
        return self.options.k_chunk or CHUNK_CHANNELS * kernel_area


def layer_precision(layer_param, default=FP32, options=None, stats_interval=0):
    """The setting of one layer given the net's default mode and options."""
    merged = pb.PrecisionParameter()
    if options is not None:
        merged.CopyFrom(options)
    merged.MergeFrom(layer_param.precision_param)
    mode = layer_param.precision if layer_param.HasField("precision") else default
    return LayerPrecision(mode, merged, stats_interval)


def resolve_net_precision(layer_params, net_param, precision=None, options=None, stats_interval=0):
    """One LayerPrecision per layer parameter (None for layers that have no GEMM to lower).

    ``precision`` and ``options`` replace the net's own net-level settings when given (the
    solver's field, or ``--precision``); layer-level settings still apply.
    """
    default = net_param.precision if precision is None else precision
    merged = pb.PrecisionParameter()
    merged.CopyFrom(net_param.precision_param)
    if options is not None:
        merged.MergeFrom(options)
    gemm_indices = [i for i, lp in enumerate(layer_params) if lp.type in GEMM_LAYER_TYPES]
    convs = [i for i in gemm_indices if layer_params[i].type == "Convolution"]
    inner_products = [i for i in gemm_indices if layer_params[i].type == "InnerProduct"]
    kept_fp32 = set(convs[:1] + inner_products[-1:])
    settings = [None] * len(layer_params)
    for i in gemm_indices:
        settings[i] = layer_precision(layer_params[i], FP32 if i in kept_fp32 else default, merged,
                                      stats_interval)
    return settings


def set_net_precision(net, net_param, precision=None, options=None):
    """Re-resolves every layer of a built ``net`` as if it had been built with these settings
    (``net_param`` gives the net-level defaults, e.g. the parsed prototxt); used to compare precisions
    on one net without rebuilding it."""
    settings = resolve_net_precision([layer.param for layer in net.layers], net_param,
                                     parse_precision(precision), options)
    for layer, setting in zip(net.layers, settings):
        if setting is not None and hasattr(layer, "set_precision"):
            layer.set_precision(setting)
