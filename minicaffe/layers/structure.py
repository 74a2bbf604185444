"""Layers that route, combine or reshape blobs, as Caffe's Split, Eltwise, Concat, Slice, Flatten,
Reshape, Crop, Tile and Silence layers."""
import numpy as np

from minicaffe.errors import MinicaffeError
from minicaffe.kernels import structure as kernels
from minicaffe.kernels.parallel import num_threads
from minicaffe.layer import Layer, register
from minicaffe.proto import minicaffe_pb2 as pb

ELTWISE = pb.EltwiseParameter


def axis_of(layer, blob, axis, field):
    """``axis`` made non-negative for ``blob``, or a LayerError naming ``field``."""
    try:
        return blob.canonical_axis(axis)
    except MinicaffeError as err:
        raise layer.error(f"{field}: {err}") from None


def legacy_axis_of(layer, blob, param, section, legacy_field):
    """The axis of Concat and Slice: the ``axis`` field, or Caffe's deprecated non-negative alias
    (concat_dim, slice_dim); giving both is an error, as in Caffe."""
    if param.HasField(legacy_field):
        if param.HasField("axis"):
            raise layer.error(f"give {section}.axis or {section}.{legacy_field}, not both")
        axis = getattr(param, legacy_field)
        if axis >= blob.num_axes:
            raise layer.error(f"{section}.{legacy_field} {axis} out of range for a bottom of shape {blob.shape}")
        return axis
    return axis_of(layer, blob, param.axis, f"{section}.axis")


def refuse_in_place(layer, bottom, top):
    if any(t is b for t in top for b in bottom):
        raise layer.error("cannot run in place (give the top a name of its own)")


def share_with(top, bottom, shape):
    """Makes ``top`` a view of ``bottom`` with another shape: data and diff are the same memory."""
    # Share before reshaping so the top never allocates buffers of its own.
    top.share_data(bottom)
    top.share_diff(bottom)
    top.reshape(shape)


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


@register("Eltwise")
class EltwiseLayer(Layer):
    """Element-wise PROD, SUM (each bottom scaled by its ``coeff``) or MAX of equal-shaped bottoms.

    MAX keeps which bottom won each element; on ties the first two bottoms go to the second and
    later bottoms must be strictly larger to win, as in Caffe. PROD's gradient for bottom i is the
    product of the other bottoms (``stable_prod_grad``, the default) or top / bottom i.
    """

    min_bottom = 2
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.param.eltwise_param
        self.operation = p.operation
        if p.coeff and len(p.coeff) != len(bottom):
            raise self.error(f"eltwise_param.coeff: takes one coefficient per bottom ({len(bottom)}), "
                             f"got {len(p.coeff)}")
        if p.coeff and self.operation == ELTWISE.PROD:
            raise self.error("eltwise_param.coeff applies to SUM only, not PROD")
        self.coeffs = [float(c) for c in p.coeff] or [1.0] * len(bottom)
        self.stable_prod_grad = p.stable_prod_grad
        self.winner = np.zeros(0, np.int32)
        self.scratch = np.zeros(0)

    def reshape(self, bottom, top):
        refuse_in_place(self, bottom, top)
        shape = bottom[0].shape
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != shape:
                raise self.error(f"bottoms must have equal shapes: bottom 0 is {shape}, bottom {i} is {b.shape}")
        top[0].reshape(shape)
        if self.winner.shape != shape and self.operation == ELTWISE.MAX:
            self.winner = np.zeros(shape, np.int32)
        if self.operation == ELTWISE.MAX and self.scratch.shape != shape:
            # MAX keeps its comparisons here.
            self.scratch = np.zeros(shape, bool)

    def forward(self, bottom, top):
        y = top[0].data
        if self.operation == ELTWISE.PROD:
            np.multiply(bottom[0].data, bottom[1].data, out=y)
            for b in bottom[2:]:
                np.multiply(y, b.data, out=y)
        elif self.operation == ELTWISE.SUM:
            flat_y, c = y.reshape(-1), self.coeffs
            kernels.weighted_sum(bottom[0].data.reshape(-1), c[0], bottom[1].data.reshape(-1), c[1], flat_y,
                                 num_threads())
            for b, coeff in zip(bottom[2:], c[2:]):
                kernels.weighted_sum(flat_y, 1.0, b.data.reshape(-1), coeff, flat_y, num_threads())
        else:
            np.maximum(bottom[0].data, bottom[1].data, out=y)
            np.less_equal(bottom[0].data, bottom[1].data, out=self.winner, casting="unsafe")
            for i, b in enumerate(bottom[2:], 2):
                wins = np.greater(b.data, y, out=self.scratch)
                np.copyto(y, b.data, where=wins)
                np.copyto(self.winner, i, where=wins)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        if self.operation == ELTWISE.SUM:
            self._sum_backward(dy.reshape(-1), propagate_down, bottom)
            return
        for i, b in enumerate(bottom):
            if not propagate_down[i]:
                continue
            dx = b.diff
            if self.operation == ELTWISE.PROD:
                if self.stable_prod_grad:
                    others = [o for j, o in enumerate(bottom) if j != i]
                    np.copyto(dx, others[0].data)
                    for o in others[1:]:
                        np.multiply(dx, o.data, out=dx)
                else:
                    np.divide(top[0].data, b.data, out=dx)
                np.multiply(dx, dy, out=dx)
            else:
                np.multiply(dy, np.equal(self.winner, i, out=self.scratch), out=dx)

    def _sum_backward(self, dy, propagate_down, bottom):
        """dx_i = coeff_i * dy, two bottoms per read of dy."""
        wanted = [(b.diff.reshape(-1), c) for b, c, down in zip(bottom, self.coeffs, propagate_down) if down]
        for k in range(0, len(wanted), 2):
            (dx, coeff), (other_dx, other_coeff) = wanted[k], wanted[k + 1] if k + 1 < len(wanted) else (None, 0.0)
            kernels.scaled_copies(dy, dx, coeff, other_dx, other_coeff, num_threads())


