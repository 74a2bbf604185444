"""``type: "Python"``: a layer written in Python by the user, loaded by name, in the manner of pycaffe.

    layer { name: "loss" type: "Python" bottom: "pred" bottom: "label" top: "loss" loss_weight: 1
            python_param { module: "my_layers" layer: "EuclideanLoss" param_str: "{'scale': 2}" } }

The module is imported from the current directory or from ``sys.path`` (set PYTHONPATH as with
pycaffe). The class subclasses ``minicaffe.Layer`` and defines ``reshape`` and ``forward``, and
usually ``setup`` and ``backward``; a class that is not a subclass works too if it defines all four
and can be constructed without arguments. A pycaffe module runs unchanged once its ``import caffe``
reads ``import minicaffe as caffe``.

As in pycaffe, before ``setup(bottom, top)`` runs the instance gets ``self.param_str`` (the string from
the prototxt), ``self.phase`` (``minicaffe.TRAIN`` or ``minicaffe.TEST``) and ``self.blobs``, whose
``add_blob(*shape)`` creates a learnable parameter the solver updates and ``.caffemodel`` files store.
The methods receive lists of blobs, which have pycaffe's interface: ``.data`` and ``.diff`` (NumPy
views), ``.shape``, ``.count``, ``.reshape(*shape)`` and the legacy ``.num/.channels/.height/.width``.
``backward`` should add into parameter diffs rather than overwrite them, as built-in layers do.

As in Caffe, a Python loss needs ``loss_weight: 1`` on its top, unless its class sets
``is_loss = True``; a class may also list label bottoms in ``no_backward_bottoms``.
``python_param.share_in_parallel`` is accepted and has no effect: each process runs its own interpreter.
Errors in the user's code come out as one line naming the layer, the module, the class, the method
and where in the module the error happened.
"""
import difflib
import importlib
import inspect
import numbers
import os
import sys
import traceback

from minicaffe.blob import Blob
from minicaffe.errors import LayerError, MinicaffeError
from minicaffe.layer import Layer, register

_METHODS = ("setup", "reshape", "forward", "backward")


class ParamBlobs(list):
    """A Python layer's ``self.blobs``: a list of parameter blobs with pycaffe's ``add_blob(*shape)``."""

    def add_blob(self, *shape):
        if len(shape) == 1 and not isinstance(shape[0], numbers.Integral):
            shape = shape[0]
        self.append(Blob(shape))


@register("Python")
class PythonLayer(Layer):
    """Loads ``python_param.layer`` from ``python_param.module`` and runs it (see the module docstring)."""

    def setup(self, bottom, top):
        p = self.param.python_param
        if not p.module or not p.layer:
            raise self.error("needs python_param { module: \"...\" layer: \"...\" }")
        self.module_name, self.class_name = p.module, p.layer
        self.module = self._import(p.module)
        self.user_layer = self._instantiate(self._find_class())
        self.user_layer.param_str = p.param_str
        self.user_layer.phase = self.phase
        self.user_layer.blobs = ParamBlobs()
        self._call("setup", bottom, top)
        self.blobs = self._param_blobs()
        self.is_loss = bool(getattr(self.user_layer, "is_loss", False))
        self.no_backward_bottoms = tuple(getattr(self.user_layer, "no_backward_bottoms", ()))

    def reshape(self, bottom, top):
        self._call("reshape", bottom, top)

    def forward(self, bottom, top):
        self._call("forward", bottom, top)

    def backward(self, top, propagate_down, bottom):
        self._call("backward", top, list(propagate_down), bottom)

    def __getattr__(self, name):
        # As in pycaffe, where net.layers[i] is the user's object: reach its attributes through the net.
        user_layer = self.__dict__.get("user_layer")
        if user_layer is None:
            raise AttributeError(name)
        return getattr(user_layer, name)

    # -- loading -----------------------------------------------------------------------------------
    def _where(self):
        return f"python_param module '{self.module_name}' layer '{self.class_name}'"

    def _import(self, name):
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        # Modules written after the interpreter started are found only once the finders' caches are dropped.
        importlib.invalidate_caches()
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
                raise self.error(f"python_param.module '{name}' not found in the current directory ({cwd}) "
                                 f"or on sys.path; add its folder to PYTHONPATH") from None
            raise self.error(f"importing python_param.module '{name}' failed: {_describe(err)}") from err
        except Exception as err:
            raise self.error(f"importing python_param.module '{name}' failed: {_describe(err)}") from err
        finally:
            if added and cwd in sys.path:
                sys.path.remove(cwd)

    def _find_class(self):
        cls = getattr(self.module, self.class_name, None)
        if cls is None:
            classes = [n for n, v in vars(self.module).items() if inspect.isclass(v)]
            close = difflib.get_close_matches(self.class_name, classes, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise self.error(f"module '{self.module_name}' ({_module_file(self.module)}) has no class "
                             f"'{self.class_name}'{hint}")
        if not inspect.isclass(cls):
            raise self.error(f"{self._where()}: '{self.class_name}' is a {type(cls).__name__}, not a class")
        if issubclass(cls, Layer):
            missing = [m for m in ("reshape", "forward") if getattr(cls, m) is getattr(Layer, m)]
        else:
            missing = [m for m in _METHODS if not callable(getattr(cls, m, None))]
        if missing:
            raise self.error(f"{self._where()}: the class does not define {', '.join(m + '()' for m in missing)} "
                             f"(a Python layer subclasses minicaffe.Layer and defines setup, reshape, forward "
                             f"and backward)")
        return cls

    def _instantiate(self, cls):
        try:
            user_layer = cls(self.param, self.phase) if issubclass(cls, Layer) else cls()
        except Exception as err:
            raise self.error(f"{self._where()}: creating the layer failed: {_describe(err, self.module)}") from err
        if isinstance(user_layer, Layer) and type(user_layer).type_name == Layer.type_name:
            # So that the user's self.error(...) names this layer as a Python layer.
            user_layer.type_name = self.type_name
        return user_layer

    def _param_blobs(self):
        blobs = []
        for i, blob in enumerate(getattr(self.user_layer, "blobs", None) or ()):
            if not isinstance(blob, Blob):
                raise self.error(f"{self._where()}: self.blobs[{i}] is a {type(blob).__name__}, not a blob; "
                                 f"create parameters with self.blobs.add_blob(*shape)")
            blobs.append(blob)
        return blobs

    # -- running -----------------------------------------------------------------------------------
    def _call(self, method, *args):
        try:
            getattr(self.user_layer, method)(*args)
        except Exception as err:
            if isinstance(err, LayerError) and err.layer_name == self.name:
                raise  # the user's own self.error(...): already one line naming this layer
            raise self.error(f"{self._where()}: {method}() failed: {_describe(err, self.module)}") from err


def _module_file(module):
    return getattr(module, "__file__", None) or module.__name__


def _describe(err, module=None):
    """'ValueError: message (at file.py:12)' in one line, at the deepest frame in ``module``'s file."""
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, MinicaffeError):
        text = message
    else:
        text = f"{type(err).__name__}: {message}" if message else type(err).__name__
    frames = traceback.extract_tb(err.__traceback__)
    if isinstance(err, SyntaxError) and err.filename:
        location = (err.filename, err.lineno)
    else:
        module_file = getattr(module, "__file__", None)
        ours = [f for f in frames if module_file and f.filename == module_file]
        chosen = ours[-1] if ours else (frames[-1] if frames else None)
        location = (chosen.filename, chosen.lineno) if chosen else None
    if location is not None:
        text += f" (at {os.path.basename(location[0])}:{location[1]})"
    return text
