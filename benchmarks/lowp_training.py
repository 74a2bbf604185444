"""End-to-end training throughput in DFP16 and BF16 against FP32, as ratios measured in one run.

For each net (prototxt/<net>/<net>_train_val or _train_test, TRAIN phase, the file's batch) and each
thread count, one SGD solver is built per arm, FP32, DFP16 and BF16, with the solver's `precision`
field as `tools/train --precision=` sets it (the first Convolution and the last InnerProduct stay
FP32). The arms are timed interleaved: each round runs every arm once (a warm-up iteration, then
``--iterations`` timed ones), for ``--rounds`` rounds. A training iteration is the solver's
``step(1)``, as `tools/train` runs it: gradients cleared, forward, backward and the SGD update with
momentum and weight decay on the FP32 master weights (the same in every arm; a learning rate of 1e-9
keeps the weights, and so every arm's work, unchanged in effect). Reported: median images/s per arm
and the ratios to FP32. FP32 is minicaffe's FP32 path, the one `tools/train` uses.

    PYTHONPATH=. python benchmarks/lowp_training.py [--nets lenet,cifar10_quick,alexnet,resnet50]
        [--threads 1,2] [--iterations N] [--rounds R] [--json PATH]
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from minicaffe.proto import minicaffe_pb2 as pb  # noqa: E402
from minicaffe.solvers import get_solver  # noqa: E402
from minicaffe.threads import blas_single_threaded, set_num_threads  # noqa: E402
from throughput import train_val_path  # noqa: E402

DEFAULT_NETS = "lenet,cifar10_quick,alexnet,resnet50"
# Timed iterations per arm and round unless --iterations says otherwise.
DEFAULT_ITERATIONS = {"lenet": 10, "cifar10_quick": 4, "alexnet": 2, "resnet50": 1}
ARMS = ("FP32", "DFP16", "BF16")


def build_solver(path, arm):
    param = pb.SolverParameter(net=str(path), base_lr=1e-9, lr_policy="fixed", momentum=0.9,
                               weight_decay=5e-4, max_iter=10**9, display=0, random_seed=1)
    param.precision = getattr(pb, arm)
    return get_solver(param, source=f"lowp_training {arm}")


def time_arm(solver, iterations):
    solver.step(1)
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        solver.step(1)
        samples.append(time.perf_counter() - start)
    return samples


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", default=DEFAULT_NETS, help=f"comma-separated zoo nets (default {DEFAULT_NETS})")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--iterations", type=int, help="timed iterations per arm per round (default: per net)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    from minicaffe.kernels import lowp_gemm
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"GEMM variants: {lowp_gemm.variant()}")
    header = f"{'net':<14} {'batch':>5} {'thr':>3} " + " ".join(f"{arm + ' img/s':>12}" for arm in ARMS) + \
             f" {'DFP16/FP32':>10} {'BF16/FP32':>10}"
    print(header)
    print("-" * len(header))
    results = []
    for name in [n for n in args.nets.split(",") if n]:
        path = train_val_path(name)
        solvers = {arm: build_solver(path, arm) for arm in ARMS}
        iterations = args.iterations or DEFAULT_ITERATIONS.get(name, 2)
        batch = solvers["FP32"].net.batch_size()
        try:
            for threads in [int(t) for t in args.threads.split(",") if t]:
                set_num_threads(threads)
                samples = {arm: [] for arm in ARMS}
                with blas_single_threaded():
                    for _ in range(args.rounds):
                        for arm in ARMS:
                            samples[arm] += time_arm(solvers[arm], iterations)
                rates = {arm: batch / statistics.median(s) for arm, s in samples.items()}
                row = {"net": name, "batch": batch, "threads": threads, "samples": len(samples["FP32"]),
                       "images_per_s": rates, "dfp16_over_fp32": rates["DFP16"] / rates["FP32"],
                       "bf16_over_fp32": rates["BF16"] / rates["FP32"]}
                results.append(row)
                print(f"{name:<14} {batch:>5} {threads:>3} " + " ".join(f"{rates[a]:>12.1f}" for a in ARMS) +
                      f" {row['dfp16_over_fp32']:>10.2f} {row['bf16_over_fp32']:>10.2f}", flush=True)
        finally:
            for each in solvers.values():
                each.close()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("(medians over interleaved rounds; a training iteration = the solver's step(1): forward, backward, "
          "SGD update)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
