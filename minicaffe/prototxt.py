"""Reading and writing protos: text prototxts and binary .caffemodel/.solverstate/.binaryproto.

This is the one place that touches files holding protos, so every problem a user can cause
comes out as a one-line ``PrototxtError`` naming the file, the line and column, the field
and the enclosing layer, e.g.::

    lenet.prototxt:12:5: unknown field 'kernal_size' in ConvolutionParameter (layer 'conv1')

Writes are atomic: a crash or kill part-way leaves either the old file or the new one under
the final name, never a half-written file (snapshots depend on this).
"""

import os
import re
import secrets
from typing import NamedTuple

from google.protobuf import descriptor_pool, message as protobuf_message, text_encoding, text_format

from minicaffe.errors import PrototxtError
from minicaffe.proto import minicaffe_pb2


class ParsedNet(NamedTuple):
    """A parsed net prototxt and where each of its layers starts, for later error messages."""

    param: minicaffe_pb2.NetParameter
    path: str
    # layer_lines[i]: 1-based line of the i-th top-level `layer {`.
    layer_lines: list

    def location(self, layer_index):
        """'FILE:LINE' of layer `layer_index`, the prefix for errors about that layer."""
        return f"{self.path}:{self.layer_lines[layer_index]}"


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------

def parse_text(text, message, filename="<string>"):
    """Parse prototxt `text` into `message` (cleared first) and return it.

    Raises PrototxtError 'FILE:LINE:COL: what' on a syntax error, an unknown field, a bad
    enum value or a missing required field, naming the enclosing layer where there is one.
    """
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as error:
        raise PrototxtError(_describe_parse_error(error, text, filename)) from None
    if not message.IsInitialized():
        raise PrototxtError(_describe_missing_fields(message, text, filename))
    return message


def format_text(message):
    """`message` as prototxt text (UTF-8 kept readable, not escaped)."""
    return text_format.MessageToString(message, as_utf8=True)


def read_net(path):
    """Parse a net prototxt into a ParsedNet(param, path, layer_lines)."""
    path = os.fspath(path)
    text = _read_text(path)
    param = parse_text(text, minicaffe_pb2.NetParameter(), path)
    layer_lines = [block.line for block in _scan_blocks(text)
                   if block.field == "layer" and block.depth == 0]
    return ParsedNet(param, path, layer_lines)


def read_net_param(path):
    """Parse a net prototxt into a NetParameter."""
    return read_net(path).param


def read_solver(path):
    """Parse a solver prototxt into a SolverParameter."""
    path = os.fspath(path)
    return parse_text(_read_text(path), minicaffe_pb2.SolverParameter(), path)


def _read_text(path):
    data = _read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PrototxtError(f"{path}: not a text prototxt (byte {error.start} is not UTF-8)") \
            from None


# ---------------------------------------------------------------------------------------
# Binary
# ---------------------------------------------------------------------------------------

