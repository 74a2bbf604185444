"""Per-layer statistics of the reduced-precision tensors: what ``--debug_info`` and
``precision_stats`` print.

For each quantized tensor of a layer (its input, weights and output error) the last pass's shared
exponent, the fraction of nonzero values flushed to zero, and the fraction clipped at the INT16
limit; for each GEMM pass the INT32 overflow events counted inside a chunk (``debug_overflow``).
"""
from ..log import get_logger

# The quantized tensors of a layer, in the order they are printed.
ROLES = ("input", "weights", "error")


class TensorStats:
    __slots__ = ("exponent", "count", "flushed", "clipped", "max_abs")

    def __init__(self):
        self.exponent, self.count, self.flushed, self.clipped, self.max_abs = None, 0, 0, 0, 0.0

    def record(self, exponent, count, flushed, clipped, max_abs):
        self.exponent, self.count, self.flushed, self.clipped, self.max_abs = (exponent, count, flushed,
                                                                             clipped, max_abs)

    def describe(self):
        if self.exponent is None:
            return f"max|x| {self.max_abs:.3g}"
        scale = 1 / self.count if self.count else 0.0
        return (f"e={self.exponent} max|x| {self.max_abs:.3g} flushed {100 * self.flushed * scale:.3g}% "
                f"clipped {100 * self.clipped * scale:.3g}%")


class LayerStats:
    """The statistics of one layer, updated on every pass and printed every ``interval`` backward passes."""

    def __init__(self, layer_name, precision_name, interval=0):
        self.layer_name = layer_name
        self.precision_name = precision_name
        self.interval = interval
        self.tensors = {}
        self.overflow_events = {}
        self.backward_passes = 0

    def tensor(self, role):
        stats = self.tensors.get(role)
        if stats is None:
            stats = self.tensors[role] = TensorStats()
        return stats

    def add_overflow(self, gemm_pass, events):
        self.overflow_events[gemm_pass] = self.overflow_events.get(gemm_pass, 0) + int(events)

    def backward_done(self):
        self.backward_passes += 1
        if self.interval and self.backward_passes % self.interval == 0:
            get_logger().info(self.line())

    def line(self):
        parts = [f"{role}: {self.tensors[role].describe()}" for role in ROLES if role in self.tensors]
        overflow = sum(self.overflow_events.values())
        detail = ", ".join(f"{k} {v}" for k, v in self.overflow_events.items() if v)
        parts.append(f"overflow-chunk events {overflow}" + (f" ({detail})" if detail else ""))
        return f"[precision] {self.layer_name} {self.precision_name}: " + "; ".join(parts)


def net_stats_lines(net):
    """One line per reduced-precision layer of ``net`` that keeps statistics."""
    lines = []
    for layer in net.layers:
        stats = getattr(getattr(layer, "lowp", None), "stats", None)
        if stats is not None:
            lines.append(stats.line())
    return lines