class EltwiseReLUChain:
    """An Eltwise SUM of two bottoms and a ReLU (negative_slope >= 0) in place on its top, which a
    net runs as one pass each way (``find_eltwise_relu_chains``), giving the same bits as the two
    layers one by one. Forward reads the bottoms and writes the top once, without the ReLU's second
    pass over the top; backward reads the top's data and diff once and writes the ReLU's gradient
    back to the top's diff (as the ReLU would) and to the bottoms' diffs.

    Where the top feeds several layers (a residual block's output feeds the next block's branch and
    shortcut), the net's Split on it comes right after the ReLU and joins the chain (``split_tops``,
    its tops). Its forward does nothing; the chain's backward reads the Split's tops' diffs instead
    of the top's and sums them in the same pass, in the Split's order, leaving the top's diff as the
    Split then the ReLU would: 3 reads and 3 writes instead of the Split's 2 + 1 and the pair's 2 + 3.
    A range that cuts the chain (between the ReLU and the Split, say) runs its layers one by one.
    """

    def __init__(self, first, eltwise, relu, bottoms, top, propagate_down, split_tops=()):
        self.first, self.last = first, first + (2 if split_tops else 1)
        self.eltwise, self.relu = eltwise, relu
        self.bottoms, self.top, self.propagate_down = bottoms, top, propagate_down
        self.split_tops = split_tops
        self.fuses_backward = True

    def forward(self):
        (a, b), (ca, cb) = self.bottoms, self.eltwise.coeffs
        kernels.weighted_sum(a.data.reshape(-1), ca, b.data.reshape(-1), cb, self.top.data.reshape(-1),
                             num_threads(), relu=True, negative_slope=self.relu.negative_slope)

    def backward(self):
        wanted = [(b.diff.reshape(-1), c) for b, c, down in zip(self.bottoms, self.eltwise.coeffs,
                                                                 self.propagate_down) if down]
        (dx, coeff), (other_dx, other_coeff) = wanted[0], wanted[1] if len(wanted) > 1 else (None, 0.0)
        dy, y, slope = self.top.diff.reshape(-1), self.top.data.reshape(-1), self.relu.negative_slope
        if not self.split_tops:
            kernels.scaled_copies(dy, dx, coeff, other_dx, other_coeff, num_threads(), relu_output=y,
                                  negative_slope=slope)
            return
        kernels.summed_scaled_copies([t.diff.reshape(-1) for t in self.split_tops], dy, y, dx, coeff, other_dx,
                                     other_coeff, num_threads(), negative_slope=slope)