def read_binary(path, message, what="caffemodel"):
    """Parse the binary proto file at `path` into `message` (cleared first) and return it.

    `what` names the kind of file in errors ("caffemodel", "solverstate", "mean file", ...).
    A file cut short is reported as truncated even where protobuf would accept the prefix,
    except when the cut falls exactly between two top-level fields, which no reader can tell
    from a complete file.
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    if not data:
        raise PrototxtError(f"{path}: truncated or corrupt {what} (the file is empty)")
    problem, field_numbers = _check_wire_format(data)
    if problem is None:
        try:
            message.ParseFromString(data)
        except protobuf_message.DecodeError as error:
            problem = f"protobuf: {_one_line(error)}"
    if problem is not None:
        if _looks_like_text(data):
            problem = f"it looks like a text file, not a binary proto: {problem}"
        raise PrototxtError(f"{path}: truncated or corrupt {what} ({problem})")
    if isinstance(message, minicaffe_pb2.NetParameter) and _V1_LAYERS_FIELD in field_numbers:
        raise PrototxtError(f"{path}: {what} in the deprecated V1 format (`layers`); upgrade it "
                            f"with Caffe's upgrade_net_proto_binary")
    return message


def _looks_like_text(data):
    # Passing a .prototxt where weights are expected is a common slip worth naming.
    sample = data[:512]
    return sample.isascii() and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in sample)


# NetParameter field 2 is V1's `layers`, left out of our schema.
_V1_LAYERS_FIELD = 2

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LENGTH, _WIRE_FIXED32 = 0, 1, 2, 5


def _check_wire_format(data):
    """Walk the top-level fields of serialized `data`.

    Returns (problem, field_numbers): problem is None when every field's tag, varint and
    length fit inside the data, else a short description of the first that does not.
    """
    field_numbers = set()
    position, end = 0, len(data)
    while position < end:
        tag, after = _read_varint(data, position)
        if tag is None:
            return f"field tag at byte {position} runs past the end", field_numbers
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            return f"invalid field number 0 at byte {position}", field_numbers
        if wire_type == _WIRE_VARINT:
            value, after = _read_varint(data, after)
            if value is None:
                return f"field {number} at byte {position} runs past the end", field_numbers
        elif wire_type in (_WIRE_FIXED64, _WIRE_FIXED32):
            after += 8 if wire_type == _WIRE_FIXED64 else 4
        elif wire_type == _WIRE_LENGTH:
            length, after = _read_varint(data, after)
            if length is None:
                return f"length of field {number} at byte {position} runs past the end", \
                    field_numbers
            after += length
        else:
            return f"unsupported wire type {wire_type} at byte {position}", field_numbers
        if after > end:
            return (f"field {number} at byte {position} needs {after - position} bytes, "
                    f"only {end - position} left"), field_numbers
        field_numbers.add(number)
        position = after
    return None, field_numbers


def _read_varint(data, position):
    """(value, position after it), or (None, position) if it does not end within 10 bytes."""
    value = shift = 0
    for index in range(position, min(position + 10, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    return None, position


# ---------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------

def write_bytes_atomic(path, data):
    """Write `data` to `path` so that `path` holds either its old content or all of `data`.

    The bytes go to a temporary file in the same directory (same filesystem, so the rename is
    atomic), are flushed to disk, then renamed over `path`.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    temporary = os.path.join(directory,
                             f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # O_EXCL: never follow or clobber something already there; mode 0o666 lets the
        # umask give the file the permissions a plain open() would.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise PrototxtError(f"{path}: cannot write ({error.strerror})") from None
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        _remove_quietly(temporary)
        if isinstance(error, OSError):
            raise PrototxtError(f"{path}: cannot write ({error.strerror or error})") from None
        raise
    _sync_directory(directory)


def write_binary_atomic(path, message):
    """Serialize `message` to `path` atomically (see write_bytes_atomic)."""
    try:
        data = message.SerializeToString()
    except protobuf_message.EncodeError as error:
        raise PrototxtError(f"{os.fspath(path)}: cannot serialize "
                            f"{message.DESCRIPTOR.name} ({_one_line(error)})") from None
    write_bytes_atomic(path, data)


def write_text_atomic(path, message):
    """Write `message` as prototxt text to `path` atomically (see write_bytes_atomic)."""
    write_bytes_atomic(path, format_text(message).encode("utf-8"))


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _sync_directory(directory):
    # Makes the rename itself durable across a power loss; not every OS allows it.
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _read_bytes(path):
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except FileNotFoundError:
        raise PrototxtError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PrototxtError(f"{path}: is a directory, not a file") from None
    except OSError as error:
        raise PrototxtError(f"{path}: cannot read ({error.strerror or error})") from None


def _one_line(error):
    return " ".join(str(error).split())


# ---------------------------------------------------------------------------------------
# Error messages for text
# ---------------------------------------------------------------------------------------

_UNKNOWN_FIELD = re.compile(r'Message type "(?:\w+\.)*(\w+)" has no field named "(\w+)"\.?$')
_REPEATED_SINGULAR = re.compile(
    r'Message type "(?:\w+\.)*(\w+)" should not have multiple "(\w+)" fields\.?$')
_BAD_ENUM = re.compile(r'Enum type "([\w.]+)" has no value (named|with number) (\S+?)\.?$')
_FIELD_BEFORE_VALUE = re.compile(r"(\w+)\s*:?\s*$")


def _describe_parse_error(error, text, filename):
    line, column = error.GetLine(), error.GetColumn()
    # Lines as protobuf's tokenizer counts them: split at "\n" only.
    lines = text.split("\n")
    line_text = lines[line - 1] if line and line <= len(lines) else ""
    detail = " ".join(_strip_quoted_line(str(error), line_text).split())

    unknown = _UNKNOWN_FIELD.match(detail)
    if unknown and unknown.groups() == ("NetParameter", "layers"):
        return (f"{filename}:{line}:{column}: this net uses the deprecated V1 format "
                f"(`layers` blocks); upgrade it with Caffe's upgrade_net_proto_text")
    if unknown:
        detail = f"unknown field '{unknown.group(2)}' in {unknown.group(1)}"
    elif repeated := _REPEATED_SINGULAR.match(detail):
        detail = f"field '{repeated.group(2)}' of {repeated.group(1)} is given more than once"
    elif bad_enum := _BAD_ENUM.match(detail):
        detail = _describe_bad_enum(bad_enum, line_text[:max(column - 1, 0)])
    else:
        detail = detail.replace(f"{minicaffe_pb2.DESCRIPTOR.package}.", "").rstrip(".")
        detail = detail[:1].lower() + detail[1:]

    offset = _offset_of(text, line, column)
    if detail == 'expected "}"':
        unclosed = [block for block in _scan_blocks(text) if block.end is None]
        if unclosed:
            detail = f"the file ends before the '}}' closing the block opened on line " \
                     f"{unclosed[-1].line}"
    where = f"{filename}:{line}:{column}" if line else filename
    return f"{where}: {detail}{_layer_context(text, offset)}"


def _strip_quoted_line(detail, line_text):
    # protobuf prefixes some messages with "L:C : " and the offending line in quotes.
    detail = re.sub(r"^\d+:\d+ : ", "", detail)
    prefix = f"'{line_text}': "
    return detail[len(prefix):] if detail.startswith(prefix) else detail


def _describe_bad_enum(match, text_before_value):
    enum_name, kind, value = match.groups()
    enum = descriptor_pool.Default().FindEnumTypeByName(enum_name)
    allowed = ", ".join(value_descriptor.name for value_descriptor in enum.values)
    shown = f"'{value}'" if kind == "named" else value
    field = _FIELD_BEFORE_VALUE.search(text_before_value)
    field_part = f" for '{field.group(1)}'" if field else ""
    short_enum = enum_name.removeprefix(f"{minicaffe_pb2.DESCRIPTOR.package}.")
    return f"bad value {shown}{field_part} ({short_enum} is one of {allowed})"


def _describe_missing_fields(message, text, filename):
    # e.g. "layer[3].clip_param.max": point at that layer when the path starts with one.
    missing = message.FindInitializationErrors()
    first = missing[0]
    layer_index = re.match(r"layer\[(\d+)\]\.", first)
    layers = [block for block in _scan_blocks(text) if block.field == "layer" and block.depth == 0]
    if layer_index and int(layer_index.group(1)) < len(layers):
        block = layers[int(layer_index.group(1))]
        field_path = first[layer_index.end():]
        return (f"{filename}:{block.line}: missing required field {field_path}"
                f"{_describe_layer(block, int(layer_index.group(1)))}")
    return f"{filename}: missing required field(s) {', '.join(missing)}"


def _offset_of(text, line, column):
    if not line:
        return len(text)
    lines = text.split("\n")
    return sum(len(previous) + 1 for previous in lines[:line - 1]) + max(column - 1, 0)


def _layer_context(text, offset):
    """' (layer 'NAME')' for the innermost layer block around `offset`, else ''."""
    layers = [block for block in _scan_blocks(text) if block.field == "layer"]
    enclosing = [block for block in layers
                 if block.start <= offset and (block.end is None or offset <= block.end)]
    if not enclosing:
        return ""
    innermost = max(enclosing, key=lambda block: block.start)
    return _describe_layer(innermost, layers.index(innermost))


def _describe_layer(block, index):
    return f" (layer '{block.name}')" if block.name is not None else f" (layer #{index + 1})"


# ---------------------------------------------------------------------------------------
# A scanner for the block structure of prototxt text
# ---------------------------------------------------------------------------------------
# protobuf's parser stops at the first error and keeps no positions, so this light scanner
# recovers what it cannot tell us: where each `field { ... }` block starts and ends and the
# `name:` inside it. It is tolerant of malformed text because it runs on text that failed.

class _Block:
    __slots__ = ("field", "depth", "start", "end", "line", "name")

    def __init__(self, field, depth, start, line):
        self.field, self.depth, self.start, self.line = field, depth, start, line
        self.end = None
        self.name = None


_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"?|'(?:[^'\\\n]|\\.)*'?)
  | (?P<word>[\w.+-]+)
  | (?P<punct>.)
""", re.VERBOSE | re.DOTALL)

_IDENTIFIER = re.compile(r"[A-Za-z_]\w*$")


def _scan_blocks(text):
    """Every message block in `text`, in order of their opening brace."""
    blocks = []
    # Stack entries: a _Block, or a field name (str) for an open `field: [ ... ]` list.
    stack = []
    pending_field = None    # the field a following `{` or `[` would belong to
    previous_word = None    # last word at the current level, to spot `name: "..."`
    line = 1
    for token in _TOKEN.finditer(text):
        kind, value = token.lastgroup, token.group()
        if kind == "word":
            pending_field = value if _IDENTIFIER.match(value) else None
            previous_word = value
        elif kind == "string":
            innermost = stack[-1] if stack else None
            if previous_word == "name" and isinstance(innermost, _Block) and innermost.name is None:
                innermost.name = _unquote(value)
            pending_field = previous_word = None
        elif kind == "punct":
            if value in "{<":
                field = pending_field if pending_field is not None else (
                    stack[-1] if stack and isinstance(stack[-1], str) else None)
                depth = sum(isinstance(entry, _Block) for entry in stack)
                block = _Block(field, depth, token.start(), line)
                blocks.append(block)
                stack.append(block)
                pending_field = previous_word = None
            elif value in "}>":
                if stack and isinstance(stack[-1], _Block):
                    stack.pop().end = token.start()
                pending_field = previous_word = None
            elif value == "[":
                stack.append(pending_field or "")
                pending_field = None
            elif value == "]":
                if stack and isinstance(stack[-1], str):
                    stack.pop()
            elif value != ":":
                pending_field = previous_word = None
        line += value.count("\n")
    return blocks


def _unquote(token):
    body = token[1:-1] if len(token) >= 2 and token[-1] == token[0] else token[1:]
    try:
        return text_encoding.CUnescape(body).decode("utf-8", errors="replace")
    except ValueError:
        return body
