"""Training throughput of the zoo nets: time per iteration, images/s, and effective GFLOP/s against sgemm peak.

For each net (prototxt/<net>/<net>_train_val or _train_test, TRAIN phase, at the batch the file sets)
and each thread count, times ``net.forward_backward()`` and reports medians: ms per iteration,
images/s, the net's FLOPs (minicaffe/flops.py: forward + backward) per second, and that as a fraction
of the sgemm peak measured in the same run at the same thread count, before and after the nets, the
higher counting (n=2048; one thread: one SciPy sgemm call; more: ``blas.matmul`` splitting the
product over OpenMP threads with BLAS held at one thread, as the kernels run it). When PyTorch is
installed, the same graph (benchmarks/torch_reference.py) is timed too, for a full training step
(forward, loss, backward, SGD with momentum), and the ratio minicaffe / PyTorch images/s is printed; minicaffe's time has no
weight update in it, which favours minicaffe by that (small, memory-bound) step. PyTorch runs in a
child process (benchmarks/torch_step.py) with the environment this script was started with, so that
the OpenMP and BLAS settings minicaffe makes for itself on import do not reach PyTorch's runtime.
BVLC Caffe's times from the FP32-speed issue (``caffe time`` with OpenBLAS on this kind of machine,
the fastest of each quoted range) are printed beside them as a fixed anchor, with the ratio
minicaffe / Caffe images/s. The load average is printed at start and end: on a shared machine the
timings mean little when it is high.

    PYTHONPATH=. python benchmarks/throughput.py [--nets lenet,alexnet | --nets all] [--threads 1,2]
        [--iterations N] [--warmup N] [--json PATH]
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Before minicaffe adds its settings: what PyTorch's child process gets.
USER_ENVIRONMENT = dict(os.environ)

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from minicaffe import Net, TRAIN  # noqa: E402
from minicaffe.cpu import native_library_choices  # noqa: E402
from minicaffe.flops import net_flops  # noqa: E402
from minicaffe.threads import blas_single_threaded, set_num_threads  # noqa: E402

DEFAULT_NETS = "lenet,cifar10_quick,cifar10_full,resnet_fmnist,alexnet"
# Timed iterations per net unless --iterations says otherwise: fewer for the big nets, so that the
# default run stays within about ten minutes on two cores.
DEFAULT_ITERATIONS = {"lenet": 20, "cifar10_quick": 10, "cifar10_full": 5, "resnet_fmnist": 5,
                      "alexnet": 3, "caffenet": 3, "googlenet": 3, "vgg16": 2, "resnet50": 2}
PEAK_N = 2048
ZOO = "lenet,cifar10_quick,cifar10_full,resnet_fmnist,alexnet,caffenet,googlenet,vgg16,resnet50"
# ms per training iteration of BVLC Caffe (OpenBLAS, 2-core machine), {net: {threads: ms}}, at the
# batch each prototxt sets; where the issue quotes a range, its fastest end.
CAFFE_MS = {"lenet": {1: 21, 2: 23}, "cifar10_quick": {1: 171, 2: 145}, "alexnet": {1: 1127, 2: 762},
            "googlenet": {1: 1571, 2: 1044}, "resnet50": {1: 3396, 2: 2451}, "vgg16": {1: 5034, 2: 3368}}


def train_val_path(name):
    folder = REPO / "prototxt" / name
    for suffix in ("train_val", "train_test"):
        path = folder / f"{name}_{suffix}.prototxt"
        if path.exists():
            return path
    raise SystemExit(f"{folder} has no {name}_train_val.prototxt or {name}_train_test.prototxt")


def median_seconds(step, iterations, warmup):
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def sgemm_peak_gflops(threads, repeats=5):
    """GFLOP/s of a 2048^3 single-precision product at ``threads`` (median of ``repeats``)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((PEAK_N, PEAK_N), dtype=np.float32)
    b = rng.standard_normal((PEAK_N, PEAK_N), dtype=np.float32)
    if threads == 1:
        from scipy.linalg import blas as scipy_blas
        a, b = np.asfortranarray(a), np.asfortranarray(b)
        step = lambda: scipy_blas.sgemm(1.0, a, b)  # noqa: E731
    else:
        from minicaffe.kernels import blas
        c = np.empty((PEAK_N, PEAK_N), np.float32)
        step = lambda: blas.matmul(a, b, c)  # noqa: E731
    set_num_threads(threads)
    with blas_single_threaded():
        seconds = median_seconds(step, repeats, warmup=1)
    return 2 * PEAK_N ** 3 / seconds / 1e9


def time_minicaffe(net, iterations, warmup):
    with blas_single_threaded():
        return median_seconds(net.forward_backward, iterations, warmup)