def find_eltwise_relu_chains(layers, bottom_vecs, top_vecs, layer_need_backward, bottom_need_backward):
    """The EltwiseReLUChains among a net's layers (lists indexed by layer, as Net keeps them): an
    Eltwise SUM of two bottoms right before a ReLU in place on its top, and the Split of that top if
    it comes right after. In place, ReLU's backward masks by its output's sign, which is its input's
    only for a slope >= 0; the fused backward needs that. Its backward is fused where all of its
    layers run backward (otherwise each runs its own)."""
    from minicaffe.layers.activation import ReLULayer
    chains = []
    for i in range(len(layers) - 1):
        eltwise, relu = layers[i], layers[i + 1]
        if not (type(eltwise) is EltwiseLayer and eltwise.operation == ELTWISE.SUM and len(bottom_vecs[i]) == 2
                and type(relu) is ReLULayer and relu.negative_slope >= 0 and len(bottom_vecs[i + 1]) == 1
                and bottom_vecs[i + 1][0] is top_vecs[i][0] and top_vecs[i + 1][0] is top_vecs[i][0]):
            continue
        members = [i, i + 1]
        if i + 2 < len(layers) and type(layers[i + 2]) is SplitLayer and bottom_vecs[i + 2][0] is top_vecs[i][0]:
            members.append(i + 2)
        chain = EltwiseReLUChain(i, eltwise, relu, bottom_vecs[i], top_vecs[i][0], bottom_need_backward[i],
                                 split_tops=top_vecs[i + 2] if len(members) == 3 else ())
        chain.fuses_backward = all(layer_need_backward[j] for j in members) and \
            all(bottom_need_backward[j][0] for j in members[1:])
        chains.append(chain)
    return chains


@register("Concat")
class ConcatLayer(Layer):
    """Joins the bottoms along ``axis`` (or the legacy ``concat_dim``); every other axis must agree.

    A single bottom is passed through: the top shares its data and diff, as in Caffe.
    """

    min_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        refuse_in_place(self, bottom, top)
        first = bottom[0]
        axis = legacy_axis_of(self, first, self.param.concat_param, "concat_param", "concat_dim")
        for i, b in enumerate(bottom[1:], 1):
            if b.num_axes != first.num_axes or b.shape[:axis] + b.shape[axis + 1:] != \
                    first.shape[:axis] + first.shape[axis + 1:]:
                raise self.error(f"bottoms must agree on every axis except {axis}: bottom 0 is "
                                 f"{first.shape}, bottom {i} is {b.shape}")
        shape = list(first.shape)
        shape[axis] = sum(b.shape[axis] for b in bottom)
        if len(bottom) == 1:
            share_with(top[0], first, shape)
            return
        top[0].reshape(shape)
        self.outer = first.count_range(0, axis)
        self.columns = _column_ranges([b.count_range(axis) for b in bottom])

    def forward(self, bottom, top):
        if len(bottom) == 1:
            return
        y = top[0].data.reshape(self.outer, -1)
        for b, (start, stop) in zip(bottom, self.columns):
            np.copyto(y[:, start:stop], b.data.reshape(self.outer, -1))

    def backward(self, top, propagate_down, bottom):
        if len(bottom) == 1:
            return
        dy = top[0].diff.reshape(self.outer, -1)
        for b, (start, stop), down in zip(bottom, self.columns, propagate_down):
            if down:
                np.copyto(b.diff.reshape(self.outer, -1), dy[:, start:stop])


def _column_ranges(widths):
    """[start, stop) of each part laid side by side: the parts of a blob viewed as (outer, columns)."""
    stops = np.cumsum(widths).tolist()
    return list(zip([0] + stops[:-1], stops))


