"""Embedding lookup, as Caffe's EmbedLayer."""
import numpy as np

from minicaffe.kernels import structure
from minicaffe.kernels.parallel import num_threads
from minicaffe.layer import Layer, register
from minicaffe.layers.structure import refuse_in_place


@register("Embed")
class EmbedLayer(Layer):
    """Maps each index in the bottom to a learned row: top[..., :] = weight[index] (+ bias).

    The weight is [input_dim, num_output], as in Caffe, and the top has the bottom's shape plus a
    last axis of num_output. Indices must be whole numbers in [0, input_dim). The indices get no
    gradient; backward accumulates each top row's diff into the weight row it came from.
    """

    exact_num_bottom = 1
    exact_num_top = 1
    no_backward_bottoms = (0,)

    def setup(self, bottom, top):
        p = self.param.embed_param
        self.num_output, self.input_dim = p.num_output, p.input_dim
        if self.num_output < 1:
            raise self.error("embed_param.num_output must be positive")
        if self.input_dim < 1:
            raise self.error("embed_param.input_dim must be positive")
        self.bias_term = p.bias_term
        self.blobs = self.weight_and_bias((self.input_dim, self.num_output), self.num_output, p)

    def reshape(self, bottom, top):
        refuse_in_place(self, bottom, top)
        top[0].reshape(bottom[0].shape + (self.num_output,))

    def _checked_indices(self, bottom):
        """The bottom as a flat array of indices, each checked (backward too: the scatter writes memory)."""
        indices = bottom[0].data.reshape(-1)
        bad = structure.first_invalid_index(indices, self.input_dim)
        if bad >= 0:
            position = tuple(int(i) for i in np.unravel_index(bad, bottom[0].shape))
            raise self.error(f"input {float(indices[bad])!r} at position {position} of bottom '{bottom[0].name}' "
                             f"is not an index in [0, input_dim={self.input_dim})")
        return indices

    def forward(self, bottom, top):
        indices = self._checked_indices(bottom)
        y = top[0].data.reshape(-1, self.num_output)
        structure.embed_gather(indices, self.blobs[0].data, y, num_threads())
        if self.bias_term:
            np.add(y, self.blobs[1].data, out=y)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise self.error("cannot back-propagate to its input indices (set propagate_down: false)")
        dy = top[0].diff.reshape(-1, self.num_output)
        structure.embed_scatter_add(self._checked_indices(bottom), dy, self.blobs[0].diff, num_threads())
        if self.bias_term:
            np.add(self.blobs[1].diff, dy.sum(axis=0), out=self.blobs[1].diff)
