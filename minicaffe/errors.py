"""User-facing errors.

Every error a user can cause (a bad prototxt, a missing file, a shape that does not fit) is raised as a
``MinicaffeError`` whose message is one line naming where the problem is: file, line, layer, field.
The command-line tools print that line and exit non-zero instead of showing a traceback.
"""


class MinicaffeError(Exception):
    """An error caused by the user's input; its message is one self-contained line."""


class PrototxtError(MinicaffeError):
    """A prototxt or binary proto file that cannot be read or does not fit the schema."""


class LayerError(MinicaffeError):
    """A layer whose parameters or input shapes are invalid; the message names the layer."""

    def __init__(self, layer_name, layer_type, message):
        super().__init__(f"layer '{layer_name}' ({layer_type}): {message}")
        self.layer_name = layer_name
        self.layer_type = layer_type


class DataError(MinicaffeError):
    """A data source that is missing, truncated or of the wrong format."""


class NumericalError(MinicaffeError):
    """A tensor that holds inf or NaN where the computation cannot go on."""
