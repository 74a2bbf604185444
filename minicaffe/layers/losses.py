"""The other Caffe losses: SigmoidCrossEntropyLoss, HingeLoss, InfogainLoss, MultinomialLogisticLoss
and ContrastiveLoss, with BVLC Caffe's parameters, defaults and normalization.

These work on blobs of predictions and labels that are small next to the rest of a net, so they are
vectorized NumPy over scratch buffers that ``reshape`` allocates. Every backward pass scales its
gradient by ``top[0].diff``, which holds the loss weight the net assigned to the loss.
"""
import numpy as np
from scipy.special import expit

from minicaffe import prototxt
from minicaffe.blob import Blob, blob_dtype
from minicaffe.errors import MinicaffeError
from minicaffe.kernels import softmax
from minicaffe.kernels.parallel import num_threads
from minicaffe.layer import Layer, register
from minicaffe.proto import minicaffe_pb2 as pb

NORM = pb.LossParameter
# Caffe's kLOG_THRESHOLD: probabilities are clamped to it before the log, so log(0) never occurs.
LOG_THRESHOLD = 1e-20


def _normalizer(mode, outer, inner, valid_count):
    """The divisor of a summed loss under LossParameter.normalization, as Caffe's get_normalizer."""
    if mode == NORM.FULL:
        normalizer = outer * inner
    elif mode == NORM.VALID:
        normalizer = valid_count
    elif mode == NORM.BATCH_SIZE:
        normalizer = outer
    else:
        normalizer = 1
    # Never below one, so a batch whose targets are all ignored gives loss 0 rather than NaN.
    return max(1.0, float(normalizer))


def _check_same_batch(layer, bottom):
    """Caffe's LossLayer check: predictions and labels agree in their first dimension."""
    if bottom[0].num_axes == 0 or bottom[1].num_axes == 0 or bottom[0].shape[0] != bottom[1].shape[0]:
        raise layer.error(f"bottom 0 {bottom[0].shape} and bottom 1 {bottom[1].shape} must have the same "
                          f"first (batch) dimension")


def _refuse_label_backward(layer, propagate_down, indices, what="labels"):
    for i in indices:
        if i < len(propagate_down) and propagate_down[i]:
            raise layer.error(f"cannot back-propagate to the {what} (bottom {i}); "
                              f"set propagate_down: false for it")


def _loss_weight(top):
    return float(top[0].diff.reshape(-1)[0])


def _decode_labels(layer, stored, labels, num_classes, ignored=None, ignore_label=None):
    """Truncates stored labels to integers into ``labels``, as Caffe's static_cast, and checks them.

    With an ``ignored`` buffer, marks the positions holding ``ignore_label`` there and sets their
    labels to 0, so they can index like any other and are masked out afterwards.
    """
    with np.errstate(invalid="ignore"):  # NaN and huge values become out-of-range integers
        np.copyto(labels, stored.reshape(labels.shape), casting="unsafe")
    if ignored is not None:
        np.equal(labels, ignore_label, out=ignored)
        np.copyto(labels, 0, where=ignored)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        position = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
        value = stored.reshape(-1)[position]
        raise layer.error(f"label {value:g} (at position {position}) is out of range: there are "
                          f"{num_classes} classes, so labels must be in [0, {num_classes - 1}]")


