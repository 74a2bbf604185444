"""Predicted scale-out of synchronous data-parallel SGD with the gradient allreduce overlapped with backward.

    tools/scaling_model --model=NET.prototxt (--hardware=HW.json | --flops=F --bandwidth=B --latency=A
                        [--algorithm=ring|tree|recursive_doubling]) [--nodes=1,2,4,...,1024]
                        [--bucket-bytes=4194304] [--exposed-threshold=0.05] [--phase=TRAIN] [--json]

The model (Das et al. 2016, arXiv 1602.06709; Sridharan et al. 2018, arXiv 1801.08030 / Intel Caffe's
multinode solver): weak scaling, every node runs the net at its own batch, the global batch is
batch x nodes. Layer times are FLOPs (``minicaffe.flops.layer_costs``) over the node's sustained FLOP/s.
Backward runs the layers in reverse; a layer's gradients are ready when its backward ends and are
gathered, in the order they become ready, into buckets of at least ``bucket_bytes`` (a bucket is sent when
its last gradient is ready; a bucket never splits a layer; 0 sends each layer on its own). Buckets are
allreduced one at a time on the link, in that order. The update does not overlap the next forward, so

    iteration = forward + max(backward end, last allreduce end)
    no overlap = forward + backward + sum of the allreduces
    exposed communication = iteration - (forward + backward)

Allreduce of n bytes over p nodes, link bandwidth B bytes/s and latency alpha s (reduction arithmetic
neglected; Thakur, Rabenseifner & Gropp 2005, "Optimization of collective communication operations in
MPICH"; Patarasuk & Yuan 2009 for the ring):
    ring                (reduce-scatter + allgather): 2(p-1)/p * n/B + 2(p-1) * alpha
    tree                (binomial reduce + broadcast): 2 * ceil(log2 p) * (alpha + n/B)
    recursive_doubling  (whole vector each round):     ceil(log2 p) * (alpha + n/B)
and 0 on one node.

A hardware description is a JSON object with the flags' names, e.g. a node of 1 TFLOP/s sustained on a
10 GB/s link with 5 us latency:
    {"flops": 1e12, "bandwidth": 1e10, "latency": 5e-6, "algorithm": "ring"}
Flags given on the command line override the file's entries.

"Communication can no longer hide" is the smallest node count whose exposed communication exceeds
``exposed_threshold`` (default 5%) of the compute time (forward + backward).
"""
import argparse
import dataclasses
import json
import math
import os
import sys

from .errors import MinicaffeError

ALGORITHMS = ("ring", "tree", "recursive_doubling")
DEFAULT_NODES = tuple(2 ** k for k in range(11))
DEFAULT_BUCKET_BYTES = 4 * 2 ** 20
DEFAULT_EXPOSED_THRESHOLD = 0.05


