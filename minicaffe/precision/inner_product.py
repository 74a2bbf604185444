"""InnerProduct in DFP16 or BF16: forward, backward-data and backward-weights as reduced-precision
GEMMs with FP32 outputs; the bias and its gradient stay FP32.

Each tensor is encoded once per pass: the input and the weights in forward (backward reuses them,
since neither changes between a forward and its backward), the output error once in backward.
"""
from .formats import Buffers, make_format
from .stats import LayerStats


class LowPrecisionInnerProduct:
    def __init__(self, layer, setting):
        self.layer = layer
        self.setting = setting
        self.stats = LayerStats(layer.name, setting.name, setting.stats_interval) if setting.keeps_stats else None
        self.format = make_format(layer, setting, self.stats)
        self.k_chunk = setting.k_chunk()
        self.buffers = Buffers()
        self.e_x = self.e_w = 0

    def _encode(self, key, x, role, what):
        out = self.buffers.get(key, x.shape, self.format.storage)
        return out, self.format.encode(x, out, role, what)

    def forward(self, x, weight, y, transpose, bottom_name):
        """y[rows, out] = x[rows, in] @ W^T (W^T itself with ``transpose``)."""
        layer = self.layer
        self.x_q, self.e_x = self._encode("x", x, "input", f"bottom blob '{bottom_name}'")
        self.w_q, self.e_w = self._encode("w", weight, "weights", f"weight blob '{layer.blobs[0].name}'")
        self.format.gemm(self.x_q, self.e_x, self.w_q, self.e_w, y, 0.0, False, not transpose, self.k_chunk,
                         "forward")

    def backward(self, dy, weight_diff, dx, transpose, top_name):
        """Adds the weight gradient into ``weight_diff`` and writes ``dx`` (either may be None)."""
        dy_q, e_dy = self._encode("dy", dy, "error", f"top blob '{top_name}' diff")
        if weight_diff is not None:
            if transpose:
                self.format.gemm(self.x_q, self.e_x, dy_q, e_dy, weight_diff, 1.0, True, False, self.k_chunk,
                                 "backward-weights")
            else:
                self.format.gemm(dy_q, e_dy, self.x_q, self.e_x, weight_diff, 1.0, True, False, self.k_chunk,
                                 "backward-weights")
        if dx is not None:
            self.format.gemm(dy_q, e_dy, self.w_q, self.e_w, dx, 0.0, False, transpose, self.k_chunk,
                             "backward-data")
        if self.stats is not None:
            self.stats.backward_done()