def _row_label_index(rows, labels, dim, out):
    """Flat indices of element (i, labels[i]) in a row-major (len(rows), dim) array."""
    np.multiply(rows, dim, out=out)
    out += labels


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(Layer):
    """Cross-entropy between sigmoid(bottom[0]) and the targets in bottom[1] (same count, values in [0, 1]).

    Computed from the scores without forming the sigmoid, so large scores do not overflow. Targets whose
    integer part equals loss_param.ignore_label add neither loss nor gradient. The sum is divided as
    loss_param.normalization says; when neither it nor the deprecated ``normalize`` is given, Caffe
    divides by the batch size (BATCH_SIZE), not by the number of targets.
    """

    exact_num_bottom = 2
    exact_num_top = 1
    is_loss = True
    no_backward_bottoms = (1,)

    def setup(self, bottom, top):
        p = self.param.loss_param
        self.ignore_label = p.ignore_label if p.HasField("ignore_label") else None
        if p.HasField("normalization"):
            self.normalization = p.normalization
        elif p.HasField("normalize"):
            self.normalization = NORM.VALID if p.normalize else NORM.BATCH_SIZE
        else:
            self.normalization = NORM.BATCH_SIZE
        self.normalizer = 1.0

    def reshape(self, bottom, top):
        _check_same_batch(self, bottom)
        scores, targets = bottom
        if scores.count != targets.count:
            raise self.error(f"scores {scores.shape} and targets {targets.shape} must have the same count "
                             f"({scores.count} vs {targets.count})")
        top[0].reshape(())
        count, dtype = scores.count, scores.dtype
        if getattr(self, "terms", None) is None or self.terms.size != count or self.terms.dtype != dtype:
            self.terms = np.empty(count, dtype=dtype)
            self.scratch = np.empty(count, dtype=dtype)
            self.ignored = np.empty(count, dtype=bool) if self.ignore_label is not None else None
            self.target_ints = np.empty(count, dtype=np.int64) if self.ignore_label is not None else None

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(-1)
        t = bottom[1].data.reshape(-1)
        terms, scratch = self.terms, self.scratch
        # -t log(sigmoid(x)) - (1 - t) log(1 - sigmoid(x)) = max(x, 0) - x t + log(1 + exp(-|x|))
        np.abs(x, out=terms)
        np.negative(terms, out=terms)
        np.exp(terms, out=terms)
        np.log1p(terms, out=terms)
        np.maximum(x, 0, out=scratch)
        terms += scratch
        np.multiply(x, t, out=scratch)
        terms -= scratch
        valid_count = terms.size
        if self.ignored is not None:
            with np.errstate(invalid="ignore"):
                np.copyto(self.target_ints, t, casting="unsafe")
            np.equal(self.target_ints, self.ignore_label, out=self.ignored)
            np.copyto(terms, 0, where=self.ignored)
            valid_count -= int(np.count_nonzero(self.ignored))
        self.normalizer = _normalizer(self.normalization, bottom[0].shape[0], bottom[0].count_range(1),
                                      valid_count)
        top[0].data[...] = terms.sum() / self.normalizer

    def backward(self, top, propagate_down, bottom):
        _refuse_label_backward(self, propagate_down, (1,), "targets")
        if not propagate_down[0]:
            return
        diff = bottom[0].diff.reshape(-1)
        expit(bottom[0].data.reshape(-1), out=diff)
        diff -= bottom[1].data.reshape(-1)
        if self.ignored is not None:
            np.copyto(diff, 0, where=self.ignored)
        diff *= _loss_weight(top) / self.normalizer


@register("HingeLoss")
class HingeLossLayer(Layer):
    """One-versus-all hinge loss of the scores bottom[0] (N x K) against the integer labels bottom[1] (N).

    With t_k = 1 for the true class and -1 otherwise, the loss is sum_nk max(0, 1 - t_k x_nk) / N (norm L1,
    the default) or the sum of the squared margins / N (norm L2). Caffe ignores LossParameter here.
    """

    exact_num_bottom = 2
    exact_num_top = 1
    is_loss = True
    no_backward_bottoms = (1,)

    def setup(self, bottom, top):
        self.squared = self.param.hinge_loss_param.norm == pb.HingeLossParameter.L2

    def reshape(self, bottom, top):
        _check_same_batch(self, bottom)
        scores, labels = bottom
        num = scores.shape[0]
        if labels.count != num:
            raise self.error(f"needs one label per example: scores {scores.shape} give {num} examples, "
                             f"the labels {labels.shape} hold {labels.count}")
        top[0].reshape(())
        shape = (num, scores.count_range(1))
        if getattr(self, "margins", None) is None or self.margins.shape != shape \
                or self.margins.dtype != scores.dtype:
            self.margins = np.empty(shape, dtype=scores.dtype)
            self.picked = np.empty(num, dtype=scores.dtype)
            self.labels = np.empty(num, dtype=np.int64)
            self.rows = np.arange(num, dtype=np.int64)
            self.flat_index = np.empty(num, dtype=np.int64)

    def _flip_true_class(self, flat):
        """Negates the true-class entry of every row of ``flat`` (the t_k factor)."""
        np.take(flat, self.flat_index, out=self.picked)
        np.negative(self.picked, out=self.picked)
        np.put(flat, self.flat_index, self.picked)

    def forward(self, bottom, top):
        num, dim = self.margins.shape
        _decode_labels(self, bottom[1].data, self.labels, dim)
        _row_label_index(self.rows, self.labels, dim, self.flat_index)
        margins = self.margins
        np.copyto(margins, bottom[0].data.reshape(margins.shape))
        self._flip_true_class(margins.reshape(-1))
        margins += 1
        np.maximum(margins, 0, out=margins)
        flat = margins.reshape(-1)
        loss = np.dot(flat, flat) if self.squared else flat.sum()
        top[0].data[...] = loss / num

    def backward(self, top, propagate_down, bottom):
        _refuse_label_backward(self, propagate_down, (1,))
        if not propagate_down[0]:
            return
        num = self.margins.shape[0]
        diff = bottom[0].diff.reshape(-1)
        np.copyto(diff, self.margins.reshape(-1))
        self._flip_true_class(diff)
        if self.squared:
            diff *= 2 * _loss_weight(top) / num
        else:
            np.sign(diff, out=diff)
            diff *= _loss_weight(top) / num


