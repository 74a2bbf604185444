"""Trains LeNet and the Fashion-MNIST ResNet in FP32 and in DFP16 and/or BF16 and compares them.

``tools/reproduce dfp16|bf16|both`` is the reduced-precision accuracy comparison of issue 5.

Trains LeNet and the Fashion-MNIST ResNet in FP32 and in the low precision with the same solver
file, the same number of iterations and the same seeds (the arms differ only in ``precision``),
tests at regular intervals, and writes into the output directory:

* ``results.md``: final test accuracy of each arm (mean over seeds), its difference to FP32, and
  training images/s (training iterations only, tests excluded);
* ``curves.png``: test accuracy and test loss against iteration (needs matplotlib, the ``plot``
  extra; skipped with a message without it);
* ``curves.json``: the raw curves.

``--update-results`` also splices the table into docs/RESULTS.md between markers. The ResNet's own
schedule (7,000 iterations, about half an hour per arm here) is shortened by default, with its
learning-rate steps scaled to the shorter run; the output says so. ``--full`` runs it as written.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from . import prototxt
from .errors import MinicaffeError
from .log import get_logger
from .proto import minicaffe_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
NETS = {
    "lenet": REPO / "prototxt/lenet/lenet_solver.prototxt",
    "resnet_fmnist": REPO / "prototxt/resnet_fmnist/resnet_fmnist_solver.prototxt",
}
# Iterations each net runs without --full / --iterations (None: the solver's own max_iter).
DEFAULT_ITERATIONS = {"lenet": None, "resnet_fmnist": 1500}
SEED_BASE = 1701


def schedule(solver_param, iterations, test_points):
    """A copy of the solver shortened (or lengthened) to ``iterations``, lr steps and tests scaled alike."""
    p = pb.SolverParameter()
    p.CopyFrom(solver_param)
    factor = iterations / solver_param.max_iter
    p.max_iter = iterations
    if p.stepsize:
        p.stepsize = max(1, round(p.stepsize * factor))
    if p.stepvalue:
        values = [max(1, round(v * factor)) for v in p.stepvalue]
        del p.stepvalue[:]
        p.stepvalue.extend(values)
    p.test_interval = max(1, min(p.test_interval or iterations, -(-iterations // test_points)))
    return p


def run_arm(solver_path, solver_param, precision, seed, log):
    """Trains one arm; returns its curve (iteration, train loss, test accuracy, test loss) and images/s."""
    from .solvers import get_solver
    p = pb.SolverParameter()
    p.CopyFrom(solver_param)
    p.random_seed = seed
    p.precision = pb.Precision.Value(precision)
    p.snapshot = 0
    p.snapshot_after_train = False
    interval, p.test_interval = p.test_interval, 0
    p.display = 0
    solver = get_solver(p, source=str(solver_path))
    curve, train_seconds = [], 0.0
    batch = solver.net.batch_size()
    try:
        while solver.iter < p.max_iter:
            start = time.perf_counter()
            solver.step(min(interval, p.max_iter - solver.iter))
            train_seconds += time.perf_counter() - start
            scores = solver.test_all()[0]
            curve.append({"iteration": solver.iter, "train_loss": solver.smoothed_loss,
                          "accuracy": scores.get("accuracy"), "test_loss": scores.get("loss")})
            log.info(f"reproduce: {precision} seed {seed} iteration {solver.iter}: test accuracy "
                     f"{scores.get('accuracy'):.4f}, test loss {scores.get('loss'):.4f}")
    finally:
        solver.close()
    return curve, batch * p.max_iter / train_seconds


def markdown_table(title, results, notes):
    lines = [f"| net | iterations | arm | seeds | final test accuracy | Δ to FP32 (points) | train images/s |",
             "|---|---|---|---|---|---|---|"]
    for net, arms in results.items():
        fp32 = statistics.mean(run["final_accuracy"] for run in arms["FP32"])
        for arm, runs in arms.items():
            accuracies = [run["final_accuracy"] for run in runs]
            mean = statistics.mean(accuracies)
            spread = f" ± {statistics.stdev(accuracies):.4f}" if len(accuracies) > 1 else ""
            delta = "" if arm == "FP32" else f"{100 * (mean - fp32):+.2f}"
            speed = statistics.median(run["images_per_s"] for run in runs)
            lines.append(f"| {net} | {runs[0]['iterations']} | {arm} | {len(runs)} | {mean:.4f}{spread} | "
                         f"{delta} | {speed:.0f} |")
    return "\n".join([f"### {title} against FP32", "", *notes, "", *lines, ""])


def plot(results, path, log):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("reproduce: matplotlib is not installed (pip install 'minicaffe[plot]'); no PNG written")
        return False
    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.6 * len(results)), squeeze=False)
    for row, (net, arms) in enumerate(results.items()):
        for color, (arm, runs) in enumerate(arms.items()):
            for i, run in enumerate(runs):
                its = [point["iteration"] for point in run["curve"]]
                style = dict(linestyle="-" if arm == "FP32" else "--", color=f"C{color}",
                             label=arm if i == 0 else None)
                axes[row][0].plot(its, [pt["accuracy"] for pt in run["curve"]], **style)
                axes[row][1].plot(its, [pt["test_loss"] for pt in run["curve"]], **style)
        axes[row][0].set_title(f"{net}: test accuracy")
        axes[row][1].set_title(f"{net}: test loss")
        for ax in axes[row]:
            ax.set_xlabel("iteration")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def update_results(markdown, key, title, results_path):
    begin, end = f"<!-- reproduce {key} begin -->", f"<!-- reproduce {key} end -->"
    text = results_path.read_text() if results_path.exists() else "# Results\n"
    block = f"{begin}\n{markdown}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## Reduced precision: {title} (issue 5)\n\n{block}\n"
    results_path.write_text(text)


def build_parser():
    parser = argparse.ArgumentParser(prog="reproduce", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("format", choices=("dfp16", "bf16", "both"),
                        help="the low-precision arm to compare with FP32 (both: DFP16 and BF16 in one run)")
    parser.add_argument("--nets", default="lenet,resnet_fmnist", help="comma-separated: lenet, resnet_fmnist")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per arm (solver random_seed 1701, 1702, ...)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="iterations for every net (lr steps and test interval scaled to it)")
    parser.add_argument("--full", action="store_true", help="run every solver's own schedule in full")
    parser.add_argument("--test-points", type=int, default=10,
                        help="test at least this many times per run (default %(default)s)")
    parser.add_argument("--out", default="reproduce_out", help="output directory (default %(default)s)")
    parser.add_argument("--update-results", action="store_true", help="splice the table into docs/RESULTS.md")
    parser.add_argument("--results-file", default=str(REPO / "docs/RESULTS.md"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help="OpenMP threads")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    log = get_logger()
    try:
        return _reproduce(args, log)
    except MinicaffeError as err:
        print(f"reproduce: error: {err}", file=sys.stderr)
        return 1


def _reproduce(args, log):
    if args.threads:
        from .threads import set_num_threads
        set_num_threads(args.threads)
    formats = ["DFP16", "BF16"] if args.format == "both" else [args.format.upper()]
    title = " and ".join(formats)
    nets = [n for n in args.nets.split(",") if n]
    unknown = [n for n in nets if n not in NETS]
    if unknown or not nets:
        raise MinicaffeError(f"--nets: unknown net(s) {', '.join(unknown) or '(none)'} (known: {', '.join(NETS)})")
    if args.seeds < 1:
        raise MinicaffeError("--seeds must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, notes = {}, []
    for net in nets:
        full = prototxt.read_solver(str(NETS[net]))
        iterations = args.iterations or (None if args.full else DEFAULT_ITERATIONS[net]) or full.max_iter
        solver_param = schedule(full, iterations, max(1, args.test_points))
        if iterations != full.max_iter:
            note = (f"{net}: shortened schedule, {iterations} of the solver's {full.max_iter} iterations "
                    f"(lr steps at {list(solver_param.stepvalue) or solver_param.stepsize or 'the same policy'}); "
                    f"`--full` runs it as written")
            log.info(f"reproduce: {note}")
            notes.append(f"- {note}.")
        arms = results[net] = {arm: [] for arm in ["FP32", *formats]}
        for seed in range(SEED_BASE, SEED_BASE + args.seeds):
            for arm in arms:
                curve, images_per_s = run_arm(NETS[net], solver_param, arm, seed, log)
                arms[arm].append({"seed": seed, "iterations": iterations, "curve": curve,
                                  "final_accuracy": curve[-1]["accuracy"], "images_per_s": images_per_s})
    notes.insert(0, f"`tools/reproduce {args.format} --seeds {args.seeds}"
                    f"{' --iterations ' + str(args.iterations) if args.iterations else ''}"
                    f"{' --full' if args.full else ''}`: the same solver file and seeds for both arms; "
                    f"the first Convolution and the last InnerProduct stay FP32 (the paper's recipe).")
    markdown = markdown_table(title, results, notes)
    (out / "curves.json").write_text(json.dumps(results, indent=1))
    plotted = plot(results, out / "curves.png", log)

    def with_plot(folder):
        """The table, plus the plot linked relative to the markdown file's folder."""
        link = os.path.relpath((out / "curves.png").resolve(), Path(folder).resolve())
        return markdown + (f"\n![{title} vs FP32 curves]({Path(link).as_posix()})\n" if plotted else "")

    (out / "results.md").write_text(with_plot(out))
    print(with_plot(out))
    if args.update_results:
        results_file = Path(args.results_file)
        update_results(with_plot(results_file.parent), args.format, title, results_file)
        log.info(f"reproduce: table written into {results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