def time_torch(name, threads, iterations, warmup):
    """PyTorch's median seconds per training step, from benchmarks/torch_step.py in a child process."""
    env = dict(USER_ENVIRONMENT, PYTHONPATH=os.pathsep.join(
        [str(REPO), str(REPO / "benchmarks")] + [p for p in [USER_ENVIRONMENT.get("PYTHONPATH")] if p]))
    command = [sys.executable, str(REPO / "benchmarks" / "torch_step.py"), name, "--threads", str(threads),
               "--iterations", str(iterations), "--warmup", str(warmup)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"benchmarks/torch_step.py {name} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])["median_ms"] / 1e3


def torch_available():
    return importlib.util.find_spec("torch") is not None


def load_average():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", default=DEFAULT_NETS,
                        help=f"comma-separated zoo nets, or 'all' for the whole zoo (default {DEFAULT_NETS})")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--iterations", type=int, help="timed iterations per net (default: per net, 2-20)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    nets = [n for n in (ZOO if args.nets == "all" else args.nets).split(",") if n]
    thread_counts = [int(t) for t in args.threads.split(",") if t]
    with_torch = torch_available()

    native = native_library_choices()
    print(f"load average at start: {load_average()}  (cores: {len(os.sched_getaffinity(0))}; "
          f"PyTorch: {'yes, in a child process' if with_torch else 'not importable, skipped'}; "
          f"minicaffe's OpenMP wait: {native['openmp_wait']}; OpenBLAS core type: {native['openblas_coretype']})")
    # The peak is measured again after the nets and the higher kept: a moment of load elsewhere on a
    # shared machine must not lower the yardstick (which would flatter the nets' share of it).
    peaks = {t: sgemm_peak_gflops(t) for t in thread_counts}
    for t, peak in peaks.items():
        print(f"sgemm n={PEAK_N} peak at {t} thread(s), before the nets: {peak:.1f} GFLOP/s")
    header = (f"{'net':<14} {'batch':>5} {'thr':>3} {'GFLOP/it':>9} {'ms/iter':>9} {'img/s':>8} {'GFLOP/s':>8} "
              f"{'of peak':>7} {'caffe ms':>8} {'mc/caffe':>8}"
              + (f" {'torch ms':>9} {'torch img/s':>11} {'mc/torch':>8}" if with_torch else ""))
    print(header)
    print("-" * len(header))
    results = []
    for name in nets:
        iterations = args.iterations or DEFAULT_ITERATIONS.get(name, 3)
        net = Net(str(train_val_path(name)), phase=TRAIN)
        try:
            cost = net_flops(net)
            for threads in thread_counts:
                set_num_threads(threads)
                seconds = time_minicaffe(net, iterations, args.warmup)
                gflops = cost.total_flops / seconds / 1e9
                row = {"net": name, "batch": cost.batch, "threads": threads, "iterations": iterations,
                       "flops_per_iteration": cost.total_flops, "forward_flops": cost.forward_flops,
                       "median_ms": seconds * 1e3, "images_per_s": cost.batch / seconds,
                       "gflops_per_s": gflops, "sgemm_peak_gflops": peaks[threads],
                       "fraction_of_peak": gflops / peaks[threads]}
                line = (f"{name:<14} {cost.batch:>5} {threads:>3} {cost.total_flops / 1e9:>9.3f} "
                        f"{row['median_ms']:>9.1f} {row['images_per_s']:>8.1f} {gflops:>8.1f} "
                        f"{row['fraction_of_peak']:>7.0%}")
                caffe_ms = CAFFE_MS.get(name, {}).get(threads)
                if caffe_ms:
                    row.update(caffe_ms=caffe_ms, minicaffe_over_caffe=caffe_ms / row["median_ms"])
                    line += f" {caffe_ms:>8} {row['minicaffe_over_caffe']:>8.2f}"
                else:
                    line += f" {'-':>8} {'-':>8}"
                if with_torch:
                    torch_seconds = time_torch(name, threads, iterations, args.warmup)
                    row.update(torch_median_ms=torch_seconds * 1e3, torch_images_per_s=cost.batch / torch_seconds,
                               minicaffe_over_torch=torch_seconds / seconds)
                    line += (f" {row['torch_median_ms']:>9.1f} {row['torch_images_per_s']:>11.1f} "
                             f"{row['minicaffe_over_torch']:>8.2f}")
                print(line, flush=True)
                results.append(row)
        finally:
            net.close()
    for t in thread_counts:
        again = sgemm_peak_gflops(t)
        print(f"sgemm n={PEAK_N} peak at {t} thread(s), after the nets: {again:.1f} GFLOP/s")
        if again > peaks[t]:
            for row in results:
                if row["threads"] == t:
                    row.update(sgemm_peak_gflops=again, fraction_of_peak=row["gflops_per_s"] / again)
            peaks[t] = again
    print("share of the peak, against the higher of the two measurements: "
          + ", ".join(f"{r['net']} {r['threads']}t {r['fraction_of_peak']:.0%}" for r in results))
    print(f"load average at end: {load_average()}")
    print("(medians; GFLOP/it = forward + backward FLOPs of one iteration, minicaffe/flops.py; "
          "PyTorch's step includes an SGD update, minicaffe's does not; caffe ms: the issue's anchors)")
    if args.json:
        args.json.write_text(json.dumps({"peaks_gflops": {str(t): p for t, p in peaks.items()},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