@register("Slice")
class SliceLayer(Layer):
    """Cuts the bottom along ``axis`` (or the legacy ``slice_dim``) at the ``slice_point``s, or into
    equal parts, one per top. A single top is passed through, sharing data and diff."""

    exact_num_bottom = 1
    min_top = 1

    def reshape(self, bottom, top):
        refuse_in_place(self, bottom, top)
        p = self.param.slice_param
        x = bottom[0]
        axis = legacy_axis_of(self, x, p, "slice_param", "slice_dim")
        size = x.shape[axis]
        sizes = self._slice_sizes(list(p.slice_point), len(top), size, x.shape, axis)
        if len(top) == 1:
            share_with(top[0], x, x.shape)
            return
        inner = x.count_range(axis + 1)
        for t, n in zip(top, sizes):
            t.reshape(x.shape[:axis] + (n,) + x.shape[axis + 1:])
        self.outer = x.count_range(0, axis)
        self.columns = _column_ranges([n * inner for n in sizes])

    def _slice_sizes(self, points, num_tops, size, shape, axis):
        if not points:
            if size % num_tops:
                raise self.error(f"{num_tops} tops do not evenly divide axis {axis} of size {size} "
                                 f"(bottom shape {shape}); give slice_point")
            return [size // num_tops] * num_tops
        if len(points) != num_tops - 1:
            raise self.error(f"{len(points)} slice_point(s) for {num_tops} tops: give one fewer than the tops")
        if any(b <= a for a, b in zip([0] + points, points)) or points[-1] > size:
            raise self.error(f"slice_point {points} must be increasing, within (0, {size}] for axis {axis} "
                             f"of bottom shape {shape}")
        return [b - a for a, b in zip([0] + points, points + [size])]

    def forward(self, bottom, top):
        if len(top) == 1:
            return
        x = bottom[0].data.reshape(self.outer, -1)
        for t, (start, stop) in zip(top, self.columns):
            np.copyto(t.data.reshape(self.outer, -1), x[:, start:stop])

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0] or len(top) == 1:
            return
        dx = bottom[0].diff.reshape(self.outer, -1)
        for t, (start, stop) in zip(top, self.columns):
            np.copyto(dx[:, start:stop], t.diff.reshape(self.outer, -1))


@register("Flatten")
class FlattenLayer(Layer):
    """Merges axes ``axis`` through ``end_axis`` into one. The top shares the bottom's data and diff,
    so forward and backward do nothing."""

    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        refuse_in_place(self, bottom, top)
        p = self.param.flatten_param
        x = bottom[0]
        start = axis_of(self, x, p.axis, "flatten_param.axis")
        end = axis_of(self, x, p.end_axis, "flatten_param.end_axis")
        if end < start:
            raise self.error(f"flatten_param: end_axis {p.end_axis} comes before axis {p.axis} "
                             f"for bottom shape {x.shape}")
        share_with(top[0], x, x.shape[:start] + (x.count_range(start, end + 1),) + x.shape[end + 1:])

    def forward(self, bottom, top):
        """Nothing to do: the top is a view of the bottom."""

    def backward(self, top, propagate_down, bottom):
        """Nothing to do: the bottom's diff is the top's."""


