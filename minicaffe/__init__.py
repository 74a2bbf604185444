"""minicaffe: a Caffe-compatible deep-learning framework for CPUs.

The Python API follows pycaffe::

    import minicaffe
    net = minicaffe.Net("deploy.prototxt", weights="model.caffemodel", phase=minicaffe.TEST)
    out = net.forward(data=images)
    solver = minicaffe.get_solver("solver.prototxt"); solver.step(100)
"""
from .cpu import configure_native_libraries

configure_native_libraries()

from .blob import Blob  # noqa: E402  (BLAS settings must be in place before NumPy and SciPy load)
from .errors import MinicaffeError
from .layer import Layer, layer_type_list, register
from .net import TEST, TRAIN, Net
from .rng import set_seed as set_random_seed
from .solvers import get_solver
# The built-in layer package must be imported before NetSpec's `layers` object takes the name
# `minicaffe.layers` in this namespace, as pycaffe's `caffe.layers` does.
from . import layers as _builtin_layers  # noqa: E402,F401
from . import net_spec  # noqa: E402
from .net_spec import NetSpec, layers, params, to_proto  # noqa: E402

__all__ = ["Blob", "Layer", "MinicaffeError", "Net", "NetSpec", "TEST", "TRAIN", "get_solver", "layer_type_list",
           "layers", "net_spec", "params", "register", "set_mode_cpu", "set_random_seed", "to_proto"]


def set_mode_cpu():
    """For pycaffe scripts: minicaffe always runs on the CPU, so this only confirms the mode."""
