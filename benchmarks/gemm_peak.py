"""GEMM and convolution throughput: how close the kernels run to the BLAS's peak on this CPU.

Measures, as medians over repeated runs:
  * sgemm GFLOP/s for n=2048 and for the GEMM shapes of LeNet's and CIFAR-10-quick's convolutions,
    single-threaded (one BLAS call) and split across all cores by ``blas.matmul`` (OpenMP);
  * the forward+backward time of those convolution layers at 1 thread and at all cores.
Each set of measurements runs in a fresh subprocess per OPENBLAS_CORETYPE, because OpenBLAS reads
the variable only when it loads: by default once as the environment has it ("inherit") and once
with SkylakeX (OpenBLAS's AVX-512 kernels). The load average is printed too: on a machine shared
with other jobs, multi-threaded timings are only meaningful when it is low.

    python benchmarks/gemm_peak.py [--repeats N] [--coretypes inherit,SkylakeX,unset]
"""
import argparse
import json
import os
import subprocess
import sys
import time

# (name, M, N, K): C[M, N] = A[M, K] @ B[K, N], the per-image GEMMs of conv_forward.
GEMM_SHAPES = [
    ("square n=2048", 2048, 2048, 2048),
    ("lenet conv2 fwd", 50, 64, 500),
    ("cifar conv1 fwd", 32, 1024, 75),
    ("cifar conv2 fwd", 32, 256, 800),
    ("cifar conv3 fwd", 64, 64, 800),
]

# (net, x shape, w shape, pad, needs dx): the first layer of a net never needs an input gradient.
CONV_LAYERS = [
    ("lenet", (64, 1, 28, 28), (20, 1, 5, 5), (0, 0), False),
    ("lenet", (64, 20, 12, 12), (50, 20, 5, 5), (0, 0), True),
    ("cifar10_quick", (100, 3, 32, 32), (32, 3, 5, 5), (2, 2), False),
    ("cifar10_quick", (100, 32, 16, 16), (32, 32, 5, 5), (2, 2), True),
    ("cifar10_quick", (100, 32, 8, 8), (64, 32, 5, 5), (2, 2), True),
]


def median_seconds(fn, repeats, min_seconds=0.05):
    """Median over ``repeats`` samples; each sample loops fn until it has run for min_seconds/repeats."""
    import numpy as np
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds / repeats or calls < 1:
        fn()
        calls += 1
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    return float(np.median(samples))


def measure(repeats):
    """Runs in the child process: every measurement, returned as a dict."""
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits
    from minicaffe.kernels import blas, conv, parallel

    cores = len(os.sched_getaffinity(0))
    rng = np.random.default_rng(0)
    result = {"blas": [(i["filepath"].rsplit("/", 1)[-1], i.get("architecture")) for i in threadpool_info()],
              "cores": cores, "gemm": [], "conv": []}
    with threadpool_limits(1, "blas"):
        for name, m, n, k in GEMM_SHAPES:
            a = rng.standard_normal((m, k), dtype=np.float32)
            b = rng.standard_normal((k, n), dtype=np.float32)
            c = np.empty((m, n), np.float32)
            row = {"name": name, "shape": [m, n, k]}
            for threads in sorted({1, cores}):
                parallel.set_num_threads(threads)
                seconds = median_seconds(lambda: blas.matmul(a, b, c), repeats)
                row[f"gflops_{threads}t"] = 2 * m * n * k / seconds / 1e9
            result["gemm"].append(row)

        for net, x_shape, w_shape, pad, needs_dx in CONV_LAYERS:
            x = rng.standard_normal(x_shape, dtype=np.float32)
            w = rng.standard_normal(w_shape, dtype=np.float32)
            bias = np.zeros(w_shape[0], np.float32)
            out = [x_shape[i + 2] + 2 * pad[i] - w_shape[i + 2] + 1 for i in range(2)]
            y = np.empty((x_shape[0], w_shape[0], *out), np.float32)
            dy = rng.standard_normal(y.shape, dtype=np.float32)
            dx = np.empty_like(x) if needs_dx else None
            dw, db = np.zeros_like(w), np.zeros_like(bias)
            geometry = (pad, (1, 1), (1, 1), 1)
            row = {"net": net, "x": x_shape, "w": w_shape}
            for threads in sorted({1, cores}):
                parallel.set_num_threads(threads)
                workspace = np.empty(conv.conv_workspace_size(x_shape, w_shape, *geometry, 4), np.float32)
                forward = lambda: conv.conv_forward(x, w, bias, y, *geometry, workspace)
                backward = lambda: conv.conv_backward(x, w, dy, dx, dw, db, *geometry, workspace)
                row[f"forward_ms_{threads}t"] = median_seconds(forward, repeats) * 1e3
                row[f"backward_ms_{threads}t"] = median_seconds(backward, repeats) * 1e3
            result["conv"].append(row)
    return result


def run_child(coretype, repeats):
    """``coretype``: 'inherit' keeps the environment's value, 'unset' lets OpenBLAS detect the CPU."""
    env = dict(os.environ)
    if coretype == "unset":
        env.pop("OPENBLAS_CORETYPE", None)
    elif coretype != "inherit":
        env["OPENBLAS_CORETYPE"] = coretype
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(repeats)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def report(results):
    coretypes = list(results)
    cores = results[coretypes[0]]["cores"]
    thread_counts = sorted({1, cores})
    print(f"# load average {os.getloadavg()[0]:.2f} on {cores} cores; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    for coretype, res in results.items():
        libraries = ", ".join(f"{lib} ({arch})" for lib, arch in res["blas"] if arch)
        shown = coretype
        if coretype == "inherit":
            shown += f" (= {os.environ.get('OPENBLAS_CORETYPE', 'unset')})"
        print(f"# OPENBLAS_CORETYPE {shown}: {libraries}")
    print("\nsgemm GFLOP/s (median)  " + "  ".join(f"{c}:{t}t" for c in coretypes for t in thread_counts))
    for i, (name, m, n, k) in enumerate(GEMM_SHAPES):
        values = [results[c]["gemm"][i][f"gflops_{t}t"] for c in coretypes for t in thread_counts]
        print(f"  {name:16s} {m}x{n}x{k:<5d}" + "".join(f"{v:12.1f}" for v in values))
    print("\nconvolution forward+backward ms (median)")
    totals = {}
    for i, (net, x_shape, w_shape, _, _) in enumerate(CONV_LAYERS):
        cells = []
        for c in coretypes:
            for t in thread_counts:
                row = results[c]["conv"][i]
                ms = row[f"forward_ms_{t}t"] + row[f"backward_ms_{t}t"]
                totals[(net, c, t)] = totals.get((net, c, t), 0.0) + ms
                cells.append(f"{c}:{t}t {row[f'forward_ms_{t}t']:.2f}+{row[f'backward_ms_{t}t']:.2f}")
        print(f"  {net:14s} x{x_shape} w{w_shape}: " + "  ".join(cells))
    for net in dict.fromkeys(n for n, *_ in CONV_LAYERS):
        print(f"  {net} conv layers total: " + "  ".join(
            f"{c}:{t}t {totals[(net, c, t)]:.2f} ms" for c in coretypes for t in thread_counts))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--coretypes", default="inherit,SkylakeX",
                        help="comma-separated OPENBLAS_CORETYPE values; 'inherit' keeps the "
                             "environment's, 'unset' lets OpenBLAS detect the CPU")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.repeats)))
        return
    report({c: run_child(c, args.repeats) for c in args.coretypes.split(",")})


if __name__ == "__main__":
    main()
