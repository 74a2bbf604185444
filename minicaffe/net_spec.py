"""NetSpec: write nets as Python code, as pycaffe's ``caffe.net_spec``.

::

    from minicaffe.net_spec import NetSpec, layers as L, params as P
    n = NetSpec()
    n.data, n.label = L.Data(source="fashion-mnist:train", batch_size=64, backend=P.Data.IDX, ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    text = str(n.to_proto())

``L.<Type>(*bottoms, **fields)`` makes one layer of that type. A keyword names a field of the
layer's own parameter message (``num_output`` goes to ``convolution_param``), or, failing that, a
field of LayerParameter (``param``, ``loss_weight``, ``include``, ``name``); keywords ending in
``_param`` always name a LayerParameter field. Dicts fill messages, lists fill repeated fields, and a
single value given to a repeated field becomes a one-element list. Three keywords are not fields:
``ntop`` (the number of tops, 1 by default; 0 returns the layer itself), ``in_place`` (the layer's
top is its bottom) and ``name`` (overrides the layer name, which is otherwise the name of its first
top in the NetSpec).

A top's name is its NetSpec attribute name; a top not stored in the NetSpec is named after its layer
type and a counter ("Convolution1"), as pycaffe does. ``P.<Type>.<ENUM>`` reads enum values, e.g.
``P.Pooling.MAX``; enum fields also accept the value's name as a string.
"""
import collections
import sys

from google.protobuf.descriptor import FieldDescriptor

from .errors import MinicaffeError
from .proto import minicaffe_pb2 as pb

__all__ = ["NetSpec", "Top", "Function", "layers", "params", "to_proto", "param_name_dict"]


def param_name_dict():
    """Maps a layer type to the prefix of its parameter field: {'Convolution': 'convolution', ...}.

    Derived from LayerParameter itself: a field ``foo_param`` of message type ``FooParameter``
    belongs to layer type ``Foo``. Deconvolution reads convolution_param, as in Caffe.
    """
    names = {}
    for field in pb.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                names[type_name[:-len("Parameter")]] = field.name[:-len("_param")]
    names["Deconvolution"] = "convolution"
    return names


_PARAM_NAMES = param_name_dict()


def assign_proto(message, name, value):
    """Sets field ``name`` of ``message`` from a Python value: scalars, dicts (messages) or lists."""
    field = message.DESCRIPTOR.fields_by_name.get(name)
    if field is None:
        raise MinicaffeError(f"{message.DESCRIPTOR.name} has no field '{name}'")
    if is_repeated(field):
        values = value if isinstance(value, (list, tuple)) else [value]
        container = getattr(message, name)
        for item in values:
            if field.message_type is not None:
                _fill_message(container.add(), item, name)
            else:
                container.append(_scalar(field, item))
    elif field.message_type is not None:
        _fill_message(getattr(message, name), value, name)
    else:
        setattr(message, name, _scalar(field, value))


def is_repeated(field):
    # protobuf 5+ spells it is_repeated; older releases only have label.
    repeated = getattr(field, "is_repeated", None)
    return repeated if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _fill_message(message, value, name):
    if isinstance(value, dict):
        for key, item in value.items():
            assign_proto(message, key, item)
    elif isinstance(value, type(message)):
        message.CopyFrom(value)
    else:
        raise MinicaffeError(f"field '{name}' is a {message.DESCRIPTOR.name} message: give a dict, "
                             f"not {type(value).__name__} {value!r}")


def _scalar(field, value):
    if field.enum_type is not None and isinstance(value, str):
        enum_value = field.enum_type.values_by_name.get(value)
        if enum_value is None:
            allowed = ", ".join(v.name for v in field.enum_type.values)
            raise MinicaffeError(f"field '{field.name}': bad value '{value}' ({field.enum_type.name} is "
                                 f"one of {allowed})")
        return enum_value.number
    return value


class Top:
    """One output of a Function; what ``L.<Type>(...)`` returns and what layers take as bottoms."""

    def __init__(self, fn, n):
        self.fn = fn
        self.n = n

    def to_proto(self):
        """The NetParameter of every layer this top depends on."""
        return to_proto(self)

    def _to_proto(self, layers, names, autonames):
        return self.fn._to_proto(layers, names, autonames)


