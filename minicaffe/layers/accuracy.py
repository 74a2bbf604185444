"""Classification accuracy, as Caffe's AccuracyLayer (no backward)."""
import numpy as np

from minicaffe.errors import MinicaffeError
from minicaffe.layer import Layer, register


@register("Accuracy")
class AccuracyLayer(Layer):
    """Fraction of predictions whose true class is among the top_k scores.

    A prediction counts as correct when fewer than top_k other classes score at least as high as the
    true class (ties count against it, as in Caffe). The optional second top is the accuracy of each
    class over the samples of that class (0 for a class without samples).
    """

    exact_num_bottom = 2
    min_top = 1
    max_top = 2
    no_backward_bottoms = (0, 1)

    def setup(self, bottom, top):
        p = self.param.accuracy_param
        self.top_k = p.top_k
        self.has_ignore = p.HasField("ignore_label")
        self.ignore_label = p.ignore_label

    def reshape(self, bottom, top):
        scores, labels = bottom
        try:
            axis = scores.canonical_axis(self.param.accuracy_param.axis)
        except MinicaffeError as e:
            raise self.error(f"accuracy_param.axis: {e}") from None
        self.dims = (scores.count_range(0, axis), scores.shape[axis], scores.count_range(axis + 1))
        outer, classes, inner = self.dims
        if self.top_k > classes:
            raise self.error(f"top_k {self.top_k} exceeds the number of classes {classes}")
        if outer * inner != labels.count:
            raise self.error(f"needs one label per prediction: {outer * inner} for predictions of shape "
                             f"{scores.shape}, got {labels.count} (labels shape {labels.shape})")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((classes,))

    def forward(self, bottom, top):
        outer, classes, inner = self.dims
        scores = bottom[0].data.reshape(self.dims)
        # Labels are stored as floats; Caffe truncates them to int.
        labels = np.trunc(bottom[1].data.reshape(outer, inner))
        counted = labels != self.ignore_label if self.has_ignore else np.ones(labels.shape, dtype=bool)
        in_range = (labels >= 0) & (labels < classes)
        bad = np.flatnonzero(counted & ~in_range)
        if bad.size:
            value = bottom[1].data.reshape(-1)[bad[0]]
            raise self.error(f"label {value:g} (at position {bad[0]}) is out of range: the predictions "
                             f"have {classes} classes, so labels must be in [0, {classes - 1}]")
        classes_of = np.where(counted, labels, 0).astype(np.intp)
        true_scores = np.take_along_axis(scores, classes_of[:, None, :], axis=1)
        # The true class itself scores >= its own score, hence the - 1.
        rivals = np.count_nonzero(scores >= true_scores, axis=1) - 1
        correct = counted & (rivals < self.top_k)
        total = np.count_nonzero(counted)
        top[0].data[...] = np.count_nonzero(correct) / total if total else 0.0
        if len(top) > 1:
            per_class_total = np.bincount(classes_of[counted], minlength=classes)
            per_class_correct = np.bincount(classes_of[correct], minlength=classes)
            top[1].data[...] = np.divide(per_class_correct, per_class_total,
                                         out=np.zeros(classes), where=per_class_total > 0)
