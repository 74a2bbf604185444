"""Layer base class and the registry of layer types, after Caffe's layer.hpp and layer_factory.

A layer declares its arity as class attributes, registers under its Caffe type name with
``@register("TypeName")``, and implements ``setup``, ``reshape``, ``forward`` and ``backward``.
``backward`` fills ``bottom[i].diff`` where ``propagate_down[i]`` is true and *accumulates* into
``self.blobs[j].diff``; the solver clears parameter diffs before each iteration.
"""
import difflib

from .blob import Blob
from .errors import LayerError, MinicaffeError
from .filler import fill_blob

_REGISTRY = {}


def register(type_name):
    """Class decorator: makes the class the implementation of Caffe layer type ``type_name``."""

    def decorate(cls):
        if type_name in _REGISTRY:
            raise RuntimeError(f"layer type {type_name!r} registered twice")
        _REGISTRY[type_name] = cls
        cls.type_name = type_name
        return cls

    return decorate


def layer_type_list():
    """The registered layer types, sorted, as pycaffe's ``caffe.layer_type_list()``."""
    _import_builtin_layers()
    return sorted(_REGISTRY)


def layer_class(type_name, layer_name="?", where=""):
    _import_builtin_layers()
    cls = _REGISTRY.get(type_name)
    if cls is None:
        close = difflib.get_close_matches(type_name, _REGISTRY, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        prefix = f"{where}: " if where else ""
        raise MinicaffeError(
            f"{prefix}layer '{layer_name}' has unknown type '{type_name}'{hint} "
            f"(run `minicaffe layers` for the full list)")
    return cls


def create_layer(param, phase):
    return layer_class(param.type, param.name)(param, phase)


def _import_builtin_layers():
    from . import layers  # noqa: F401  (importing the package registers every built-in layer)


class Layer:
    """Base class. Subclasses override the four methods and the arity attributes below."""

    type_name = "Layer"
    exact_num_bottom = None
    min_bottom = None
    max_bottom = None
    exact_num_top = None
    min_top = None
    max_top = None
    # Loss layers get loss_weight 1 on their first top unless the prototxt says otherwise.
    is_loss = False
    # Layers whose backward is meaningless for some bottoms (labels) list them here.
    no_backward_bottoms = ()

    def __init__(self, param, phase):
        self.param = param
        self.phase = phase
        self.name = param.name
        self.blobs = []
        self.loss_weights = []
        # Per parameter blob: does the solver want its gradient? (False for lr_mult 0, as Caffe's
        # param_propagate_down.) Layers may skip computing gradients the solver will not use.
        self.param_propagate_down = []

    # -- the four methods --------------------------------------------------------------------------
    def setup(self, bottom, top):
        """Reads the layer's parameters and creates and fills ``self.blobs``."""

    def reshape(self, bottom, top):
        raise NotImplementedError

    def forward(self, bottom, top):
        raise NotImplementedError

    def backward(self, top, propagate_down, bottom):
        """Layers without a backward pass (data, accuracy) leave this as a no-op."""

    # -- helpers for subclasses --------------------------------------------------------------------
    def error(self, message):
        return LayerError(self.name, self.type_name, message)

    def new_param_blob(self, shape, suffix):
        return Blob(shape, name=f"{self.name}.{suffix}")

    def new_filled_blob(self, shape, suffix, filler_param, field):
        """A parameter blob filled as ``filler_param`` says; filler errors name this layer and ``field``."""
        blob = self.new_param_blob(shape, suffix)
        try:
            fill_blob(blob, filler_param, where=field)
        except MinicaffeError as err:
            raise self.error(str(err)) from None
        return blob

    def weight_and_bias(self, weight_shape, num_output, param):
        """Caffe's usual parameters: a weight from ``param.weight_filler`` and, with ``param.bias_term``,
        a bias of ``num_output`` values from ``param.bias_filler``."""
        blobs = [self.new_filled_blob(weight_shape, "weight", param.weight_filler, "weight_filler")]
        if param.bias_term:
            blobs.append(self.new_filled_blob((num_output,), "bias", param.bias_filler, "bias_filler"))
        return blobs

    def check_arity(self, bottom, top):
        def check(kind, n, exact, lo, hi):
            if exact is not None and n != exact:
                raise self.error(f"takes exactly {exact} {kind} blob(s), got {n}")
            if lo is not None and n < lo:
                raise self.error(f"takes at least {lo} {kind} blob(s), got {n}")
            if hi is not None and n > hi:
                raise self.error(f"takes at most {hi} {kind} blob(s), got {n}")

        check("bottom", len(bottom), self.exact_num_bottom, self.min_bottom, self.max_bottom)
        check("top", len(top), self.exact_num_top, self.min_top, self.max_top)

    def layer_setup(self, bottom, top):
        """Arity check, setup, reshape: what the net calls once when it builds the layer."""
        self.check_arity(bottom, top)
        self.setup(bottom, top)
        self.param_propagate_down = [True] * len(self.blobs)
        self.reshape(bottom, top)

    def allow_force_backward(self, bottom_index):
        return bottom_index not in self.no_backward_bottoms

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"
