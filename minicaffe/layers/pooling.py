"""Spatial pooling (MAX, AVE and STOCHASTIC), as Caffe's PoolingLayer."""
import numpy as np

from minicaffe import rng
from minicaffe.kernels import pooling
from minicaffe.kernels.parallel import num_threads
from minicaffe.layer import Layer, register
from minicaffe.proto import minicaffe_pb2 as pb

POOL = pb.PoolingParameter


@register("Pooling")
class PoolingLayer(Layer):
    """Pools each (num, channel) plane over windows of kernel_h x kernel_w.

    The output size follows Caffe: rounded up (round_mode CEIL, the default) or down (FLOOR), and
    with padding a last window that would start inside the padding is dropped. MAX pooling keeps
    the argmax of every window (an int32 index into its plane) for backward, and outputs it as a
    float second top when one is given.

    STOCHASTIC pooling (for non-negative inputs, after a ReLU) samples in TRAIN one element per
    window with probability proportional to its value, from the layer's own random stream seeded
    from the framework's, and routes the gradient to it; in TEST it outputs the probability-weighted
    mean sum(x^2) / sum(x), whose exact gradient its backward pass computes.
    """

    exact_num_bottom = 1
    min_top = 1
    max_top = 2

    def setup(self, bottom, top):
        p = self.param.pooling_param
        self.method = p.pool
        if len(top) > 1 and self.method != POOL.MAX:
            raise self.error("only MAX pooling has a second top (the argmax mask)")
        self.global_pooling = p.global_pooling
        self.round_up = p.round_mode == POOL.CEIL
        self.kernel_h, self.kernel_w = self._read_kernel(p)
        self.pad_h, self.pad_w = self._read_pair(p, "pad")
        self.stride_h, self.stride_w = self._read_pair(p, "stride")
        if self.global_pooling and (self.pad_h or self.pad_w or self.stride_h != 1 or self.stride_w != 1):
            raise self.error("global_pooling takes pad 0 and stride 1 only")
        if self.stride_h < 1 or self.stride_w < 1:
            raise self.error(f"stride must be positive, got {self.stride_h} x {self.stride_w}")
        if not self.global_pooling and (self.pad_h >= self.kernel_h or self.pad_w >= self.kernel_w):
            raise self.error(f"pad {self.pad_h} x {self.pad_w} must be smaller than the kernel "
                             f"{self.kernel_h} x {self.kernel_w}")
        self.mask = np.zeros((0, 0, 0), dtype=np.int32)
        self.sampling = self.method == POOL.STOCHASTIC and self.phase == pb.TRAIN
        if self.sampling:
            self.sampler = np.random.default_rng(rng.derive_seed())
            self.uniforms = np.zeros((0, 0, 0))

    def _read_kernel(self, p):
        given = [f for f in ("kernel_size", "kernel_h", "kernel_w") if p.HasField(f)]
        if self.global_pooling:
            if given:
                raise self.error(f"global_pooling takes its kernel from the input; remove {given[0]}")
            return 0, 0
        if p.HasField("kernel_size") and given != ["kernel_size"]:
            raise self.error("give kernel_size or kernel_h and kernel_w, not both")
        if not p.HasField("kernel_size") and len(given) != 2:
            raise self.error("needs kernel_size, or both kernel_h and kernel_w")
        kernel = (p.kernel_size,) * 2 if p.HasField("kernel_size") else (p.kernel_h, p.kernel_w)
        if min(kernel) < 1:
            raise self.error(f"kernel size must be positive, got {kernel[0]} x {kernel[1]}")
        return kernel

    def _read_pair(self, p, name):
        """Reads ``name`` or ``name_h`` with ``name_w``, which Caffe accepts exclusively."""
        has_h, has_w = p.HasField(f"{name}_h"), p.HasField(f"{name}_w")
        if has_h != has_w or (has_h and p.HasField(name)):
            raise self.error(f"give {name}, or both {name}_h and {name}_w")
        if has_h:
            return getattr(p, f"{name}_h"), getattr(p, f"{name}_w")
        return (getattr(p, name),) * 2

    def _pooled_size(self, size, kernel, stride, pad, what):
        span = size + 2 * pad - kernel
        if span < 0:
            raise self.error(f"kernel {kernel} is larger than the padded input {what} {size + 2 * pad}")
        pooled = (-(-span // stride) if self.round_up else span // stride) + 1
        # Caffe drops a last window that starts in the padding, checking both axes when any is padded.
        if (self.pad_h or self.pad_w) and (pooled - 1) * stride >= size + pad:
            pooled -= 1
        if (pooled - 1) * stride >= size + pad:
            raise self.error(f"the last pooling window along the {what} lies outside the input "
                             f"(kernel {kernel}, stride {stride}, {what} {size})")
        return pooled

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"needs a 4-D (num, channels, height, width) bottom, got shape {bottom[0].shape}")
        num, channels, height, width = bottom[0].shape
        if self.global_pooling:
            self.kernel_h, self.kernel_w = height, width
        pooled_h = self._pooled_size(height, self.kernel_h, self.stride_h, self.pad_h, "height")
        pooled_w = self._pooled_size(width, self.kernel_w, self.stride_w, self.pad_w, "width")
        shape = (num, channels, pooled_h, pooled_w)
        for t in top:
            t.reshape(shape)
        planes_shape = (num * channels, pooled_h, pooled_w)
        if (self.method == POOL.MAX or self.sampling) and self.mask.shape != planes_shape:
            self.mask = np.zeros(planes_shape, dtype=np.int32)
        if self.sampling and self.uniforms.shape != planes_shape:
            self.uniforms = np.zeros(planes_shape)

    def _planes(self, array):
        return array.reshape(-1, array.shape[2], array.shape[3])

    def _window(self):
        return (self.kernel_h, self.kernel_w, self.stride_h, self.stride_w, self.pad_h, self.pad_w)

    def forward(self, bottom, top):
        x, y = self._planes(bottom[0].data), self._planes(top[0].data)
        if self.method == POOL.MAX:
            pooling.max_pool_forward(x, y, self.mask, *self._window(), num_threads())
            if len(top) > 1:
                top[1].data[...] = self.mask.reshape(top[1].shape)
        elif self.method == POOL.AVE:
            pooling.ave_pool_forward(x, y, *self._window(), num_threads())
        elif self.sampling:
            self.sampler.random(out=self.uniforms)
            pooling.stochastic_pool_forward_train(x, y, self.mask, self.uniforms, *self._window(),
                                                  num_threads())
        else:
            pooling.stochastic_pool_forward_test(x, y, *self._window(), num_threads())

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy, dx = self._planes(top[0].diff), self._planes(bottom[0].diff)
        if self.method == POOL.MAX or self.sampling:
            pooling.max_pool_backward(dy, self.mask, dx, num_threads())
        elif self.method == POOL.AVE:
            pooling.ave_pool_backward(dy, dx, *self._window(), num_threads())
        else:
            pooling.stochastic_pool_backward_test(self._planes(bottom[0].data), dy, dx, *self._window(),
                                                  num_threads())
