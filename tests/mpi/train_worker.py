"""Trains a solver in this process (one rank of mpiexec, or alone) and saves what the tests compare.

    train_worker.py SOLVER OUT_DIR [--comm_overlap=...] [--comm_bucket_mb=...] [--comm_priority]
                                   [--comm_progress=...] [--comm_compress=...]

Writes OUT_DIR/rank<r>.npz: the learnable parameters after training, plus the test scores measured
before training (``initial_<output>``) and after (``final_<output>``).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from minicaffe.comm import CommConfig  # noqa: E402
from minicaffe.solvers import get_solver  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("solver")
    parser.add_argument("out")
    parser.add_argument("--comm_overlap", default="backward")
    parser.add_argument("--comm_bucket_mb", type=float, default=4.0)
    parser.add_argument("--comm_priority", action="store_true")
    parser.add_argument("--comm_progress", default="test")
    parser.add_argument("--comm_compress", default="none")
    args = parser.parse_args()
    config = CommConfig(overlap=args.comm_overlap, bucket_mb=args.comm_bucket_mb, priority=args.comm_priority,
                        progress=args.comm_progress, compress=args.comm_compress, timeout_s=60)
    solver = get_solver(args.solver, comm_config=config)
    try:
        initial = solver.test_all()[0] if solver.test_nets else {}
        solver.solve()
        final = solver.test_all()[0] if solver.test_nets else {}
        arrays = {f"param{i}": blob.data.copy() for i, blob in enumerate(solver.net.learnable_params)}
        arrays.update({f"initial_{k}": np.asarray(v) for k, v in initial.items()})
        arrays.update({f"final_{k}": np.asarray(v) for k, v in final.items()})
        if solver.comm.statistics is not None:
            summary = solver.comm.statistics.summary()
            arrays["bytes_per_iter"] = np.asarray(summary["bytes_per_iter"])
            arrays["float32_bytes_per_iter"] = np.asarray(summary["float32_bytes_per_iter"])
            arrays["buckets"] = np.asarray(len(solver.comm.buckets))
        np.savez(os.path.join(args.out, f"rank{solver.dist.rank}.npz"), **arrays)
    finally:
        solver.close()


if __name__ == "__main__":
    main()
