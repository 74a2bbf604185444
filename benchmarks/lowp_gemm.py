"""Low-precision GEMM throughput: INT16 (DFP16) and BF16 against FP32 sgemm, at the zoo's convolution shapes.

For each net, the forward GEMM of every convolution (per group): M = output channels, K = input
channels x kernel area, N = output height x width x ``--batch`` images, read from the net built from
prototxt/<net>/<net>_deploy.prototxt (shapes that repeat are timed once and weighted by their
count). Each shape is timed for
  * INT16: ``lowp_gemm.gemm_s16`` (INT32 chunks of 256 x kernel area, the DFP16 default),
  * BF16:  ``lowp_gemm.gemm_bf16``,
  * FP32:  ``blas.matmul`` (SciPy's OpenBLAS sgemm; over OpenMP threads with BLAS at one thread,
    as the layers run it; one thread is one plain sgemm call),
interleaved round by round so that load from other processes hits all three alike; each sample
loops a call for at least --sample-ms, and the median sample is reported, in GOP/s (2 x M x N x K
operations per call), with the ratios INT16/FP32 and BF16/FP32. A net's line is the time-weighted
total over its convolutions (sum of operations / sum of median times). The load average is printed:
on a shared machine the ratios are meaningful, the absolute figures less so when it is high.

``--peak`` first measures the ceiling: the throughput of vpdpwssd, vdpbf16ps and vfmadd231ps (zmm)
with 12 independent accumulators and operands in registers, from a small C loop compiled with the
system compiler, as GOP/s of one core, best of --rounds samples (each INT16/BF16 instruction is 32
multiply-adds, FMA 16).

    PYTHONPATH=. python benchmarks/lowp_gemm.py [--nets lenet,cifar10_quick,alexnet,resnet50]
        [--threads 1,2] [--batch 1] [--rounds 15] [--sample-ms 20] [--peak]
"""
import argparse
import collections
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minicaffe import TEST, Net, prototxt  # noqa: E402
from minicaffe.cpu import cpu_flags  # noqa: E402
from minicaffe.kernels import blas, lowp_gemm  # noqa: E402
from minicaffe.threads import blas_single_threaded, set_num_threads  # noqa: E402

DEFAULT_NETS = "lenet,cifar10_quick,alexnet,resnet50"
DFP16_CHUNK_CHANNELS = 256


