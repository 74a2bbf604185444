"""Finite-difference gradient checker, in the spirit of Caffe's test_gradient_check_util.hpp.

The objective is a fixed random projection of every top, f = sum_i <top_i, R_i>, so its gradient with
respect to top_i is R_i. The checker runs the layer's backward with top diffs R_i and compares each
bottom and parameter gradient against central differences of f. Differences are judged relative to
max(|analytic|, |numeric|, 1), as Caffe does; inputs within ``kink_range`` of ``kink`` are skipped,
because a function is not differentiable there (ReLU at 0, for example).
"""
import numpy as np

from minicaffe.blob import Blob, blob_dtype

DEFAULTS = {np.float64: (1e-4, 1e-6), np.float32: (1e-2, 1e-3)}


def make_bottoms(shapes, dtype=np.float64, seed=0, low=-1.0, high=1.0):
    rng = np.random.default_rng(seed)
    with blob_dtype(dtype):
        bottoms = [Blob(s, name=f"bottom{i}") for i, s in enumerate(shapes)]
    for b in bottoms:
        b.data[...] = rng.uniform(low, high, size=b.shape)
    return bottoms


def setup_layer(layer, bottoms, num_tops, dtype=np.float64):
    """Runs the layer's setup in ``dtype`` and returns its tops."""
    with blob_dtype(dtype):
        tops = [Blob(name=f"top{i}") for i in range(num_tops)]
        layer.layer_setup(bottoms, tops)
    return tops


def check_gradient(layer, bottoms, tops, step=None, threshold=None, check_bottoms=None,
                   check_params=True, kink=0.0, kink_range=-1.0, seed=1, max_checks=None):
    """Asserts that the layer's analytic gradients match central differences.

    ``check_bottoms`` lists the bottom indices to check (all by default). ``max_checks`` limits the
    number of coordinates checked per blob, chosen at random, for large blobs.
    """
    dtype = bottoms[0].dtype if bottoms else np.float64
    step = step if step is not None else DEFAULTS[dtype][0]
    threshold = threshold if threshold is not None else DEFAULTS[dtype][1]
    rng = np.random.default_rng(seed)
    check_bottoms = range(len(bottoms)) if check_bottoms is None else check_bottoms

    layer.reshape(bottoms, tops)
    layer.forward(bottoms, tops)
    projections = [rng.standard_normal(t.shape).astype(dtype) for t in tops]

    def objective():
        layer.forward(bottoms, tops)
        return float(sum(np.sum(t.data.astype(np.float64) * r) for t, r in zip(tops, projections)))

    def analytic():
        layer.forward(bottoms, tops)
        # Zero first, then seed the tops: a top may share its diff with a bottom (Flatten, Reshape).
        for b in bottoms:
            b.diff[...] = 0
        for p in layer.blobs:
            p.diff[...] = 0
        for t, r in zip(tops, projections):
            t.diff[...] = r
        propagate = [i in check_bottoms for i in range(len(bottoms))]
        layer.backward(tops, propagate, bottoms)
        return ([b.diff.copy() for b in bottoms], [p.diff.copy() for p in layer.blobs])

    bottom_grads, param_grads = analytic()
    targets = [(f"bottom {i}", bottoms[i], bottom_grads[i]) for i in check_bottoms]
    if check_params:
        targets += [(f"param {j}", p, g) for j, (p, g) in enumerate(zip(layer.blobs, param_grads))]

    for label, blob, grad in targets:
        flat = blob.data.reshape(-1)
        indices = np.arange(flat.size)
        if max_checks is not None and flat.size > max_checks:
            indices = rng.choice(flat.size, size=max_checks, replace=False)
        for k in indices:
            x = flat[k]
            if kink_range > 0 and abs(x - kink) < kink_range:
                continue
            flat[k] = x + step
            f_plus = objective()
            flat[k] = x - step
            f_minus = objective()
            flat[k] = x
            numeric = (f_plus - f_minus) / (2 * step)
            computed = float(grad.reshape(-1)[k])
            scale = max(abs(computed), abs(numeric), 1.0)
            assert abs(computed - numeric) <= threshold * scale, (
                f"{layer.name or layer.type_name}: {label} index {np.unravel_index(k, blob.shape)}: "
                f"analytic {computed:.8g} vs numeric {numeric:.8g}")
    layer.forward(bottoms, tops)



def check_net_gradient(net, blobs, step=1e-5, tolerance=1e-6, every=1):
    """Whole-net finite differences: the gradient of the total weighted loss with respect to every
    ``every``-th value of each blob in ``blobs`` (parameters or inputs; a float64 net) against
    central differences of ``net.forward_layers()``."""
    net.clear_param_diffs()
    net.forward_backward()
    for blob in blobs:
        analytic = blob.diff.copy().reshape(-1)
        flat = blob.data.reshape(-1)
        for k in range(0, flat.size, every):
            saved = flat[k]
            flat[k] = saved + step
            plus = net.forward_layers()
            flat[k] = saved - step
            minus = net.forward_layers()
            flat[k] = saved
            numeric = (plus - minus) / (2 * step)
            assert abs(numeric - analytic[k]) <= tolerance * max(1, abs(numeric)), (blob.name, k)
