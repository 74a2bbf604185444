"""Convolution in DFP16 or BF16: forward, backward-data and backward-weights with reduced-precision
GEMM inputs and FP32 outputs and weight gradients; the bias and its gradient stay FP32.

Each tensor is encoded once per pass: the input and the weights in forward (backward reuses them),
the output error once in backward. DFP16 and native BF16 run minicaffe/kernels/conv_lowp.pyx, which
lowers the 16-bit input with im2col and calls the 16-bit GEMM per image, images spread over the
threads. Emulated BF16 rounds the FP32 tensors to BF16-representable values and runs the FP32
convolution kernel on them.
"""
from ..kernels import batchnorm, conv
from ..kernels.parallel import num_threads
from .formats import Buffers, make_format
from .policy import DFP16
from .stats import LayerStats


class LowPrecisionConvolution:
    def __init__(self, layer, setting):
        self.layer = layer
        self.setting = setting
        self.stats = LayerStats(layer.name, setting.name, setting.stats_interval) if setting.keeps_stats else None
        self.format = make_format(layer, setting, self.stats)
        self.emulated = setting.emulate_bf16
        self.debug_overflow = setting.mode == DFP16 and setting.options.debug_overflow
        self.k_chunk = setting.k_chunk(layer.kernel[0] * layer.kernel[1])
        self.buffers = Buffers()
        self.inputs = []
        if not self.emulated:
            from ..kernels import conv_lowp
            self.kernels = conv_lowp

    def _encode(self, key, x, role, what):
        out = self.buffers.get(key, x.shape, self.format.storage)
        return out, self.format.encode(x, out, role, what)

    def _geometry(self):
        layer = self.layer
        return layer.pad, layer.stride, layer.dilation, layer.group

    def _fp32_workspace(self, bottom, top):
        return self.layer._workspace_for(bottom[0].shape, top[0].shape, bottom[0].dtype)

    def forward(self, bottom, top):
        layer = self.layer
        geometry = self._geometry()
        bias = layer.blobs[1].data if layer.bias_term else None
        self.w_q, self.e_w = self._encode("w", layer.blobs[0].data, "weights",
                                          f"weight blob '{layer.blobs[0].name}'")
        self.inputs = []
        for i, (b, t) in enumerate(zip(bottom, top)):
            x_q, e_x = self._encode(("x", i), b.data, "input", f"bottom blob '{b.name}'")
            self.inputs.append((x_q, e_x))
            if self.emulated:
                conv.conv_forward(x_q, self.w_q, bias, t.data, *geometry, self._fp32_workspace(bottom, top))
                continue
            events = self.kernels.conv_forward_lowp(x_q, self.w_q, bias, t.data, 2.0 ** (e_x + self.e_w),
                                                    *geometry, self.k_chunk, self.debug_overflow,
                                                    self._workspace(b.shape))
            self._overflow("forward", events)

    def backward(self, top, propagate_down, bottom):
        layer = self.layer
        geometry = self._geometry()
        weight = layer.blobs[0]
        dw = weight.diff if layer.param_propagate_down[0] else None
        for i, (t, down, b) in enumerate(zip(top, propagate_down, bottom)):
            if layer.bias_term and layer.param_propagate_down[1]:
                dy = t.diff
                batchnorm.channel_sums(dy.reshape(dy.shape[0], dy.shape[1], -1), layer.blobs[1].diff,
                                       num_threads())
            if dw is None and not down:
                continue
            dy_q, e_dy = self._encode("dy", t.diff, "error", f"top blob '{t.name}' diff")
            x_q, e_x = self.inputs[i]
            dx = b.diff if down else None
            if self.emulated:
                conv.conv_backward(x_q, self.w_q, dy_q, dx, dw, None, *geometry,
                                   self._fp32_workspace(bottom, top))
                continue
            events = self.kernels.conv_backward_lowp(x_q, self.w_q, dy_q, dx, dw, 2.0 ** (e_dy + self.e_w),
                                                     2.0 ** (e_dy + e_x), *geometry, self.k_chunk,
                                                     self.debug_overflow, self._workspace(b.shape))
            self._overflow("backward", events)
        if self.stats is not None:
            self.stats.backward_done()

    def _workspace(self, bottom_shape):
        size = self.kernels.conv_lowp_workspace_bytes(bottom_shape, self.layer.blobs[0].shape,
                                                      *self._geometry(), num_threads())
        return self.buffers.get("workspace", (size,), "uint8")

    def _overflow(self, gemm_pass, events):
        if self.stats is not None and self.debug_overflow:
            self.stats.add_overflow(gemm_pass, events)