def conv_gemm_shapes(name, batch):
    """Counter of (M, N, K, k_chunk) over the forward GEMMs of ``name``'s convolutions, one image."""
    parsed = prototxt.read_net(REPO / "prototxt" / name / f"{name}_deploy.prototxt")
    param = parsed.param
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                shape.dim[0] = 1
    net = Net(param, phase=TEST)
    shapes = collections.Counter()
    for i, layer in enumerate(net.layers):
        if layer.type_name != "Convolution":
            continue
        weight = layer.blobs[0].shape
        group = layer.group
        top = net.top_vecs[i][0].shape
        area = weight[2] * weight[3]
        k_chunk = DFP16_CHUNK_CHANNELS * area
        shapes[(weight[0] // group, top[2] * top[3] * batch, weight[1] * area, k_chunk)] += group
    net.close()
    return shapes


# 12 accumulator chains per loop iteration: enough to cover the instructions' latency (4-6 cycles at
# two per cycle). The empty asm statements hide the operands' values from the compiler and keep the
# results live, so nothing is folded away.
PEAK_SOURCE = r"""
#include <immintrin.h>
#define LOOP(T, INIT, STEP) \
    T acc[12]; \
    for (int i = 0; i < 12; i++) acc[i] = INIT; \
    for (long it = 0; it < iterations; it++) { \
        _Pragma("GCC unroll 12") for (int i = 0; i < 12; i++) acc[i] = STEP; \
        __asm__ volatile("" :: "v"(acc[0])); \
    } \
    for (int i = 1; i < 12; i++) acc[0] += acc[i]; \
    __asm__ volatile("" :: "v"(acc[0]));
__attribute__((target("avx512f,avx512vnni"))) void dpwssd(long iterations) {
    __m512i a = _mm512_set1_epi32(3), b = _mm512_set1_epi32(5);
    __asm__ volatile("" : "+v"(a), "+v"(b));
    LOOP(__m512i, _mm512_set1_epi32(i), _mm512_dpwssd_epi32(acc[i], a, b))
}
__attribute__((target("avx512f,avx512bf16"))) void dpbf16ps(long iterations) {
    __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a;
    __asm__ volatile("" : "+v"(a), "+v"(b));
    LOOP(__m512, _mm512_set1_ps(i), _mm512_dpbf16_ps(acc[i], a, b))
}
__attribute__((target("avx512f,fma"))) void fmadd(long iterations) {
    __m512 a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(0.0f);
    __asm__ volatile("" : "+v"(a), "+v"(b));
    LOOP(__m512, _mm512_set1_ps(i), _mm512_fmadd_ps(a, b, acc[i]))
}
"""
# (function, multiply-adds per instruction, the /proc/cpuinfo flag it needs)
PEAK_INSTRUCTIONS = {"vpdpwssd": ("dpwssd", 32, "avx512_vnni"), "vdpbf16ps": ("dpbf16ps", 32, "avx512_bf16"),
                     "vfmadd231ps": ("fmadd", 16, "avx512f")}


def instruction_peaks(rounds):
    """GOP/s of one core per instruction (best of ``rounds`` samples), or None without a compiler."""
    cc = os.environ.get("CC", "cc")
    folder = tempfile.mkdtemp()
    try:
        source, library = os.path.join(folder, "peak.c"), os.path.join(folder, "peak.so")
        with open(source, "w") as f:
            f.write(PEAK_SOURCE)
        if subprocess.run([cc, "-O2", "-shared", "-fPIC", source, "-o", library], capture_output=True).returncode:
            return None
        lib = ctypes.CDLL(library)
        iterations = 2_000_000
        peaks = {}
        flags = cpu_flags()
        for name, (function, macs, flag) in PEAK_INSTRUCTIONS.items():
            if flag not in flags:
                continue
            call = getattr(lib, function)
            call.argtypes = [ctypes.c_long]
            samples = []
            for _ in range(rounds):
                start = time.perf_counter()
                call(iterations)
                samples.append(time.perf_counter() - start)
            # The fastest sample: a ceiling, which other processes on the core can only lower.
            peaks[name] = 12 * iterations * macs * 2 / min(samples) / 1e9
        return peaks
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def median_sample_seconds(call, sample_seconds):
    """One sample: mean seconds per call over a loop of at least ``sample_seconds``."""
    calls, start = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= sample_seconds:
            return elapsed / calls


def time_shape(m, n, k, k_chunk, rounds, sample_seconds, rng):
    a16 = rng.integers(-2 ** 13, 2 ** 13, (m, k), dtype=np.int16)
    b16 = rng.integers(-2 ** 13, 2 ** 13, (k, n), dtype=np.int16)
    abf = (rng.standard_normal((m, k), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    bbf = (rng.standard_normal((k, n), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    a32 = rng.standard_normal((m, k), dtype=np.float32)
    b32 = rng.standard_normal((k, n), dtype=np.float32)
    c = np.empty((m, n), np.float32)
    calls = {
        "int16": lambda: lowp_gemm.gemm_s16(a16, b16, c, 2.0 ** -26, k_chunk=k_chunk),
        "bf16": lambda: lowp_gemm.gemm_bf16(abf, bbf, c),
        "fp32": lambda: blas.matmul(a32, b32, c),
    }
    samples = {kind: [] for kind in calls}
    for call in calls.values():
        call()
    for _ in range(rounds):
        for kind, call in calls.items():
            samples[kind].append(median_sample_seconds(call, sample_seconds))
    return {kind: statistics.median(s) for kind, s in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", default=DEFAULT_NETS, help=f"comma-separated zoo nets (default {DEFAULT_NETS})")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--batch", type=int, default=1, help="images side by side in N (default 1, as per-image im2col)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved samples per kernel and shape (default 15)")
    parser.add_argument("--sample-ms", type=float, default=20.0, help="minimum length of one sample (default 20 ms)")
    parser.add_argument("--peak", action="store_true", help="first measure the instructions' own throughput")
    args = parser.parse_args(argv)
    nets = [n for n in args.nets.split(",") if n]
    thread_counts = [int(t) for t in args.threads.split(",") if t]
    rng = np.random.default_rng(0)

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"variants: {lowp_gemm.variant()}; batch {args.batch}")
    if args.peak:
        peaks = instruction_peaks(args.rounds)
        if peaks is None:
            print("instruction peaks: no C compiler with AVX-512 VNNI/BF16 support, skipped")
        elif not peaks:
            print("instruction peaks: this CPU has no AVX-512, skipped")
        else:
            print("instruction peaks, one core: " + ", ".join(f"{k} {v:.0f} GOP/s" for k, v in peaks.items()))
    header = (f"{'net':<14} {'thr':>3} {'M':>5} {'N':>6} {'K':>5} {'x':>3} {'INT16 GOP/s':>11} {'BF16 GOP/s':>10} "
              f"{'FP32 GFLOP/s':>12} {'INT16/FP32':>10} {'BF16/FP32':>9}")
    print(header)
    print("-" * len(header))
    for name in nets:
        shapes = conv_gemm_shapes(name, args.batch)
        for threads in thread_counts:
            set_num_threads(threads)
            totals = collections.Counter()
            with blas_single_threaded():
                for (m, n, k, k_chunk), count in shapes.items():
                    seconds = time_shape(m, n, k, k_chunk, args.rounds, args.sample_ms / 1e3, rng)
                    ops = 2.0 * m * n * k
                    totals["ops"] += ops * count
                    for kind, s in seconds.items():
                        totals[kind] += s * count
                    rate = {kind: ops / s / 1e9 for kind, s in seconds.items()}
                    print(f"{name:<14} {threads:>3} {m:>5} {n:>6} {k:>5} {count:>3} {rate['int16']:>11.1f} "
                          f"{rate['bf16']:>10.1f} {rate['fp32']:>12.1f} {rate['int16'] / rate['fp32']:>10.2f} "
                          f"{rate['bf16'] / rate['fp32']:>9.2f}")
            rate = {kind: totals["ops"] / totals[kind] / 1e9 for kind in ("int16", "bf16", "fp32")}
            print(f"{name + ' (all)':<14} {threads:>3} {'':>5} {'':>6} {'':>5} {'':>3} {rate['int16']:>11.1f} "
                  f"{rate['bf16']:>10.1f} {rate['fp32']:>12.1f} {rate['int16'] / rate['fp32']:>10.2f} "
                  f"{rate['bf16'] / rate['fp32']:>9.2f}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