@register("Reshape")
class ReshapeLayer(Layer):
    """Gives the bottom a new shape without copying: the top shares its data and diff.

    ``shape`` replaces ``num_axes`` axes of the bottom from ``axis`` on (all of them by default); a 0
    copies the bottom's dimension at that position and one -1 is inferred from the count.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def setup(self, bottom, top):
        p = self.param.reshape_param
        self.new_dims = list(p.shape.dim)
        self.copied = [i for i, d in enumerate(self.new_dims) if d == 0]
        inferred = [i for i, d in enumerate(self.new_dims) if d == -1]
        if len(inferred) > 1:
            raise self.error(f"reshape_param.shape {self.new_dims} has more than one -1")
        if any(d < -1 for d in self.new_dims):
            raise self.error(f"reshape_param.shape {self.new_dims}: dimensions must be -1, 0 or positive")
        self.inferred = inferred[0] if inferred else None
        if p.num_axes < -1:
            raise self.error(f"reshape_param.num_axes must be -1 (all) or non-negative, got {p.num_axes}")

    def reshape(self, bottom, top):
        refuse_in_place(self, bottom, top)
        p = self.param.reshape_param
        x = bottom[0]
        start = p.axis if p.axis >= 0 else x.num_axes + p.axis + 1
        if not 0 <= start <= x.num_axes:
            raise self.error(f"reshape_param.axis {p.axis} out of range for bottom shape {x.shape}")
        end = x.num_axes if p.num_axes == -1 else start + p.num_axes
        if end > x.num_axes:
            raise self.error(f"reshape_param: axis {p.axis} with num_axes {p.num_axes} runs past the end "
                             f"of bottom shape {x.shape}")
        dims = list(self.new_dims)
        for i in self.copied:
            if start + i >= x.num_axes:
                raise self.error(f"reshape_param.shape {self.new_dims}: the 0 at position {i} has no bottom "
                                 f"axis to copy (bottom shape {x.shape})")
            dims[i] = x.shape[start + i]
        shape = x.shape[:start] + tuple(dims) + x.shape[end:]
        if self.inferred is not None:
            known = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
            if known == 0 or x.count % known:
                raise self.error(f"cannot infer the -1 in reshape_param.shape {self.new_dims}: bottom shape "
                                 f"{x.shape} ({x.count} values) is not divisible by {known}")
            shape = tuple(x.count // known if d == -1 else d for d in shape)
        if int(np.prod(shape, dtype=np.int64)) != x.count:
            raise self.error(f"reshape_param.shape {self.new_dims} gives shape {shape} with "
                             f"{int(np.prod(shape, dtype=np.int64))} values, but bottom shape {x.shape} "
                             f"has {x.count}")
        share_with(top[0], x, shape)

    def forward(self, bottom, top):
        """Nothing to do: the top is a view of the bottom."""

    def backward(self, top, propagate_down, bottom):
        """Nothing to do: the bottom's diff is the top's."""


@register("Crop")
class CropLayer(Layer):
    """Crops bottom 0 to the size of bottom 1 on every axis from ``axis`` on, starting at ``offset``
    (one for all cropped axes, one per cropped axis, or none for 0). Bottom 1 only gives a shape."""

    exact_num_bottom = 2
    exact_num_top = 1
    no_backward_bottoms = (1,)

    def reshape(self, bottom, top):
        refuse_in_place(self, bottom, top)
        p = self.param.crop_param
        x, reference = bottom
        start = axis_of(self, x, p.axis, "crop_param.axis")
        cropped = x.num_axes - start
        if len(p.offset) > 1 and len(p.offset) != cropped:
            raise self.error(f"crop_param.offset: give one offset or one per cropped axis ({cropped} from "
                             f"axis {start} of bottom shape {x.shape}), got {len(p.offset)}")
        if reference.num_axes < x.num_axes:
            raise self.error(f"bottom 1 of shape {reference.shape} has fewer axes than bottom 0 of shape {x.shape}")
        if len(p.offset) > 1:
            offsets = [0] * start + list(p.offset)
        else:
            offsets = [0] * start + [p.offset[0] if p.offset else 0] * cropped
        shape = x.shape[:start] + reference.shape[start:x.num_axes]
        for i in range(start, x.num_axes):
            if offsets[i] + shape[i] > x.shape[i]:
                raise self.error(f"crop of size {shape[i]} at offset {offsets[i]} runs past axis {i} of "
                                 f"bottom 0 (shape {x.shape}, bottom 1 shape {reference.shape})")
        top[0].reshape(shape)
        self.window = tuple(slice(o, o + n) for o, n in zip(offsets, shape))

    def forward(self, bottom, top):
        np.copyto(top[0].data, bottom[0].data[self.window])

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dx = bottom[0].diff
            dx[...] = 0
            np.copyto(dx[self.window], top[0].diff)
        if propagate_down[1]:
            # Bottom 1 only gives the shape: nothing flows to it.
            bottom[1].diff[...] = 0


@register("Tile")
class TileLayer(Layer):
    """Repeats the bottom ``tiles`` times along ``axis``: each block from ``axis`` on is copied whole."""

    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        refuse_in_place(self, bottom, top)
        p = self.param.tile_param
        x = bottom[0]
        axis = axis_of(self, x, p.axis, "tile_param.axis")
        if not p.HasField("tiles") or p.tiles < 1:
            raise self.error("tile_param.tiles must be given and positive")
        self.tiles = p.tiles
        self.outer, self.inner = x.count_range(0, axis), x.count_range(axis)
        top[0].reshape(x.shape[:axis] + (x.shape[axis] * self.tiles,) + x.shape[axis + 1:])

    def forward(self, bottom, top):
        np.copyto(top[0].data.reshape(self.outer, self.tiles, self.inner),
                  bottom[0].data.reshape(self.outer, 1, self.inner))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            np.sum(top[0].diff.reshape(self.outer, self.tiles, self.inner), axis=1,
                   out=bottom[0].diff.reshape(self.outer, self.inner))


@register("Silence")
class SilenceLayer(Layer):
    """Consumes blobs nobody else reads, so that they are not net outputs; their gradient is zero."""

    min_bottom = 1
    exact_num_top = 0

    def reshape(self, bottom, top):
        """No tops to shape."""

    def forward(self, bottom, top):
        """Nothing to compute."""

    def backward(self, top, propagate_down, bottom):
        for b, down in zip(bottom, propagate_down):
            if down:
                b.diff[...] = 0
