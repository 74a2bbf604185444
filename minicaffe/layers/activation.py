"""Element-wise activations."""
from minicaffe.kernels import activation
from minicaffe.kernels.parallel import num_threads
from minicaffe.layer import Layer, register


@register("ReLU")
class ReLULayer(Layer):
    """y = max(x, 0) + negative_slope * min(x, 0); may run in place (top is bottom)."""

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        self.negative_slope = float(self.param.relu_param.negative_slope)

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        activation.relu_forward(bottom[0].data.reshape(-1), top[0].data.reshape(-1),
                                self.negative_slope, num_threads())

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            # In place, bottom data is the top data: same sign as the input for a slope >= 0.
            activation.relu_backward(bottom[0].data.reshape(-1), top[0].diff.reshape(-1),
                                     bottom[0].diff.reshape(-1), self.negative_slope, num_threads())
