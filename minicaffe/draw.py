"""Draws a net as a Graphviz graph, as Caffe's python/caffe/draw.py (without pydot).

Layers are boxes (colored by type), blobs are octagons, and edges run blob -> layer -> blob. An
in-place layer (one bottom, one top, the same blob) is drawn in the neuron style and hangs on that
blob's single node, so ReLUs and BatchNorms sit beside the blob they rewrite instead of adding
nodes. Edges out of data, convolution and inner-product layers are labeled with the batch size or
the number of outputs. ``dot`` (Graphviz) renders the text; ``dot_text`` needs nothing installed.
"""
import argparse
import os
import shutil
import subprocess
import sys

from . import prototxt
from .errors import MinicaffeError
from .proto import minicaffe_pb2 as pb

RANKDIRS = ("LR", "TB", "BT", "RL")
PHASES = {"TRAIN": pb.TRAIN, "TEST": pb.TEST, "ALL": None}

LAYER_STYLE = {"shape": "record", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "style": "filled", "fillcolor": "#90EE90"}
BLOB_STYLE = {"shape": "octagon", "style": "filled", "fillcolor": "#E0E0E0"}
LAYER_COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
                "InnerProduct": "#CC33FF"}
DEFAULT_LAYER_COLOR = "#6495ED"

INSTALL_HINT = ("Graphviz's `dot` program was not found on PATH; install Graphviz "
                "(e.g. `apt-get install graphviz` or `brew install graphviz`), or pass --dot-only to "
                "write the .dot text")


class DrawError(MinicaffeError):
    """Graphviz is missing or failed to render."""


def layer_included(layer, phase):
    """Caffe's draw rule: with a phase, a layer is drawn unless its include/exclude rules reject it."""
    if phase is None:
        return True
    included = not layer.include or any(rule.phase == phase for rule in layer.include)
    return included and not any(rule.phase == phase for rule in layer.exclude)


def is_in_place(layer):
    return len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]


def layer_label(layer, rankdir):
    """Name, (type) and, for convolution and pooling, kernel size, stride and pad."""
    # Top-to-bottom graphs are wide, so their labels run on one line.
    sep = " " if rankdir in ("TB", "BT") else "\\n"
    label = f"{layer.name}{sep}({layer.type})"
    if layer.type in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        label += (f"{sep}kernel size: {_first(p.kernel_size, p.kernel_h, 1)}{sep}stride: "
                  f"{_first(p.stride, p.stride_h, 1)}{sep}pad: {_first(p.pad, p.pad_h, 0)}")
    elif layer.type == "Pooling":
        p = layer.pooling_param
        pool = pb.PoolingParameter.PoolMethod.Name(p.pool)
        kernel = "global" if p.global_pooling else p.kernel_size or p.kernel_h
        label += (f"{sep}pool type: {pool}{sep}kernel size: {kernel}{sep}stride: "
                  f"{p.stride if p.HasField('stride') else p.stride_h or 1}{sep}pad: {p.pad or p.pad_h}")
    return label


def _first(repeated, explicit, default):
    if len(repeated):
        return repeated[0]
    return explicit or default


