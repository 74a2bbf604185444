"""Shared fixtures: small synthetic IDX datasets, the repository paths, running the tools, and the
kernels' thread count."""
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_PROTOTXT = REPO.parent / "shared" / "caffe-prototxt"


def write_idx(path, array, magic):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_idx(tmp_path):
    """50 8x8 images in 4 classes that a small net can tell apart; returns the images file."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=50)
    images = (rng.integers(0, 60, size=(50, 8, 8)) + 40 * labels[:, None, None]).astype(np.uint8)
    write_idx(tmp_path / "tiny-images-idx3-ubyte.gz", images, 0x803)
    write_idx(tmp_path / "tiny-labels-idx1-ubyte.gz", labels, 0x801)
    return tmp_path / "tiny-images-idx3-ubyte.gz"


@pytest.fixture
def threads():
    """Sets the kernels' thread count for one test and restores it afterwards."""
    from minicaffe.kernels import parallel  # here, so that the conftest loads without built kernels
    saved = parallel.num_threads()
    yield parallel.set_num_threads
    parallel.set_num_threads(saved)


def run_tool(tool, *args, cwd=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def batches(layer, tops, n):
    """The next ``n`` batches a data layer produces, copied."""
    out = []
    for _ in range(n):
        layer.forward([], tops)
        out.append(tuple(t.data.copy() for t in tops))
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b):
        for x, y in zip(batch_a, batch_b):
            np.testing.assert_array_equal(x, y)
