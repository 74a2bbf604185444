"""Weight fillers with Caffe's semantics (filler.hpp), drawing from the framework RNG.

``fill_blob(blob, filler_param, where)`` writes ``blob.data`` as the FillerParameter says (each
filler returns the values, or None when it wrote them into ``out``, the blob's data, itself):

* constant: ``value``;
* uniform: U(``min``, ``max``);
* gaussian: N(``mean``, ``std``); with ``sparse`` >= 0 each entry is kept with probability
  sparse / shape[0] and zeroed otherwise;
* positive_unitball: U(0, 1), then each of the shape[0] slices scaled to sum to 1;
* xavier: U(-sqrt(3/n), sqrt(3/n)); msra: N(0, sqrt(2/n)), where n is fan_in = count / shape[0]
  (variance_norm FAN_IN, the default), fan_out = count / shape[1] (FAN_OUT), or their mean
  (AVERAGE);
* bilinear: the [K, K] kernel of bilinear upsampling in every [.., .., K, K] slice (for a
  Deconvolution that upsamples).

Every random draw comes from ``minicaffe.rng.generator()``, so the solver's ``random_seed`` makes
initialization repeatable. The random fillers draw in the blob's own precision, straight into it:
drawing float64 and converting cost seconds on the large nets (AlexNet's fc6 alone has 38M weights).
"""
import numpy as np

from . import rng
from .errors import MinicaffeError
from .proto import minicaffe_pb2 as pb

VARIANCE_NORM = pb.FillerParameter.VarianceNorm


def fill_blob(blob, filler_param, where="filler"):
    """Fills ``blob.data`` per ``filler_param``; errors are one line starting with ``where``."""
    kind = filler_param.type
    fill = _FILLERS.get(kind)
    if fill is None:
        raise MinicaffeError(f"{where}: unknown filler type '{kind}' (known: {', '.join(sorted(_FILLERS))})")
    if filler_param.sparse >= 0 and kind != "gaussian":
        raise MinicaffeError(f"{where}: sparse is only supported by the gaussian filler, not '{kind}'")
    if blob.count == 0:
        return
    values = fill(filler_param, blob.shape, rng.generator(), where, blob.data)
    if values is not None:
        blob.data[...] = values


def _uniform_into(out, low, high, generator):
    generator.random(out=out, dtype=out.dtype)
    out *= high - low
    out += low


def _normal_into(out, mean, std, generator):
    generator.standard_normal(out=out, dtype=out.dtype)
    out *= std
    out += mean


def _constant(param, shape, generator, where, out):
    return np.full(shape, param.value)


def _uniform(param, shape, generator, where, out):
    _uniform_into(out, param.min, param.max, generator)


def _gaussian(param, shape, generator, where, out):
    if param.std < 0:
        raise MinicaffeError(f"{where}: gaussian std must not be negative, got {param.std}")
    if param.sparse >= 0 and not shape:
        raise MinicaffeError(f"{where}: a sparse gaussian filler needs a blob with at least one axis")
    _normal_into(out, param.mean, param.std, generator)
    if param.sparse >= 0:
        out *= generator.random(size=shape, dtype=out.dtype) < param.sparse / shape[0]


def _positive_unitball(param, shape, generator, where, out):
    if not shape:
        raise MinicaffeError(f"{where}: positive_unitball needs a blob with at least one axis")
    _uniform_into(out, 0.0, 1.0, generator)
    slices = out.reshape(shape[0], -1)
    slices /= slices.sum(axis=1, keepdims=True)


def _fan(param, shape, kind, where):
    """Caffe's n for xavier and msra: fan_in, fan_out or their average, per variance_norm."""
    if not shape:
        raise MinicaffeError(f"{where}: {kind} needs a blob with at least one axis")
    count = int(np.prod(shape))
    fan_in = count / shape[0]
    fan_out = count / shape[1] if len(shape) > 1 else count
    if param.variance_norm == VARIANCE_NORM.FAN_OUT:
        return fan_out
    if param.variance_norm == VARIANCE_NORM.AVERAGE:
        return (fan_in + fan_out) / 2
    return fan_in


def _xavier(param, shape, generator, where, out):
    scale = np.sqrt(3.0 / _fan(param, shape, "xavier", where))
    _uniform_into(out, -scale, scale, generator)


def _msra(param, shape, generator, where, out):
    _normal_into(out, 0.0, np.sqrt(2.0 / _fan(param, shape, "msra", where)), generator)


def _bilinear(param, shape, generator, where, out):
    if len(shape) != 4 or shape[2] != shape[3]:
        raise MinicaffeError(f"{where}: bilinear needs a 4-D blob with square kernels, got shape {shape}")
    size = shape[3]
    factor = np.ceil(size / 2.0)
    center = (size - 1) / (2.0 * factor)
    taps = 1 - np.abs(np.arange(size) / factor - center)
    return np.broadcast_to(np.outer(taps, taps), shape)


_FILLERS = {
    "constant": _constant,
    "uniform": _uniform,
    "gaussian": _gaussian,
    "positive_unitball": _positive_unitball,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
}
