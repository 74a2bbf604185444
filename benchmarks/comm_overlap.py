"""Weak scaling and communication overlap of data-parallel training on this machine.

    PYTHONPATH=. .venv/bin/python benchmarks/comm_overlap.py [--solver S] [--iters N] [--repeats R]

Runs the solver's net for N timed iterations (after 3 warm-up ones) in one process, then under
``mpiexec -n 2`` with the same per-rank batch and one thread per rank, for several communicator
settings, alternating the runs R times; reports the median time per iteration, the weak-scaling
efficiency (time at 1 rank / time at 2 ranks) and the communicator's overlap fraction. A worker run
(``--worker``) prints one JSON line from rank 0.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {
    "overlap (test)": ["--comm_overlap=backward", "--comm_progress=test"],
    "overlap (thread)": ["--comm_overlap=backward", "--comm_progress=thread"],
    "fw-overlap": ["--comm_overlap=forward"],
    "fw-overlap+priority": ["--comm_overlap=forward", "--comm_priority"],
    "no overlap": ["--comm_overlap=none"],
}


def worker(args):
    from minicaffe.comm import CommConfig
    from minicaffe.solvers import get_solver
    config = CommConfig(overlap=args.comm_overlap, progress=args.comm_progress, priority=args.comm_priority,
                        bucket_mb=args.comm_bucket_mb, compress=args.comm_compress)
    solver = get_solver(args.solver, comm_config=config)
    p = solver.param
    p.test_interval, p.display, p.snapshot, p.max_iter = 0, 0, 0, 10 ** 9
    solver.step(3)
    if solver.comm.statistics is not None:
        solver.comm.statistics.reset()
    start = time.perf_counter()
    solver.step(args.iters)
    per_iter = (time.perf_counter() - start) / args.iters
    if solver.dist.rank == 0:
        stats = solver.comm.statistics.summary() if solver.comm.statistics is not None else {}
        stats.pop("layers", None)
        print(json.dumps({"ranks": solver.dist.size, "s_per_iter": per_iter, **stats}), flush=True)
    solver.close()


def run(ranks, solver, iters, flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, __file__, "--worker", "--solver", solver, "--iters", str(iters), *flags]
    if ranks > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        command = [str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec"), "-n", str(ranks)] + command
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--solver", default="prototxt/cifar10_quick/cifar10_quick_solver.prototxt")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--comm_overlap", default="backward")
    parser.add_argument("--comm_progress", default="test")
    parser.add_argument("--comm_priority", action="store_true")
    parser.add_argument("--comm_bucket_mb", type=float, default=4.0)
    parser.add_argument("--comm_compress", default="none")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    names = args.configs.split(",")
    results = {name: [] for name in ["1 rank"] + names}
    for _ in range(args.repeats):
        results["1 rank"].append(run(1, args.solver, args.iters, []))
        for name in names:
            results[name].append(run(2, args.solver, args.iters, CONFIGS[name]))
    base = statistics.median(r["s_per_iter"] for r in results["1 rank"])
    print(f"{args.solver}: {args.iters} iterations x {args.repeats} alternating repeats, 1 thread per rank")
    print(f"{'setting':>22} {'ms/iter':>9} {'efficiency':>10} {'overlap':>8} {'in flight ms':>12} {'exposed ms':>10}")
    for name, runs in results.items():
        t = statistics.median(r["s_per_iter"] for r in runs)
        overlap = statistics.median(r.get("overlap", 0.0) for r in runs)
        n = max(runs[0].get("iterations", 1), 1)
        flight = statistics.median(1e3 * r.get("in_flight_s", 0.0) / n for r in runs)
        exposed = statistics.median(1e3 * r.get("exposed_s", 0.0) / n for r in runs)
        print(f"{name:>22} {1e3 * t:>9.2f} {base / t:>10.3f} {overlap:>8.3f} {flight:>12.3f} {exposed:>10.3f}")


if __name__ == "__main__":
    main()
