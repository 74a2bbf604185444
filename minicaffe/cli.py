"""The command-line verbs, with Caffe's flag names: train, test, time, plus data tools.

    minicaffe train --solver=S [--snapshot=F | --weights=W]
    minicaffe test  --model=M --weights=W --iterations=N
    minicaffe time  --model=M --iterations=N [--json]

``tools/train``, ``tools/test`` and ``tools/time`` are thin wrappers around these. A user error prints
one line and exits with status 1; no traceback.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

from .errors import MinicaffeError

VERBS = ("train", "test", "time", "convert_mnist", "data", "layers", "scale-model")


def _flag(parser, name, **kwargs):
    """Accepts both gflags spellings, ``-name`` and ``--name``, as Caffe's tools do."""
    parser.add_argument(f"--{name}", f"-{name}", dest=name, **kwargs)


def _net_state_flags(parser, default_phase):
    _flag(parser, "phase", default=default_phase, choices=("TRAIN", "TEST"),
          help="network phase (default %(default)s)")
    _flag(parser, "level", type=int, default=0, help="network level")
    _flag(parser, "stage", default="", help="comma-separated network stages")


def _common_flags(parser):
    _flag(parser, "gpu", default=None, help="ignored: minicaffe runs on the CPU")
    _flag(parser, "threads", type=int, default=None,
          help="OpenMP threads for the kernels (default: OMP_NUM_THREADS, else all cores)")


def _precision_flags(parser):
    _flag(parser, "precision", default=None, type=str.upper, choices=("FP32", "BF16", "DFP16"),
          help="arithmetic of Convolution and InnerProduct layers, replacing the net's (and the solver's) "
               "net-level precision; the first Convolution and last InnerProduct stay FP32 unless they set "
               "their own")
    _flag(parser, "debug_info", action="store_true",
          help="print per-layer reduced-precision statistics (exponents, flushed and clipped fractions, "
               "overflow-chunk events)")


def _comm_flags(parser):
    """How gradients are reduced when mpiexec starts several ranks (ignored in a single process)."""
    _flag(parser, "comm_overlap", default="backward", choices=("none", "backward", "forward"),
          help="none: blocking allreduce after backward; backward: each layer's allreduce starts in "
               "backward, waited for just before its update (default); forward: also defer the update "
               "into the next forward (Intel Caffe's FW_OVERLAP_OPT)")
    _flag(parser, "comm_bucket_mb", type=float, default=4.0, help="fuse gradients into buckets of this size")
    _flag(parser, "comm_priority", action="store_true",
          help="send the buckets nearest the input first (one bucket in flight at a time)")
    _flag(parser, "comm_compress", default="none", choices=("none", "bf16", "int8"),
          help="send gradients as BF16, or INT8 blocks of 256 with error feedback")
    _flag(parser, "comm_progress", default="test", choices=("test", "thread"),
          help="how MPI progresses during backward: Test between layers, or a progress thread")
    _flag(parser, "comm_timeout", type=float, default=300.0,
          help="seconds a rank waits for the others before stopping every rank")
    _flag(parser, "comm_stats", action="store_true", help="print per-layer communication statistics")


def _comm_config(args):
    from .comm import CommConfig
    return CommConfig(overlap=args.comm_overlap, bucket_mb=args.comm_bucket_mb, priority=args.comm_priority,
                      compress=args.comm_compress, progress=args.comm_progress, timeout_s=args.comm_timeout,
                      stats=args.comm_stats)