@register("InfogainLoss")
class InfogainLossLayer(Layer):
    """Softmax of bottom[0] over infogain_loss_param.axis, weighted by an infogain matrix H (K x K).

    The loss at a position with label y is -sum_k H[y, k] log p_k; H = I gives SoftmaxWithLoss. H comes
    from infogain_loss_param.source (a BlobProto .binaryproto) or from a third bottom. Labels equal to
    loss_param.ignore_label are skipped; the sum is divided as loss_param.normalization says (VALID by
    default). A second top receives the probabilities.
    """

    min_bottom = 2
    max_bottom = 3
    min_top = 1
    max_top = 2
    is_loss = True
    no_backward_bottoms = (1, 2)

    def setup(self, bottom, top):
        p = self.param.loss_param
        if p.HasField("normalize"):
            raise self.error("loss_param.normalize is deprecated for InfogainLoss; use loss_param.normalization")
        self.normalization = p.normalization
        self.ignore_label = p.ignore_label if p.HasField("ignore_label") else None
        with blob_dtype(bottom[0].dtype):
            self.prob = Blob(name=f"{self.name}.prob")
            self.infogain = None if len(bottom) > 2 else self._read_infogain()
        self.normalizer = 1.0

    def _read_infogain(self):
        source = self.param.infogain_loss_param.source
        if not source:
            raise self.error("needs infogain_loss_param.source (a .binaryproto) or the matrix as a third bottom")
        try:
            blob = Blob(name=f"{self.name}.infogain")
            blob.from_proto(prototxt.read_binary(source, pb.BlobProto(), "infogain matrix"),
                            what=f"infogain matrix '{source}'")
        except MinicaffeError as err:
            raise self.error(f"infogain_loss_param.source: {err}") from None
        return blob

    def reshape(self, bottom, top):
        _check_same_batch(self, bottom)
        scores, labels = bottom[0], bottom[1]
        try:
            axis = scores.canonical_axis(self.param.infogain_loss_param.axis)
        except MinicaffeError as err:
            raise self.error(f"infogain_loss_param.axis: {err}") from None
        outer, classes, inner = scores.count_range(0, axis), scores.shape[axis], scores.count_range(axis + 1)
        self.dims = (outer, classes, inner)
        if outer * inner != labels.count:
            raise self.error(f"needs one label per prediction: {outer * inner} for scores of shape "
                             f"{scores.shape} (axis {axis}), got {labels.count} (labels shape {labels.shape})")
        matrix = self._matrix(bottom)
        if matrix.count != classes * classes:
            raise self.error(f"the infogain matrix has {matrix.count} values (shape {matrix.shape}), but "
                             f"{classes} classes need {classes} x {classes} = {classes * classes}")
        self.prob.reshape(scores.shape)
        top[0].reshape(())
        if len(top) > 1:
            top[1].share_data(self.prob)
            top[1].reshape(scores.shape)
        dtype = scores.dtype
        if getattr(self, "weights", None) is None or self.weights.shape != self.dims or self.weights.dtype != dtype:
            # weights[i, k, j] = H[label, k] at position (i, j); row_sums[i, j] = sum_k H[label, k].
            self.weights = np.empty(self.dims, dtype=dtype)
            self.log_prob = np.empty(self.dims, dtype=dtype)
            self.row_sums = np.empty((outer, inner), dtype=dtype)
            self.labels = np.empty((outer, inner), dtype=np.int64)
            self.ignored = np.empty((outer, inner), dtype=bool) if self.ignore_label is not None else None
            self.h_row_sums = np.empty(classes, dtype=dtype)

    def _matrix(self, bottom):
        return bottom[2] if len(bottom) > 2 else self.infogain

    def forward(self, bottom, top):
        outer, classes, inner = self.dims
        prob = self.prob.data.reshape(self.dims)
        softmax.softmax_forward(bottom[0].data.reshape(self.dims), prob, num_threads())
        _decode_labels(self, bottom[1].data, self.labels, classes, self.ignored, self.ignore_label)
        h = self._matrix(bottom).data.reshape(classes, classes)
        np.sum(h, axis=1, out=self.h_row_sums)
        np.take(h, self.labels, axis=0, out=self.weights.transpose(0, 2, 1), mode="clip")
        np.take(self.h_row_sums, self.labels, out=self.row_sums, mode="clip")
        valid_count = outer * inner
        if self.ignored is not None:
            self.weights.transpose(0, 2, 1)[self.ignored] = 0
            np.copyto(self.row_sums, 0, where=self.ignored)
            valid_count -= int(np.count_nonzero(self.ignored))
        np.maximum(prob, LOG_THRESHOLD, out=self.log_prob)
        np.log(self.log_prob, out=self.log_prob)
        self.normalizer = _normalizer(self.normalization, outer, inner, valid_count)
        top[0].data[...] = -np.vdot(self.weights.reshape(-1), self.log_prob.reshape(-1)) / self.normalizer

    def backward(self, top, propagate_down, bottom):
        _refuse_label_backward(self, propagate_down, (1,))
        _refuse_label_backward(self, propagate_down, (2,), "infogain matrix")
        if not propagate_down[0]:
            return
        # d/dx_k of -sum_l H[y, l] log softmax_l(x) = p_k sum_l H[y, l] - H[y, k]
        diff = bottom[0].diff.reshape(self.dims)
        np.multiply(self.prob.data.reshape(self.dims), self.row_sums[:, None, :], out=diff)
        diff -= self.weights
        diff *= _loss_weight(top) / self.normalizer


