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

__all__ = ["Blob", "Layer", "MinicaffeError", "Net", "TEST", "TRAIN", "get_solver", "layer_type_list",
           "register", "set_mode_cpu", "set_random_seed"]


def set_mode_cpu():
    """For pycaffe scripts: minicaffe always runs on the CPU, so this only confirms the mode."""
