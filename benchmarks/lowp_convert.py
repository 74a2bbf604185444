"""Throughput of the low-precision tensor conversions: DFP16 quantize/dequantize and FP32<->BF16.

    PYTHONPATH=. .venv/bin/python benchmarks/lowp_convert.py [--elements 4194304] [--repeats 31]

GB/s counts the bytes read plus written once (quantize: 4 in + 2 out per element; its two passes,
the max|x| scan and the rounding, read x twice, which is not counted). Each thread count times every
kernel interleaved, round after round, and reports the median, so that load from other processes
hits all kernels alike. Both BF16 variants are timed where the CPU has AVX512-BF16.
"""
import argparse
import time

import numpy as np

from minicaffe.kernels import bf16, dfp16
from minicaffe.threads import num_threads, set_num_threads


def kernels(x, q, h, y):
    """(name, bytes moved, call) for every timed conversion."""
    n = x.size
    table = [
        ("dfp16 quantize (nearest)", 6 * n, lambda: dfp16.quantize(x, q)),
        ("dfp16 quantize (stochastic)", 6 * n, lambda: dfp16.quantize(x, q, stochastic=True, seed=1)),
        ("dfp16 dequantize", 6 * n, lambda: dfp16.dequantize(q, -10, y)),
    ]
    for variant in bf16.variants():
        def with_variant(call, variant=variant):
            def run():
                bf16.set_variant(variant)
                call()
            return run
        table.append((f"fp32_to_bf16 [{variant}]", 6 * n, with_variant(lambda: bf16.fp32_to_bf16(x, h))))
        table.append((f"round_to_bf16 [{variant}]", 8 * n, with_variant(lambda: bf16.round_to_bf16(x, y))))
    table.append(("fp32_to_bf16_truncate", 6 * n, lambda: bf16.fp32_to_bf16_truncate(x, h)))
    table.append(("bf16_to_fp32", 6 * n, lambda: bf16.bf16_to_fp32(h, y)))
    return table


def median_seconds(table, repeats):
    times = {name: [] for name, _, _ in table}
    for _ in range(repeats):
        for name, _, call in table:
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=4 << 20)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    x = np.random.default_rng(0).standard_normal(args.elements).astype(np.float32)
    q = np.empty(x.shape, np.int16)
    h = np.empty(x.shape, np.uint16)
    y = np.empty_like(x)
    table = kernels(x, q, h, y)
    for _, _, call in table:  # warm up: page in the outputs, start the thread team
        call()
    default_variant, default_threads = bf16.variant(), num_threads()
    results = {}
    for threads in args.threads:
        set_num_threads(threads)
        results[threads] = median_seconds(table, args.repeats)
    set_num_threads(default_threads)
    bf16.set_variant(default_variant)

    print(f"{args.elements} float32 elements, median of {args.repeats}; GB/s (ms)")
    header = "".join(f"{f'{t} thread' + ('s' if t > 1 else ''):>22}" for t in args.threads)
    print(f"{'kernel':32}{header}")
    for name, moved, _ in table:
        cells = "".join(f"{moved / results[t][name] / 1e9:12.1f} ({results[t][name] * 1e3:6.2f})"
                        for t in args.threads)
        print(f"{name:32}{cells}")


if __name__ == "__main__":
    main()