@register("MultinomialLogisticLoss")
class MultinomialLogisticLossLayer(Layer):
    """-sum_n log p[n, label_n] / N for probabilities bottom[0] (N x K) and integer labels bottom[1] (N).

    Probabilities are clamped to 1e-20 before the log, as Caffe does. Caffe ignores LossParameter here.
    """

    exact_num_bottom = 2
    exact_num_top = 1
    is_loss = True
    no_backward_bottoms = (1,)

    def reshape(self, bottom, top):
        _check_same_batch(self, bottom)
        probs, labels = bottom
        if any(d != 1 for d in labels.shape[1:]):
            raise self.error(f"labels must have shape (N,) or (N, 1, 1, 1), got {labels.shape}")
        top[0].reshape(())
        num = probs.shape[0]
        if getattr(self, "picked", None) is None or self.picked.size != num or self.picked.dtype != probs.dtype:
            self.picked = np.empty(num, dtype=probs.dtype)
            self.scratch = np.empty(num, dtype=probs.dtype)
            self.labels = np.empty(num, dtype=np.int64)
            self.rows = np.arange(num, dtype=np.int64)
            self.flat_index = np.empty(num, dtype=np.int64)

    def forward(self, bottom, top):
        num, dim = bottom[0].shape[0], bottom[0].count_range(1)
        _decode_labels(self, bottom[1].data, self.labels, dim)
        _row_label_index(self.rows, self.labels, dim, self.flat_index)
        np.take(bottom[0].data.reshape(-1), self.flat_index, out=self.picked)
        np.maximum(self.picked, LOG_THRESHOLD, out=self.picked)
        np.log(self.picked, out=self.scratch)
        top[0].data[...] = -self.scratch.sum() / num

    def backward(self, top, propagate_down, bottom):
        _refuse_label_backward(self, propagate_down, (1,))
        if not propagate_down[0]:
            return
        diff = bottom[0].diff.reshape(-1)
        diff[...] = 0
        np.divide(-_loss_weight(top) / bottom[0].shape[0], self.picked, out=self.scratch)
        np.put(diff, self.flat_index, self.scratch)