@dataclasses.dataclass(frozen=True)
class Hardware:
    flops: float          # sustained FLOP/s of one node
    bandwidth: float      # link bytes/s
    latency: float        # seconds per message step
    algorithm: str = "ring"

    def __post_init__(self):
        for field in ("flops", "bandwidth"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise MinicaffeError(f"hardware: {field} must be a positive number, got {value!r}")
        if not isinstance(self.latency, (int, float)) or not self.latency >= 0 or math.isinf(self.latency):
            raise MinicaffeError(f"hardware: latency must be a non-negative number, got {self.latency!r}")
        if self.algorithm not in ALGORITHMS:
            raise MinicaffeError(f"hardware: algorithm must be one of {', '.join(ALGORITHMS)}, "
                                 f"got {self.algorithm!r}")


@dataclasses.dataclass(frozen=True)
class LayerWork:
    """What one layer costs a node: forward and backward seconds and the gradient bytes it allreduces."""
    name: str
    forward_s: float
    backward_s: float
    gradient_bytes: int


@dataclasses.dataclass(frozen=True)
class Prediction:
    nodes: int
    batch: int                   # per node
    forward_s: float
    backward_s: float
    iteration_s: float
    no_overlap_s: float
    communication_s: float       # sum of the allreduces
    exposed_s: float
    images_per_s: float
    speedup: float
    efficiency: float

    @property
    def exposed_fraction(self):
        return self.exposed_s / (self.forward_s + self.backward_s)


def allreduce_time(nbytes, nodes, bandwidth, latency, algorithm="ring"):
    """Seconds to allreduce ``nbytes`` over ``nodes`` nodes (formulas in the module docstring)."""
    if nodes <= 1 or nbytes == 0:
        return 0.0
    transfer = nbytes / bandwidth
    if algorithm == "ring":
        return 2 * (nodes - 1) / nodes * transfer + 2 * (nodes - 1) * latency
    rounds = math.ceil(math.log2(nodes))
    if algorithm == "tree":
        return 2 * rounds * (latency + transfer)
    if algorithm == "recursive_doubling":
        return rounds * (latency + transfer)
    raise MinicaffeError(f"unknown allreduce algorithm {algorithm!r} (one of {', '.join(ALGORITHMS)})")


def net_work(net, flops_per_s):
    """One LayerWork per layer of ``net``, in the net's order. Only parameters the net computes
    gradients for (``param_propagate_down``) are allreduced; frozen ones (lr_mult 0) are not."""
    from .flops import layer_costs
    work = []
    for layer, cost in zip(net.layers, layer_costs(net)):
        propagate = list(layer.param_propagate_down) + [False] * len(layer.blobs)
        gradient_bytes = sum(blob.data.nbytes for blob, p in zip(layer.blobs, propagate) if p)
        work.append(LayerWork(cost.name, cost.forward_flops / flops_per_s,
                              cost.backward_flops / flops_per_s, gradient_bytes))
    return work


def gradient_messages(work, bucket_bytes):
    """(ready time after backward starts, bytes) of each allreduce, in the order they are sent."""
    messages, clock, pending_bytes = [], 0.0, 0
    for layer in reversed(work):
        clock += layer.backward_s
        pending_bytes += layer.gradient_bytes
        if pending_bytes and pending_bytes >= bucket_bytes:
            messages.append((clock, pending_bytes))
            pending_bytes = 0
    if pending_bytes:
        messages.append((clock, pending_bytes))
    return messages


def predict(work, batch, nodes, hardware, bucket_bytes=DEFAULT_BUCKET_BYTES):
    """A Prediction per node count (speed-up and efficiency relative to one node)."""
    forward = sum(layer.forward_s for layer in work)
    backward = sum(layer.backward_s for layer in work)
    messages = gradient_messages(work, bucket_bytes)
    single_node_rate = batch / (forward + backward)
    predictions = []
    for p in nodes:
        link_free, communication = 0.0, 0.0
        for ready, nbytes in messages:
            duration = allreduce_time(nbytes, p, hardware.bandwidth, hardware.latency, hardware.algorithm)
            link_free = max(link_free, ready) + duration
            communication += duration
        exposed = max(0.0, link_free - backward)
        iteration = forward + backward + exposed
        rate = batch * p / iteration
        speedup = rate / single_node_rate
        predictions.append(Prediction(
            nodes=p, batch=batch, forward_s=forward, backward_s=backward, iteration_s=iteration,
            no_overlap_s=forward + backward + communication, communication_s=communication,
            exposed_s=exposed, images_per_s=rate, speedup=speedup,
            efficiency=speedup / p))
    return predictions


def hiding_limit(predictions, threshold=DEFAULT_EXPOSED_THRESHOLD):
    """The smallest node count whose exposed communication exceeds ``threshold`` x compute, or None."""
    for prediction in predictions:
        if prediction.exposed_fraction > threshold:
            return prediction.nodes
    return None


def model_net(model, hardware, nodes=DEFAULT_NODES, bucket_bytes=DEFAULT_BUCKET_BYTES, phase=None):
    """Builds ``model`` (a path or NetParameter) at its own batch and predicts it on ``hardware``."""
    from .net import Net
    from .proto import minicaffe_pb2 as pb
    net = Net(model, phase=pb.TRAIN if phase is None else phase)
    try:
        work, batch, name = net_work(net, hardware.flops), net.batch_size(), net.name
    finally:
        net.close()
    return name, work, predict(work, batch, nodes, hardware, bucket_bytes)


# -- command line ---------------------------------------------------------------------------------
def _flag(parser, name, **kwargs):
    parser.add_argument(f"--{name}", f"-{name}", dest=name.replace("-", "_"), **kwargs)


def build_parser():
    parser = argparse.ArgumentParser(prog="minicaffe scale-model", allow_abbrev=False,
                                     description="Predict data-parallel scaling (see minicaffe/scaling.py).")
    _flag(parser, "model", default="", help="the net definition prototxt")
    _flag(parser, "hardware", default="", help="JSON: {flops, bandwidth, latency, algorithm}")
    _flag(parser, "flops", type=float, default=None, help="sustained FLOP/s per node")
    _flag(parser, "bandwidth", type=float, default=None, help="link bandwidth, bytes/s")
    _flag(parser, "latency", type=float, default=None, help="link latency, seconds")
    _flag(parser, "algorithm", default=None, choices=ALGORITHMS, help="allreduce algorithm (default ring)")
    _flag(parser, "nodes", default=",".join(map(str, DEFAULT_NODES)), help="comma-separated node counts")
    _flag(parser, "bucket-bytes", type=int, default=DEFAULT_BUCKET_BYTES,
          help="gradient bucket size in bytes, 0 for one allreduce per layer (default %(default)s)")
    _flag(parser, "exposed-threshold", type=float, default=DEFAULT_EXPOSED_THRESHOLD,
          help="exposed communication, as a fraction of compute, at which it no longer hides "
               "(default %(default)s)")
    _flag(parser, "phase", default="TRAIN", choices=("TRAIN", "TEST"))
    _flag(parser, "json", action="store_true", help="print one JSON object")
    return parser


def read_hardware(args):
    """A Hardware from --hardware's JSON with the flags given on the command line overriding it."""
    entries = {}
    if args.hardware:
        try:
            with open(args.hardware) as f:
                entries = json.load(f)
        except OSError as err:
            raise MinicaffeError(f"--hardware: {args.hardware}: {err.strerror}") from None
        except ValueError as err:
            raise MinicaffeError(f"--hardware: {args.hardware}: not valid JSON: {err}") from None
        if not isinstance(entries, dict):
            raise MinicaffeError(f"--hardware: {args.hardware}: expected a JSON object")
        unknown = set(entries) - {"flops", "bandwidth", "latency", "algorithm"}
        if unknown:
            raise MinicaffeError(f"--hardware: {args.hardware}: unknown entries {', '.join(sorted(unknown))}")
    for field in ("flops", "bandwidth", "latency", "algorithm"):
        if getattr(args, field) is not None:
            entries[field] = getattr(args, field)
    missing = [field for field in ("flops", "bandwidth", "latency") if field not in entries]
    if missing:
        raise MinicaffeError(f"hardware: missing {', '.join(missing)} (give --hardware=HW.json or "
                             f"--{' --'.join(missing)})")
    return Hardware(**entries)


def _node_counts(text):
    try:
        nodes = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise MinicaffeError(f"--nodes: expected comma-separated integers, got {text!r}") from None
    if not nodes or min(nodes) < 1:
        raise MinicaffeError(f"--nodes: node counts must be positive integers, got {text!r}")
    # Speed-up is relative to one node, so one node is always modelled.
    return sorted(set(nodes) | {1})


def _report(name, hardware, predictions, limit, args):
    if args.json:
        return json.dumps({
            "net": name, "batch_per_node": predictions[0].batch, "hardware": dataclasses.asdict(hardware),
            "bucket_bytes": args.bucket_bytes, "exposed_threshold": args.exposed_threshold,
            "hiding_limit_nodes": limit,
            "predictions": [dict(dataclasses.asdict(p), exposed_fraction=p.exposed_fraction)
                            for p in predictions]})
    lines = [f"{name}: batch {predictions[0].batch} per node, {hardware.flops:.3g} FLOP/s per node, "
             f"{hardware.bandwidth:.3g} B/s, {hardware.latency:.3g} s latency, {hardware.algorithm} allreduce, "
             f"buckets of {args.bucket_bytes} B",
             f"{'nodes':>6} {'iter ms':>9} {'no-overlap ms':>13} {'images/s':>10} {'speed-up':>9} "
             f"{'efficiency':>10} {'exposed ms':>10} {'exposed %':>9}"]
    for p in predictions:
        lines.append(f"{p.nodes:>6} {p.iteration_s * 1e3:>9.2f} {p.no_overlap_s * 1e3:>13.2f} "
                     f"{p.images_per_s:>10.1f} {p.speedup:>9.2f} {p.efficiency:>10.3f} "
                     f"{p.exposed_s * 1e3:>10.2f} {100 * p.exposed_fraction:>9.2f}")
    threshold = f"{100 * args.exposed_threshold:g}%"
    lines.append(f"communication no longer hides (exposed > {threshold} of compute) from {limit} nodes"
                 if limit is not None else
                 f"communication stays hidden (exposed <= {threshold} of compute) up to {predictions[-1].nodes} nodes")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not args.model:
            raise MinicaffeError("need a model definition: --model=NET.prototxt")
        if not os.path.isfile(args.model):
            raise MinicaffeError(f"--model: {args.model}: no such file")
        if args.bucket_bytes < 0:
            raise MinicaffeError(f"--bucket-bytes must not be negative, got {args.bucket_bytes}")
        if not args.exposed_threshold >= 0:
            raise MinicaffeError(f"--exposed-threshold must not be negative, got {args.exposed_threshold}")
        nodes = _node_counts(args.nodes)
        hardware = read_hardware(args)
        from .proto import minicaffe_pb2 as pb
        name, _, predictions = model_net(args.model, hardware, nodes, args.bucket_bytes,
                                         pb.TRAIN if args.phase == "TRAIN" else pb.TEST)
        print(_report(name, hardware, predictions, hiding_limit(predictions, args.exposed_threshold), args))
    except MinicaffeError as err:
        print(f"scale-model: error: {err}", file=sys.stderr)
        return 1
    return 0
