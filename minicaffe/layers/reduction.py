"""Reductions over trailing axes: Caffe's Reduction (SUM, ASUM, SUMSQ, MEAN) and ArgMax layers."""
import numpy as np

from minicaffe.layer import Layer, register
from minicaffe.layers.structure import axis_of, refuse_in_place
from minicaffe.proto import minicaffe_pb2 as pb

REDUCTION = pb.ReductionParameter


@register("Reduction")
class ReductionLayer(Layer):
    """Reduces all axes from ``axis`` on, times ``coeff``: the top has the bottom's leading axes
    (a scalar for axis 0). MEAN is SUM with ``coeff`` divided by the number of reduced values."""

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        self.operation = self.param.reduction_param.operation
        self.scratch = np.zeros((0, 0), bottom[0].dtype)
        self.scaled_top_diff = np.zeros(0, bottom[0].dtype)

    def reshape(self, bottom, top):
        refuse_in_place(self, bottom, top)
        p = self.param.reduction_param
        x = bottom[0]
        axis = axis_of(self, x, p.axis, "reduction_param.axis")
        self.num, self.dim = x.count_range(0, axis), x.count_range(axis)
        self.coeff = p.coeff / self.dim if self.operation == REDUCTION.MEAN and self.dim else p.coeff
        top[0].reshape(x.shape[:axis])
        if self.operation == REDUCTION.ASUM and self.scratch.shape != (self.num, self.dim):
            # Holds |x|, since NumPy cannot sum absolute values in one pass.
            self.scratch = np.zeros((self.num, self.dim), x.dtype)
        if self.scaled_top_diff.shape != (self.num,):
            self.scaled_top_diff = np.zeros(self.num, x.dtype)

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.num, self.dim)
        y = top[0].data.reshape(self.num)
        if self.operation == REDUCTION.SUMSQ:
            np.einsum("ij,ij->i", x, x, out=y)
        elif self.operation == REDUCTION.ASUM:
            np.sum(np.abs(x, out=self.scratch), axis=1, out=y)
        else:
            np.sum(x, axis=1, out=y)
        if self.coeff != 1:
            np.multiply(y, self.coeff, out=y)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = bottom[0].data.reshape(self.num, self.dim)
        dx = bottom[0].diff.reshape(self.num, self.dim)
        # d(sum x^2)/dx = 2x: the 2 joins the coefficient.
        scale = 2 * self.coeff if self.operation == REDUCTION.SUMSQ else self.coeff
        dy = np.multiply(top[0].diff.reshape(self.num), scale, out=self.scaled_top_diff).reshape(self.num, 1)
        if self.operation == REDUCTION.SUMSQ:
            np.multiply(x, dy, out=dx)
        elif self.operation == REDUCTION.ASUM:
            np.sign(x, out=dx)
            np.multiply(dx, dy, out=dx)
        else:
            np.copyto(dx, dy)


@register("ArgMax")
class ArgMaxLayer(Layer):
    """The indices of the ``top_k`` largest values, per sample over everything after the first axis,
    or along ``axis`` when given. With ``out_max_val`` it also gives the values: without an axis the
    top is (N, 2, top_k) holding indices then values; with an axis the values replace the indices.

    Equal values rank the larger index first, as Caffe's sort of (value, index) pairs does. There is
    no backward pass.
    """

    exact_num_bottom = 1
    exact_num_top = 1
    no_backward_bottoms = (0,)

    def setup(self, bottom, top):
        p = self.param.argmax_param
        self.top_k, self.out_max_val, self.has_axis = p.top_k, p.out_max_val, p.HasField("axis")
        if self.top_k < 1:
            raise self.error("argmax_param.top_k must be at least 1")
        self.best = np.zeros((0, 0, 0), np.intp)

    def reshape(self, bottom, top):
        refuse_in_place(self, bottom, top)
        x = bottom[0]
        if self.has_axis:
            axis = axis_of(self, x, self.param.argmax_param.axis, "argmax_param.axis")
            self.dims = (x.count_range(0, axis), x.shape[axis], x.count_range(axis + 1))
            shape = x.shape[:axis] + (self.top_k,) + x.shape[axis + 1:]
        else:
            if x.num_axes < 1:
                raise self.error(f"needs a bottom with a first (sample) axis, got shape {x.shape}")
            self.dims = (x.shape[0], x.count_range(1), 1)
            shape = (x.shape[0], 2 if self.out_max_val else 1, self.top_k) + (1,) * max(x.num_axes - 3, 0)
        outer, dim, inner = self.dims
        if self.top_k > dim:
            where = "along argmax_param.axis" if self.has_axis else "per sample"
            raise self.error(f"top_k {self.top_k} exceeds the {dim} values {where} of bottom shape {x.shape}")
        top[0].reshape(shape)
        if self.best.shape != (outer, self.top_k, inner):
            self.best = np.zeros((outer, self.top_k, inner), np.intp)

    def forward(self, bottom, top):
        outer, dim, inner = self.dims
        # Reversed along the ranked axis, a stable descending order puts larger indices first on ties.
        reversed_x = bottom[0].data.reshape(self.dims)[:, ::-1, :]
        if self.top_k == 1:
            np.argmax(reversed_x, axis=1, out=self.best.reshape(outer, inner))
        else:
            self.best[...] = np.argsort(-reversed_x, axis=1, kind="stable")[:, :self.top_k, :]
        np.subtract(dim - 1, self.best, out=self.best)
        if self.has_axis:
            y = top[0].data.reshape(outer, self.top_k, inner)
            if self.out_max_val:
                y[...] = np.take_along_axis(bottom[0].data.reshape(self.dims), self.best, axis=1)
            else:
                np.copyto(y, self.best)
        else:
            y = top[0].data.reshape(outer, -1, self.top_k)
            np.copyto(y[:, 0], self.best[:, :, 0])
            if self.out_max_val:
                y[:, 1] = np.take_along_axis(bottom[0].data.reshape(outer, dim), self.best[:, :, 0], axis=1)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise self.error("has no backward pass (set propagate_down: false on its bottom)")
