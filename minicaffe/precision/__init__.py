"""Reduced-precision training (DFP16, BF16): the policy that decides which layers and tensors are
quantized, and the Convolution / InnerProduct drivers that run their GEMMs in that precision.

See policy.py for the rules, formats.py for the number formats, conv.py and inner_product.py for
the drivers, stats.py for the per-layer statistics.
"""
from .conv import LowPrecisionConvolution
from .formats import check_float32
from .inner_product import LowPrecisionInnerProduct
from .policy import (BF16, DFP16, FP32, LayerPrecision, layer_precision, parse_precision, precision_name,
                     resolve_net_precision, set_net_precision)
from .stats import net_stats_lines

__all__ = ["BF16", "DFP16", "FP32", "LayerPrecision", "LowPrecisionConvolution", "LowPrecisionInnerProduct",
           "check_float32", "layer_precision", "parse_precision", "precision_name", "resolve_net_precision",
           "set_net_precision", "net_stats_lines"]
