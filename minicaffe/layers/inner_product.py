"""Fully connected layer, as Caffe's InnerProductLayer."""
import numpy as np

from minicaffe.errors import MinicaffeError
from minicaffe.kernels.skinny_gemm import matmul
from minicaffe.layer import Layer, register
from minicaffe.precision import LowPrecisionInnerProduct, check_float32, layer_precision


@register("InnerProduct")
class InnerProductLayer(Layer):
    """top = bottom @ W^T + bias, the bottom flattened to [M, K] from ``axis`` on.

    The weight is [num_output, K], or [K, num_output] with ``transpose: true``. The top has the
    bottom's axes before ``axis`` and then num_output. At small batches the forward and
    bottom-gradient products go to the skinny kernels (kernels/skinny_gemm.pyx), else to BLAS.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.param.inner_product_param
        self.num_output = p.num_output
        if self.num_output < 1:
            raise self.error("num_output must be positive")
        self.bias_term = p.bias_term
        self.transpose = p.transpose
        axis = self._axis(bottom[0])
        inputs = bottom[0].count_range(axis)
        shape = (inputs, self.num_output) if self.transpose else (self.num_output, inputs)
        self.blobs = self.weight_and_bias(shape, self.num_output, p)
        self.ones = np.ones(0, bottom[0].dtype)
        self.set_precision(layer_precision(self.param))

    def set_precision(self, setting):
        """FP32, or a reduced-precision GEMM driver (the net resolves the setting; see precision/)."""
        self.precision = setting
        self.lowp = None if setting.is_fp32 else LowPrecisionInnerProduct(self, setting)

    def _axis(self, blob):
        try:
            return blob.canonical_axis(self.param.inner_product_param.axis)
        except MinicaffeError as err:
            raise self.error(f"inner_product_param.{err}") from None

    def reshape(self, bottom, top):
        axis = self._axis(bottom[0])
        shape = bottom[0].shape
        inputs = bottom[0].count_range(axis)
        weight_shape = self.blobs[0].shape
        expected = weight_shape[0] if self.transpose else weight_shape[1]
        if inputs != expected:
            raise self.error(f"bottom shape {shape} flattens from axis {axis} to {inputs} inputs, but weight "
                             f"shape {weight_shape} takes {expected}")
        self.rows = bottom[0].count_range(0, axis)
        self.inputs = inputs
        top[0].reshape((*shape[:axis], self.num_output))
        if self.ones.size < self.rows:
            self.ones = np.ones(self.rows, bottom[0].dtype)

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.rows, self.inputs)
        y = top[0].data.reshape(self.rows, self.num_output)
        if self.lowp is not None:
            check_float32(self, x)
            self.lowp.forward(x, self.blobs[0].data, y, self.transpose, bottom[0].name)
        else:
            matmul(x, self.blobs[0].data, y, trans_b=not self.transpose)
        if self.bias_term:
            np.add(y, self.blobs[1].data, out=y)

    def backward(self, top, propagate_down, bottom):
        x = bottom[0].data.reshape(self.rows, self.inputs)
        dy = top[0].diff.reshape(self.rows, self.num_output)
        weight = self.blobs[0]
        if self.lowp is not None:
            self._backward_bias(dy)
            self.lowp.backward(dy, weight.diff if self.param_propagate_down[0] else None,
                               bottom[0].diff.reshape(self.rows, self.inputs) if propagate_down[0] else None,
                               self.transpose, top[0].name)
            return
        if self.param_propagate_down[0]:
            if self.transpose:
                matmul(x, dy, weight.diff, trans_a=True, beta=1.0)
            else:
                matmul(dy, x, weight.diff, trans_a=True, beta=1.0)
        self._backward_bias(dy)
        if propagate_down[0]:
            matmul(dy, weight.data, bottom[0].diff.reshape(self.rows, self.inputs), trans_b=self.transpose)

    def _backward_bias(self, dy):
        if self.bias_term and self.param_propagate_down[1]:
            matmul(self.ones[:self.rows].reshape(1, self.rows), dy,
                   self.blobs[1].diff.reshape(1, self.num_output), beta=1.0)
