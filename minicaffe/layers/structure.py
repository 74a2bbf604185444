"""Layers that route blobs without computing on them."""
import numpy as np

from minicaffe.layer import Layer, register


@register("Split")
class SplitLayer(Layer):
    """Copies one blob to several consumers: the tops share the bottom's data, and backward sums the
    tops' diffs. The net inserts these wherever a blob feeds more than one layer."""

    exact_num_bottom = 1
    min_top = 1

    def reshape(self, bottom, top):
        for t in top:
            if t is bottom[0]:
                raise self.error("cannot run in place")
            # Share before reshaping so the top never allocates a data buffer of its own.
            t.share_data(bottom[0])
            t.reshape(bottom[0].shape)

    def forward(self, bottom, top):
        """Nothing to do: the tops read the bottom's data buffer."""

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        total = bottom[0].diff
        if len(top) == 1:
            np.copyto(total, top[0].diff)
            return
        np.add(top[0].diff, top[1].diff, out=total)
        for t in top[2:]:
            np.add(total, t.diff, out=total)