@register("ContrastiveLoss")
class ContrastiveLossLayer(Layer):
    """Contrastive loss of feature pairs a = bottom[0], b = bottom[1] (N x C) with similarity labels bottom[2].

    With d = ||a_n - b_n||, a similar pair (label != 0) adds d^2 and a dissimilar pair adds
    max(margin - d, 0)^2, or max(margin - d^2, 0) with legacy_version; the sum is divided by 2N. Both
    feature bottoms receive gradients.
    """

    exact_num_bottom = 3
    exact_num_top = 1
    is_loss = True
    no_backward_bottoms = (2,)
    # Caffe's guard against dividing by a zero distance in the gradient of (margin - d)^2.
    DISTANCE_EPSILON = 1e-4

    def setup(self, bottom, top):
        p = self.param.contrastive_loss_param
        self.margin = p.margin
        self.legacy = p.legacy_version

    def reshape(self, bottom, top):
        _check_same_batch(self, bottom)
        a, b, similar = bottom
        for i, blob in enumerate((a, b)):
            if blob.num_axes < 2 or any(d != 1 for d in blob.shape[2:]):
                raise self.error(f"bottom {i} must hold feature vectors of shape (N, C) or (N, C, 1, 1), "
                                 f"got {blob.shape}")
        if a.shape[1] != b.shape[1]:
            raise self.error(f"the two feature bottoms differ in size: {a.shape} and {b.shape}")
        num = a.shape[0]
        if similar.num_axes == 0 or similar.shape[0] != num or similar.count != num:
            raise self.error(f"needs one similarity label per pair: {num} pairs, labels of shape {similar.shape}")
        top[0].reshape(())
        shape = (num, a.shape[1])
        if getattr(self, "difference", None) is None or self.difference.shape != shape \
                or self.difference.dtype != a.dtype:
            self.difference = np.empty(shape, dtype=a.dtype)
            self.dist_sq, self.dist, self.margin_gap, self.terms, self.coefficients, self.scaled = (
                np.empty(num, dtype=a.dtype) for _ in range(6))
            self.label_ints = np.empty(num, dtype=np.int64)
            self.similar = np.empty(num, dtype=bool)
            self.inactive = np.empty(num, dtype=bool)

    def forward(self, bottom, top):
        num = self.difference.shape[0]
        diff = self.difference
        np.subtract(bottom[0].data.reshape(diff.shape), bottom[1].data.reshape(diff.shape), out=diff)
        np.einsum("ij,ij->i", diff, diff, out=self.dist_sq)
        with np.errstate(invalid="ignore"):
            np.copyto(self.label_ints, bottom[2].data.reshape(-1), casting="unsafe")
        np.not_equal(self.label_ints, 0, out=self.similar)
        gap, terms, coefficients = self.margin_gap, self.terms, self.coefficients
        # coefficients[n]: d loss_n / d (a_n - b_n), as a multiple of (a_n - b_n), before the 1/N factor.
        if self.legacy:
            np.subtract(self.margin, self.dist_sq, out=gap)
            np.maximum(gap, 0, out=terms)
            coefficients[...] = -1
        else:
            np.sqrt(self.dist_sq, out=self.dist)
            np.subtract(self.margin, self.dist, out=gap)
            np.maximum(gap, 0, out=terms)
            np.square(terms, out=terms)
            np.add(self.dist, self.DISTANCE_EPSILON, out=coefficients)
            np.divide(gap, coefficients, out=coefficients)
            np.negative(coefficients, out=coefficients)
        np.less_equal(gap, 0, out=self.inactive)
        np.copyto(coefficients, 0, where=self.inactive)
        np.copyto(terms, self.dist_sq, where=self.similar)
        np.copyto(coefficients, 1, where=self.similar)
        top[0].data[...] = terms.sum() / num / 2

    def backward(self, top, propagate_down, bottom):
        _refuse_label_backward(self, propagate_down, (2,), "similarity labels")
        num = self.difference.shape[0]
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                np.multiply(self.coefficients, sign * _loss_weight(top) / num, out=self.scaled)
                np.multiply(self.difference, self.scaled[:, None], out=bottom[i].diff.reshape(self.difference.shape))