def build_parser(verb):
    parser = argparse.ArgumentParser(prog=f"minicaffe {verb}", allow_abbrev=False)
    _common_flags(parser)
    if verb == "train":
        _flag(parser, "solver", default="", help="the solver definition prototxt")
        _flag(parser, "snapshot", default="", help="a .solverstate to resume training from")
        _flag(parser, "weights", default="",
              help="comma-separated .caffemodel files to initialize from (finetuning)")
        _flag(parser, "sigint_effect", default="stop", choices=("stop", "snapshot", "none"),
              help="what Ctrl-C does during training (default: snapshot, then stop)")
        _flag(parser, "sighup_effect", default="snapshot", choices=("stop", "snapshot", "none"))
        _flag(parser, "level", type=int, default=0)
        _flag(parser, "stage", default="")
        _comm_flags(parser)
        _precision_flags(parser)
    elif verb == "test":
        _flag(parser, "model", default="", help="the net definition prototxt")
        _flag(parser, "weights", default="", help="the .caffemodel to test")
        _flag(parser, "iterations", type=int, default=50, help="number of batches")
        _net_state_flags(parser, "TEST")
    elif verb == "time":
        _flag(parser, "model", default="", help="the net definition prototxt")
        _flag(parser, "iterations", type=int, default=50, help="number of forward-backward passes")
        _flag(parser, "weights", default="", help="optional weights")
        _flag(parser, "json", action="store_true", help="print one JSON object with the timings")
        _net_state_flags(parser, "TRAIN")
        _precision_flags(parser)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        print(f"usage: minicaffe <{'|'.join(VERBS)}> [flags]   (minicaffe <verb> --help for the flags)",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    verb, rest = argv[0], argv[1:]
    if verb in ("convert_mnist", "data"):
        from .data import commands
        return (commands.convert_mnist_main if verb == "convert_mnist" else commands.get_data_main)(rest)
    if verb == "scale-model":
        from .scaling import main as scale_model_main
        return scale_model_main(rest)
    if verb == "layers":
        from .layer import layer_type_list
        print("\n".join(layer_type_list()))
        return 0
    args = build_parser(verb).parse_args(rest)
    try:
        if args.threads:
            from .threads import set_num_threads
            set_num_threads(args.threads)
        return {"train": train, "test": test, "time": time_net}[verb](args)
    except MinicaffeError as err:
        from .comm import stop_all_ranks
        stop_all_ranks(f"{verb}: error: {err}")
        print(f"{verb}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from .comm import stop_all_ranks
        stop_all_ranks(f"{verb}: interrupted")
        print(f"{verb}: interrupted", file=sys.stderr)
        return 130


def _stages(args):
    return [s for s in args.stage.split(",") if s]


def _phase(args):
    from .proto import minicaffe_pb2 as pb
    return pb.TRAIN if args.phase == "TRAIN" else pb.TEST


def _log_cpu_mode(log, args):
    if args.gpu is not None:
        log.warning("--gpu is ignored: minicaffe runs on the CPU")
    log.info("Use CPU.")


def train(args):
    from .log import get_logger
    from .solvers import get_solver
    log = get_logger()
    if not args.solver:
        raise MinicaffeError("need a solver definition to train: --solver=SOLVER.prototxt")
    if args.snapshot and args.weights:
        raise MinicaffeError("give a snapshot to resume training or weights to finetune, but not both")
    if args.snapshot and not os.path.isfile(args.snapshot):
        raise MinicaffeError(f"--snapshot: {args.snapshot}: no such file")
    for path in filter(None, args.weights.split(",")):
        if not os.path.isfile(path):
            raise MinicaffeError(f"--weights: {path}: no such file")
    _log_cpu_mode(log, args)
    from . import prototxt
    solver_param = prototxt.read_solver(args.solver)
    if args.level or args.stage:
        solver_param.train_state.level = args.level
        solver_param.train_state.stage.extend(_stages(args))
    if args.precision:
        from .proto import minicaffe_pb2 as pb
        solver_param.precision = pb.Precision.Value(args.precision)
    if args.debug_info:
        solver_param.debug_info = True
    solver = get_solver(solver_param, source=args.solver, comm_config=_comm_config(args))
    solver.sigint_effect = args.sigint_effect
    solver.sighup_effect = args.sighup_effect
    try:
        for path in filter(None, args.weights.split(",")):
            log.info(f"Finetuning from {path}")
            solver.net.copy_from(path)
        solver.solve(args.snapshot or None)
    finally:
        solver.close()
    return 0


def test(args):
    from .log import fmt, get_logger, output_line
    from .net import Net
    log = get_logger()
    if not args.model:
        raise MinicaffeError("need a model definition to score: --model=NET.prototxt")
    if not args.weights:
        raise MinicaffeError("need model weights to score: --weights=NET.caffemodel")
    _log_cpu_mode(log, args)
    net = Net(args.model, weights=args.weights, phase=_phase(args), level=args.level, stages=_stages(args))
    try:
        log.info(f"Running for {args.iterations} iterations.")
        weights = {top.name: w for top, w in net.loss_terms}
        sums, names = [], []
        loss = 0.0
        for i in range(args.iterations):
            loss += net.forward_layers()
            k = 0
            for name in net.outputs:
                for value in net.blobs[name].data.ravel():
                    if i == 0:
                        sums.append(0.0)
                        names.append(name)
                    sums[k] += float(value)
                    log.info(f"Batch {i}, {name} = {fmt(value)}")
                    k += 1
        loss /= args.iterations
        log.info(f"Loss: {fmt(loss)}")
        for name, total in zip(names, sums):
            mean = total / args.iterations
            w = weights.get(name, 0.0)
            log.info(output_line(name, mean, w))
    finally:
        net.close()
    return 0


def _resident_bytes():
    """The process's resident memory now (Linux /proc), or its peak so far where /proc is absent."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_net(args):
    from .log import get_logger
    from .net import Net
    from .threads import blas_single_threaded, num_threads
    log = get_logger()
    if not args.model:
        raise MinicaffeError("need a model definition to time: --model=NET.prototxt")
    if args.iterations < 1:
        raise MinicaffeError("--iterations must be at least 1")
    _log_cpu_mode(log, args)
    from .proto import minicaffe_pb2 as pb
    # The interpreter and its libraries (~110 MB) are there before any net: the net's own footprint
    # is the peak above this.
    rss_before_net = _resident_bytes()
    net = Net(args.model, weights=args.weights or None, phase=_phase(args), level=args.level,
              stages=_stages(args), precision=args.precision,
              precision_param=pb.PrecisionParameter(precision_stats=True) if args.debug_info else None)
    try:
        log.info("Performing Forward")
        log.info(f"Initial loss: {net.forward_layers()}")
        log.info("Performing Backward")
        net.backward_layers()
        n = len(net.layers)
        forward_ms = [[] for _ in range(n)]
        backward_ms = [[] for _ in range(n)]
        iteration_ms = []
        log.info("*** Benchmark begins ***")
        log.info(f"Testing for {args.iterations} iterations.")
        clock = time.perf_counter
        with blas_single_threaded():
            for j in range(args.iterations):
                start = clock()
                # A fused chain (BatchNorm -> Scale -> ReLU, ...) runs as one kernel: its time goes
                # to its first layer forward and its last backward, the others' rows read 0.
                for first, last, run in net.forward_units():
                    t = clock()
                    run()
                    forward_ms[first].append((clock() - t) * 1e3)
                    for i in range(first + 1, last + 1):
                        forward_ms[i].append(0.0)
                net.seed_loss_diffs()
                for last, first, run in net.backward_units():
                    t = clock()
                    if run is not None:
                        run()
                    backward_ms[last].append((clock() - t) * 1e3)
                    for i in range(first, last):
                        backward_ms[i].append(0.0)
                iteration_ms.append((clock() - start) * 1e3)
                log.info(f"Iteration: {j + 1} forward-backward time: {iteration_ms[-1]:.4g} ms.")
        mean = lambda xs: sum(xs) / len(xs)
        log.info("Average time per layer: ")
        if net.fused_chains:
            log.info(f"{len(net.fused_chains)} fused chains: each timed under its first layer's forward "
                     f"and its last layer's backward")
        for name, f, b in zip(net.layer_names, forward_ms, backward_ms):
            log.info(f"{name:>10}\tforward: {mean(f):.6g} ms.")
            log.info(f"{name:>10}\tbackward: {mean(b):.6g} ms.")
        total_forward = sum(mean(f) for f in forward_ms)
        total_backward = sum(mean(b) for b in backward_ms)
        fb = mean(iteration_ms)
        log.info(f"Average Forward pass: {total_forward:.6g} ms.")
        log.info(f"Average Backward pass: {total_backward:.6g} ms.")
        log.info(f"Average Forward-Backward: {fb:.6g} ms.")
        log.info(f"Total Time: {sum(iteration_ms):.6g} ms.")
        log.info("*** Benchmark ends ***")
        if args.debug_info:
            from .precision import net_stats_lines
            for line in net_stats_lines(net):
                log.info(line)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # What training needs: every blob's data and diff, plus one history buffer per parameter.
        needed = net.blob_bytes() + sum(p.data.nbytes for p in net.learnable_params)
        net_rss = peak_rss - rss_before_net
        log.info(f"Peak resident memory: {peak_rss / 2**20:.1f} MiB, {net_rss / 2**20:.1f} MiB of it above "
                 f"the process before the net was built (blobs, diffs and history: {needed / 2**20:.1f} MiB; "
                 f"ratio {net_rss / max(needed, 1):.2f})")
        if args.json:
            batch = net.batch_size()
            median_fb = statistics.median(iteration_ms)
            print(json.dumps({
                "net": net.name, "batch": batch, "iterations": args.iterations, "threads": num_threads(),
                "precision": args.precision or "net default",
                "forward_ms": total_forward, "backward_ms": total_backward, "forward_backward_ms": fb,
                "forward_backward_ms_median": median_fb,
                "peak_rss_mb": peak_rss / 2**20, "net_rss_mb": net_rss / 2**20, "blob_mb": needed / 2**20,
                "images_per_s": batch / (median_fb / 1e3) if median_fb > 0 else None,
                "layers": [{"name": name, "type": layer.type_name, "forward_ms": mean(f), "backward_ms": mean(b)}
                           for name, layer, f, b in zip(net.layer_names, net.layers, forward_ms, backward_ms)],
            }))
    finally:
        net.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
