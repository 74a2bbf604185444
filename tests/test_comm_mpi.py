"""The communicator under ``mpiexec -n 2``: numerics against one process, bucketed allreduce, the
test phase, and failure. Each test launches ranks with mpiexec (oversubscription allowed) and skips
when mpi4py or mpiexec is missing."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minicaffe.proto import minicaffe_pb2 as pb
from test_solver import TINY_BODY

REPO = Path(__file__).resolve().parents[1]
MPI_DIR = REPO / "tests" / "mpi"


def _mpiexec():
    beside_python = Path(sys.executable).parent / "mpiexec"
    return str(beside_python) if beside_python.exists() else shutil.which("mpiexec")


def _mpi_available():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return _mpiexec() is not None


pytestmark = pytest.mark.skipif(not _mpi_available(), reason="needs mpi4py and mpiexec (pip install '.[mpi]')")


def mpirun(ranks, *args, timeout=120, extra_env=None):
    command = [_mpiexec(), "-n", str(ranks)]
    version = subprocess.run([_mpiexec(), "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        command.append("--oversubscribe")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{MPI_DIR}")
    env.update(extra_env or {})
    return subprocess.run(command + [sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def run_alone(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{MPI_DIR}")
    for name in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        env.pop(name, None)
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def net_text(source, train_batch, test_batch=6, extra_layer=""):
    data = 'transform_param {{ scale: 0.0039 }} data_param {{ source: "{}" batch_size: {} backend: IDX shuffle: true }}'
    return f"""
name: "tiny"
layer {{ name: "d" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }} {data.format(source, train_batch)} }}
layer {{ name: "d" type: "Data" top: "data" top: "label" include {{ phase: TEST }} {data.format(source, test_batch)} }}
{extra_layer}
{TINY_BODY}
layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""


def write_solver(path, net, **fields):
    settings = dict(base_lr=0.1, momentum=0.9, weight_decay=0.001, lr_policy='"fixed"', max_iter=5,
                    random_seed=3, test_iter=4, test_interval=1000, display=0, snapshot_after_train="false")
    settings.update(fields)
    body = "\n".join(f"{k}: {v}" for k, v in settings.items())
    path.write_text(f"net_param {{ {net} }}\n{body}\n")
    return path


def trained(tmp_path, name, ranks, train_batch, solver_fields, *flags):
    out = tmp_path / name
    out.mkdir()
    solver = write_solver(tmp_path / f"{name}.prototxt", net_text(tmp_path.source, train_batch), **solver_fields)
    args = [MPI_DIR / "train_worker.py", solver, out, *flags]
    result = mpirun(ranks, *args) if ranks > 1 else run_alone(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(ranks)]


class DataDir(type(Path())):
    """tmp_path, and the tiny IDX images file in it as ``source``."""
    source = ""


@pytest.fixture
def data_dir(tmp_path, tiny_idx):
    folder = DataDir(tmp_path)
    folder.source = str(tiny_idx)
    return folder


@pytest.mark.parametrize("iter_size, flags", [
    (1, []),
    (2, ["--comm_overlap=forward", "--comm_priority", "--comm_bucket_mb=0"]),
    (1, ["--comm_overlap=none", "--comm_progress=thread"]),
])
def test_two_ranks_at_batch_b_equal_one_process_at_batch_2b(data_dir, iter_size, flags):
    fields = dict(iter_size=iter_size)
    alone = trained(data_dir, "alone", 1, 8, fields)[0]
    ranks = trained(data_dir, "ranks", 2, 4, fields, *flags)
    params = sorted(k for k in alone if k.startswith("param"))
    assert params
    for key in params:
        # Every rank holds the same weights, bit for bit, and they are one process's weights.
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])
        np.testing.assert_allclose(ranks[0][key], alone[key], rtol=2e-5, atol=2e-6, err_msg=key)
    assert not np.allclose(alone["param0"], trained(data_dir, "half", 1, 4, fields)[0]["param0"], atol=1e-6), \
        "training at batch b alone should differ, or the comparison above proves nothing"