class Function:
    """One layer: its type, its bottoms (Tops) and its keyword fields."""

    def __init__(self, type_name, inputs, params):
        for index, bottom in enumerate(inputs):
            if not isinstance(bottom, Top):
                raise MinicaffeError(f"{type_name}: bottom {index} is a {type(bottom).__name__}, not a top "
                                     f"made by another layer")
        self.type_name = type_name
        self.inputs = tuple(inputs)
        params = dict(params)
        self.ntop = params.pop("ntop", 1)
        self.in_place = params.pop("in_place", False)
        self.name = params.pop("name", None)
        self.params = params
        if self.in_place and self.ntop != len(self.inputs):
            raise MinicaffeError(f"{type_name}: in_place needs one top per bottom ({len(self.inputs)} "
                                 f"bottoms, ntop={self.ntop})")
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _top_name(self, top, names, autonames):
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = f"{top.fn.type_name}{autonames[top.fn.type_name]}"
        return names[top]

    def _layer_name(self, names, autonames):
        if self.name is not None:
            return self.name
        if self not in names:
            if self.ntop > 0:
                names[self] = self._top_name(self.tops[0], names, autonames)
            else:
                autonames[self.type_name] += 1
                names[self] = f"{self.type_name}{autonames[self.type_name]}"
        return names[self]

    def _to_proto(self, layers, names, autonames):
        if self in layers:
            return
        bottom_names = []
        for bottom in self.inputs:
            bottom._to_proto(layers, names, autonames)
            bottom_names.append(layers[bottom.fn].top[bottom.n])
        layer = pb.LayerParameter(type=self.type_name)
        layer.bottom.extend(bottom_names)
        if self.in_place:
            layer.top.extend(bottom_names)
        else:
            layer.top.extend(self._top_name(top, names, autonames) for top in self.tops)
        layer.name = self._layer_name(names, autonames)
        own_param = _PARAM_NAMES.get(self.type_name)
        for key, value in self.params.items():
            self._assign(layer, own_param, key, value)
        layers[self] = layer

    def _assign(self, layer, own_param, key, value):
        try:
            if not key.endswith("_param") and own_param is not None:
                own = getattr(layer, f"{own_param}_param")
                if key in own.DESCRIPTOR.fields_by_name:
                    assign_proto(own, key, value)
                    return
            assign_proto(layer, key, value)
        except (MinicaffeError, TypeError, ValueError) as error:
            where = f"{own_param}_param or LayerParameter" if own_param else "LayerParameter"
            raise MinicaffeError(f"layer '{layer.name}' ({self.type_name}): cannot set '{key}' in {where}: "
                                 f"{_one_line(error)}") from None


def _one_line(error):
    return " ".join(str(error).split())


class NetSpec:
    """Tops by name, in assignment order; ``to_proto()`` writes every layer they need."""

    def __init__(self):
        super().__setattr__("tops", collections.OrderedDict())

    def __setattr__(self, name, value):
        self.tops[name] = value

    def __getattr__(self, name):
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, name, value):
        self.tops[name] = value

    def __getitem__(self, name):
        return self.tops[name]

    def __delitem__(self, name):
        del self.tops[name]

    def keys(self):
        return list(self.tops.keys())

    def vals(self):
        return list(self.tops.values())

    def to_proto(self):
        names = {top: name for name, top in self.tops.items()}
        autonames = collections.Counter()
        layers = collections.OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = pb.NetParameter()
        net.layer.extend(layers.values())
        return net


def to_proto(*tops):
    """The NetParameter of every layer the given tops depend on (intermediate tops auto-named)."""
    layers = collections.OrderedDict()
    autonames = collections.Counter()
    for top in tops:
        top.fn._to_proto(layers, {}, autonames)
    net = pb.NetParameter()
    net.layer.extend(layers.values())
    return net


class Layers:
    """``L.Convolution(...)``: any attribute is a layer type; calling it makes that layer."""

    def __getattr__(self, type_name):
        if type_name.startswith("__"):
            raise AttributeError(type_name)
        # Exported as ``minicaffe.layers`` (pycaffe's ``caffe.layers``), this object stands where the
        # minicaffe/layers/ package would, so ``import minicaffe.layers.conv as m`` (which resolves by
        # attribute) must still find the module. Modules are lowercase, layer types CamelCase.
        module = sys.modules.get(f"{__package__}.layers.{type_name}")
        if module is not None:
            return module

        def make_layer(*bottoms, **fields):
            fn = Function(type_name, bottoms, fields)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        return make_layer


class _ParameterEnums:
    def __init__(self, message_name):
        self._message = getattr(pb, f"{message_name}Parameter", None)
        self._name = message_name

    def __getattr__(self, value_name):
        if value_name.startswith("__"):
            raise AttributeError(value_name)
        if self._message is None:
            raise AttributeError(f"there is no {self._name}Parameter message")
        try:
            return getattr(self._message, value_name)
        except AttributeError:
            raise AttributeError(f"{self._name}Parameter has no value {value_name}") from None


class Parameters:
    """``P.Pooling.MAX``: enum values of ``<Type>Parameter`` messages."""

    def __getattr__(self, message_name):
        if message_name.startswith("__"):
            raise AttributeError(message_name)
        return _ParameterEnums(message_name)


layers = Layers()
params = Parameters()