def edge_label(layer):
    """What flows out of a layer: 'Batch N' for data layers, the output count for conv and fc."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return ""


def dot_text(net, rankdir="LR", phase=None, label_edges=True):
    """The Graphviz dot description of NetParameter ``net``; ``phase`` None draws every layer."""
    if rankdir not in RANKDIRS:
        raise DrawError(f"rankdir must be one of {', '.join(RANKDIRS)}, not '{rankdir}'")
    nodes = {}   # node id -> attributes, in first-seen order
    edges = []
    for layer in net.layer:
        if not layer_included(layer, phase):
            continue
        layer_id = _unique(f"{layer.name}_{layer.type}", nodes)
        style = NEURON_LAYER_STYLE if is_in_place(layer) else dict(
            LAYER_STYLE, fillcolor=LAYER_COLORS.get(layer.type, DEFAULT_LAYER_COLOR))
        nodes[layer_id] = dict(style, label=layer_label(layer, rankdir))
        for bottom in layer.bottom:
            nodes.setdefault(f"{bottom}_blob", dict(BLOB_STYLE, label=bottom))
            edges.append((f"{bottom}_blob", layer_id, ""))
        label = edge_label(layer) if label_edges else ""
        for top in layer.top:
            nodes.setdefault(f"{top}_blob", dict(BLOB_STYLE, label=top))
            edges.append((layer_id, f"{top}_blob", label))
    lines = [f"digraph {_quote(net.name or 'Net')} {{", f"  rankdir={rankdir};"]
    for node_id, attributes in nodes.items():
        lines.append(f"  {_quote(node_id)} [{_attributes(attributes)}];")
    for source, target, label in edges:
        attributes = f" [label={_quote(label)}]" if label else ""
        lines.append(f"  {_quote(source)} -> {_quote(target)}{attributes};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _unique(node_id, nodes):
    # Twin layers (a TRAIN and a TEST data layer of one name) stay two nodes when drawn together.
    candidate, k = node_id, 1
    while candidate in nodes:
        k += 1
        candidate = f"{node_id}_{k}"
    return candidate


def _attributes(attributes):
    return ", ".join(f"{key}={_quote(value)}" for key, value in attributes.items())


def _quote(text):
    # Labels carry dot's own "\n" line breaks; every other backslash and quote is escaped.
    escaped = text.replace("\\n", "\0").replace("\\", "\\\\").replace('"', '\\"').replace("\0", "\\n")
    return f'"{escaped}"'


def find_dot():
    """The path of Graphviz's ``dot``, or None."""
    return shutil.which("dot")


def render(text, fmt):
    """Runs ``dot -T<fmt>`` on dot text and returns the image bytes."""
    dot = find_dot()
    if dot is None:
        raise DrawError(INSTALL_HINT)
    try:
        result = subprocess.run([dot, f"-T{fmt}"], input=text.encode("utf-8"), capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DrawError(f"cannot run {dot}: {error}") from None
    if result.returncode != 0:
        message = " ".join(result.stderr.decode("utf-8", "replace").split()) or f"exit status {result.returncode}"
        raise DrawError(f"dot -T{fmt} failed: {message}")
    return result.stdout


def draw_net(net, rankdir="LR", ext="png", phase=None):
    """The net drawn as an image in format ``ext`` (pycaffe's ``caffe.draw.draw_net``)."""
    return render(dot_text(net, rankdir, phase), ext)


def draw_net_to_file(net, filename, rankdir="LR", phase=None):
    """Writes the drawing to ``filename``, in the format its extension names (.dot writes the text)."""
    ext = os.path.splitext(os.fspath(filename))[1].lstrip(".").lower()
    if not ext:
        raise DrawError(f"{filename}: give the output an extension (.png, .svg, .pdf, .dot, ...) to "
                        "choose the format")
    text = dot_text(net, rankdir, phase)
    data = text.encode("utf-8") if ext in ("dot", "gv") else render(text, ext)
    try:
        with open(filename, "wb") as stream:
            stream.write(data)
    except OSError as error:
        raise DrawError(f"{filename}: cannot write ({error.strerror or error})") from None


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="draw_net", description="Draw a net prototxt as an image with Graphviz, as Caffe's draw_net.py.")
    parser.add_argument("input_net_proto_file", help="the net prototxt")
    parser.add_argument("output_image_file", help="the image to write; its extension picks the format")
    parser.add_argument("--rankdir", default="LR", choices=RANKDIRS,
                        help="direction of the graph: LR (left to right, the default), TB, BT or RL")
    parser.add_argument("--phase", default="ALL", choices=sorted(PHASES),
                        help="draw the layers of the TRAIN or TEST phase, or ALL layers (the default)")
    parser.add_argument("--dot-only", action="store_true",
                        help="write the Graphviz text (OUTPUT with a .dot extension) instead of an image")
    args = parser.parse_args(argv)
    try:
        net = prototxt.read_net_param(args.input_net_proto_file)
        output = args.output_image_file
        if args.dot_only:
            output = os.path.splitext(output)[0] + ".dot"
        draw_net_to_file(net, output, args.rankdir, PHASES[args.phase])
    except MinicaffeError as error:
        print(f"draw_net: error: {error}", file=sys.stderr)
        return 1
    print(f"Drawing net to {output}")
    return 0