def test_test_phase_accuracy_reduced_over_ranks_equals_one_process(data_dir):
    alone = trained(data_dir, "alone", 1, 8, {})[0]
    ranks = trained(data_dir, "ranks", 2, 4, {})
    # Before training the weights are identical, so the accuracy over the same 24 test images is exact.
    assert ranks[0]["initial_accuracy"] == alone["initial_accuracy"]
    assert ranks[1]["initial_accuracy"] == alone["initial_accuracy"]
    np.testing.assert_allclose(ranks[0]["initial_loss"], alone["initial_loss"], rtol=1e-6)
    np.testing.assert_allclose(ranks[0]["final_accuracy"], alone["final_accuracy"], atol=1e-9)


def test_compressed_gradients_send_fewer_bytes_and_still_train(data_dir):
    plain = trained(data_dir, "plain", 2, 4, {})[0]
    for codec, ratio in (("bf16", 0.5), ("int8", 0.26)):
        ranks = trained(data_dir, codec, 2, 4, {}, f"--comm_compress={codec}")
        # A partly filled INT8 block still costs a whole block: allow one per bucket.
        slack = 257 * int(ranks[0]["buckets"])
        assert ranks[0]["bytes_per_iter"] <= ratio * ranks[0]["float32_bytes_per_iter"] + slack
        np.testing.assert_array_equal(ranks[0]["param0"], ranks[1]["param0"])
        np.testing.assert_allclose(ranks[0]["param0"], plain["param0"], atol=0.05)


def test_bucketed_allreduce_odd_sizes_shared_frozen_and_embed():
    result = mpirun(2, MPI_DIR / "allreduce_worker.py")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count(": ok") == 2


@pytest.mark.parametrize("how", ["raise", "hang"])
def test_a_failing_rank_stops_every_rank_quickly(data_dir, how):
    layer = ('layer { name: "fail" type: "Python" bottom: "data" top: "data_checked" '
             f'python_param {{ module: "failing_layer" layer: "FailOnRank" param_str: "1 3 {how}" }} }}')
    net = net_text(data_dir.source, 4, extra_layer=layer).replace('bottom: "data" top: "conv"',
                                                                  'bottom: "data_checked" top: "conv"')
    prefix = data_dir / "snap" / "tiny"
    solver = write_solver(data_dir / "failing.prototxt", net, max_iter=50, snapshot=1,
                          snapshot_prefix=f'"{prefix}"')
    start = time.monotonic()
    result = mpirun(2, REPO / "tools" / "train", f"--solver={solver}", "--comm_timeout=3", timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 30
    if how == "raise":
        assert "rank 1 of 2: train: error:" in result.stderr and "part-1.idx" in result.stderr
    else:
        assert "rank 0 of 2: train: error:" in result.stderr and "did not answer within 3 s" in result.stderr
    # Rank 0 snapshotted after each finished iteration. A write cut short by the abort leaves at most
    # a hidden temporary file; every snapshot under its real name is complete.
    for path in (data_dir / "snap").iterdir():
        if path.name.startswith("."):
            continue
        message = pb.NetParameter() if path.suffix == ".caffemodel" else pb.SolverState()
        message.ParseFromString(path.read_bytes())
        assert path.suffix == ".solverstate" or message.layer, path


def test_tools_train_runs_under_mpiexec_and_only_rank_zero_logs(data_dir):
    prefix = data_dir / "snap" / "tiny"
    solver = write_solver(data_dir / "s.prototxt", net_text(data_dir.source, 4), display=1, max_iter=3,
                          snapshot=3, snapshot_prefix=f'"{prefix}"', test_interval=3)
    result = mpirun(2, REPO / "tools" / "train", f"--solver={solver}", "--comm_stats")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Iteration 1 (") == 1
    assert "Data parallel over 2 ranks" in result.stderr
    assert "overlap fraction" in result.stderr and "conv" in result.stderr
    assert sorted(p.name for p in (data_dir / "snap").iterdir()) == ["tiny_iter_3.caffemodel",
                                                                     "tiny_iter_3.solverstate"]
