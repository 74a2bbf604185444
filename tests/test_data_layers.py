"""Input, DummyData and Data layers: shapes, sources, determinism, resuming, sharding, error lines."""
import gzip
import os
import struct

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import rng
from minicaffe.blob import Blob
from minicaffe.data import datasets
from minicaffe.data.commands import convert_mnist_main
from minicaffe.data.lmdb_db import LmdbWriter, array_to_datum
from minicaffe.errors import DataError, LayerError, MinicaffeError
from minicaffe.layer import create_layer
from minicaffe.proto import minicaffe_pb2 as pb
from conftest import assert_same_batches, batches

COUNT = 10  # records in the synthetic set: small so that batches cross epoch boundaries


def write_idx(path, array, magic):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())
    return path


@pytest.fixture
def idx_images(tmp_path):
    """COUNT 6x5 images; image i has label i, so a label tells which record it came from."""
    images = np.random.default_rng(0).integers(0, 256, size=(COUNT, 6, 5)).astype(np.uint8)
    write_idx(tmp_path / "set-labels-idx1-ubyte.gz", np.arange(COUNT), 0x801)
    return write_idx(tmp_path / "set-images-idx3-ubyte.gz", images, 0x803), images


def make_layer(text, phase=pb.TRAIN, num_tops=2, seed=7):
    param = text_format.Parse(text, pb.LayerParameter())
    layer = create_layer(param, phase)
    tops = [Blob(name=f"top{i}") for i in range(num_tops)]
    rng.set_seed(seed)
    layer.layer_setup([], tops)
    return layer, tops


def data_layer(source, extra="", transform="", phase=pb.TRAIN, num_tops=2, seed=7, batch_size=4):
    return make_layer(f'name: "data" type: "Data" data_param {{ source: "{source}" batch_size: {batch_size} '
                      f'{extra} }} transform_param {{ {transform} }}', phase, num_tops, seed)


# -- Input and DummyData -----------------------------------------------------------------------------
def test_input_shapes():
    _, tops = make_layer('name: "in" type: "Input" input_param { shape { dim: 2 dim: 3 } }', num_tops=2)
    assert [t.shape for t in tops] == [(2, 3), (2, 3)]
    layer, tops = make_layer('name: "in" type: "Input" input_param { shape { dim: 2 dim: 3 } '
                             'shape { dim: 5 } }', num_tops=2)
    assert [t.shape for t in tops] == [(2, 3), (5,)]
    tops[0].reshape((7, 3))  # the caller's reshape survives the net's reshape pass
    layer.reshape([], tops)
    assert tops[0].shape == (7, 3)
    with pytest.raises(LayerError, match=r"layer 'in' \(Input\): input_param has 2 shapes for 3 tops"):
        make_layer('name: "in" type: "Input" input_param { shape { dim: 1 } shape { dim: 2 } }', num_tops=3)


def test_dummy_data_shapes_and_fills():
    layer, tops = make_layer('name: "d" type: "DummyData" dummy_data_param { shape { dim: 2 dim: 3 } '
                             'shape { dim: 4 } data_filler { type: "constant" value: 1.5 } '
                             'data_filler { type: "gaussian" std: 1 } }', num_tops=2)
    assert [t.shape for t in tops] == [(2, 3), (4,)]
    layer.forward([], tops)
    np.testing.assert_array_equal(tops[0].data, 1.5)
    first = tops[1].data.copy()
    assert first.std() > 0
    tops[0].data[...] = 9  # constant tops are filled once, as in Caffe
    layer.forward([], tops)
    np.testing.assert_array_equal(tops[0].data, 9)
    assert not np.array_equal(tops[1].data, first)  # non-constant tops are refilled

    _, tops = make_layer('name: "d" type: "DummyData" dummy_data_param { num: 2 channels: 3 channels: 1 '
                         'height: 4 width: 5 }', num_tops=2)
    assert [t.shape for t in tops] == [(2, 3, 4, 5), (2, 1, 4, 5)]
    np.testing.assert_array_equal(tops[0].data, 0)  # no filler: constant 0


@pytest.mark.parametrize("param, message", [
    ('shape { dim: 1 } num: 1 channels: 1 height: 1 width: 1', "either shape or num/channels/height/width"),
    ('num: 1 channels: 1 height: 1', "dummy_data_param.width has 0 values for 2 tops"),
    ('shape { dim: 1 } shape { dim: 1 } shape { dim: 1 }', "has 3 shapes for 2 tops"),
    ('shape { dim: 1 } data_filler {} data_filler {} data_filler {}', "has 3 data_filler for 2 tops"),
    ('shape { dim: 1 dim: -2 }', "negative dimension in shape (1, -2)"),
])
def test_dummy_data_errors(param, message):
    with pytest.raises(LayerError) as excinfo:
        make_layer(f'name: "d" type: "DummyData" dummy_data_param {{ {param} }}', num_tops=2)
    assert str(excinfo.value).startswith("layer 'd' (DummyData): ") and message in str(excinfo.value)


# -- Data: sources -----------------------------------------------------------------------------------
def test_idx_source_sequential_with_scale(idx_images):
    path, images = idx_images
    layer, tops = data_layer(path, transform="scale: 0.5", phase=pb.TEST)
    assert tops[0].shape == (4, 1, 6, 5) and tops[1].shape == (4,)
    got = batches(layer, tops, 3)
    expected_records = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]  # wraps around, as Caffe
    for (data, labels), records in zip(got, expected_records):
        np.testing.assert_array_equal(labels, records)
        np.testing.assert_array_equal(data[:, 0], images[records] * np.float32(0.5))
    assert layer.position == 3
    layer.close()


def test_lmdb_source_gives_the_same_batches_as_idx(tmp_path, idx_images):
    path, _ = idx_images
    db = tmp_path / "set_lmdb"
    assert convert_mnist_main([str(path), str(path).replace("images-idx3", "labels-idx1"), str(db)]) == 0
    transform = "crop_size: 4 mirror: true scale: 0.1 mean_value: 3"
    from_idx = batches(*data_layer(path, "shuffle: true", transform), 6)
    from_lmdb = batches(*data_layer(db, "shuffle: true", transform), 6)
    from_explicit = batches(*data_layer(db, "shuffle: true backend: LMDB", transform), 6)
    assert_same_batches(from_idx, from_lmdb)
    assert_same_batches(from_idx, from_explicit)


def test_float_lmdb_and_label_source(tmp_path):
    with LmdbWriter(tmp_path / "f") as writer:
        for i in range(3):
            writer.put_datum(b"%d" % i, array_to_datum(np.full((2, 1, 1), i / 4, np.float32), 10 + i))
    layer, tops = data_layer(tmp_path / "f", batch_size=2)
    layer.forward([], tops)
    np.testing.assert_array_equal(tops[0].data.ravel(), [0, 0, 0.25, 0.25])
    np.testing.assert_array_equal(tops[1].data, [10, 11])

    images = np.arange(2 * 3 * 3).reshape(2, 3, 3)
    write_idx(tmp_path / "pics.gz", images, 0x803)
    write_idx(tmp_path / "tags.gz", np.array([5, 6]), 0x801)
    layer, tops = data_layer(tmp_path / "pics.gz", 'backend: IDX label_source: "%s"' % (tmp_path / "tags.gz"),
                             batch_size=2, num_tops=1)
    layer.forward([], tops)
    np.testing.assert_array_equal(tops[0].data[:, 0], images)


def test_dataset_reference_source(tmp_path, monkeypatch, idx_images):
    path, images = idx_images
    spec = datasets.DatasetSpec(name="tiny", mirrors=(), image_size=(6, 5),
                                splits=(("train", path.name, path.name.replace("images-idx3", "labels-idx1"),
                                         COUNT),))
    monkeypatch.setitem(datasets.DATASETS, "tiny", spec)
    monkeypatch.setenv("MINICAFFE_DATA", str(path.parent))
    layer, tops = data_layer("tiny:train", phase=pb.TEST)
    layer.forward([], tops)
    np.testing.assert_array_equal(tops[0].data[:, 0], images[:4])

    monkeypatch.setenv("MINICAFFE_DATA", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataError) as excinfo:
        data_layer("tiny:train")
    assert str(excinfo.value).startswith("layer 'data' (Data): dataset tiny not found")
    assert "tools/get_data tiny" in str(excinfo.value)


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="no Fashion-MNIST")
def test_fashion_mnist_reference(monkeypatch, tmp_path):
    monkeypatch.delenv("MINICAFFE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    layer, tops = data_layer("fashion-mnist:test", transform="scale: 0.00390625", batch_size=100)
    layer.forward([], tops)
    assert tops[0].shape == (100, 1, 28, 28) and 0 <= tops[0].data.min() and tops[0].data.max() <= 1
    assert set(tops[1].data) <= set(range(10))


# -- Data: determinism, resuming, sharding -----------------------------------------------------------
SHUFFLED = ("shuffle: true rand_skip: 5", "crop_size: 3 mirror: true mean_value: 100 scale: 0.5")


@pytest.mark.parametrize("prefetch", [0, 4])
def test_same_seed_same_batches_and_set_position(idx_images, prefetch):
    path, _ = idx_images
    extra = f"{SHUFFLED[0]} prefetch: {prefetch}"
    # 4 records per batch, 10 per epoch: batches 2, 4, 7 straddle epoch boundaries.
    stream = batches(*data_layer(path, extra, SHUFFLED[1]), 8)
    assert_same_batches(stream, batches(*data_layer(path, extra, SHUFFLED[1]), 8))
    other_seed = batches(*data_layer(path, extra, SHUFFLED[1], seed=8), 8)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(stream, other_seed))

    layer, tops = data_layer(path, extra, SHUFFLED[1])
    batches(layer, tops, 1)
    for start in (5, 2, 0, 6):
        layer.set_position(start)
        assert layer.position == start
        assert_same_batches(batches(layer, tops, 2), stream[start:start + 2])
    layer.close()


def test_each_batch_is_augmented_afresh(idx_images):
    path, _ = idx_images
    layer, tops = data_layer(path, transform=SHUFFLED[1], batch_size=COUNT)
    first, second = batches(layer, tops, 2)
    np.testing.assert_array_equal(first[1], second[1])  # the same records...
    assert not np.array_equal(first[0], second[0])  # ...cropped and flipped differently


def test_shuffle_visits_every_record_once_per_epoch(idx_images):
    path, _ = idx_images
    layer, tops = data_layer(path, "shuffle: true", batch_size=5)
    labels = np.concatenate([b[1] for b in batches(layer, tops, 6)]).astype(int)
    epochs = labels.reshape(3, COUNT)
    for epoch in epochs:
        assert sorted(epoch) == list(range(COUNT))
    assert not np.array_equal(epochs[0], epochs[1])


def test_shards_make_up_the_global_batch(idx_images):
    path, _ = idx_images
    whole = batches(*data_layer(path, SHUFFLED[0], SHUFFLED[1], batch_size=6), 4)
    shards = []
    for rank in range(3):
        layer, tops = data_layer(path, SHUFFLED[0], SHUFFLED[1], batch_size=2)
        layer.set_shard(rank, 3)
        shards.append(batches(layer, tops, 4))
    for b in range(4):  # records and their augmentation, as one process with the global batch
        np.testing.assert_array_equal(np.concatenate([shard[b][1] for shard in shards]), whole[b][1])
        np.testing.assert_array_equal(np.concatenate([shard[b][0] for shard in shards]), whole[b][0])


def test_shards_are_disjoint(idx_images):
    path, _ = idx_images
    shards = []
    for rank in range(5):  # a global batch of 5 x 2 = one epoch of shuffled records
        layer, tops = data_layer(path, "shuffle: true", batch_size=2)
        layer.set_shard(rank, 5)
        shards.append([labels for _, labels in batches(layer, tops, 3)])
    for b in range(3):
        assert sorted(np.concatenate([shard[b] for shard in shards]).tolist()) == list(range(COUNT))

    layer, tops = data_layer(path, batch_size=2, seed=1)
    layer.set_shard(1, 2, seed=99)
    reference, ref_tops = data_layer(path, batch_size=2, seed=2)
    reference.set_shard(1, 2, seed=99)
    assert_same_batches(batches(layer, tops, 3), batches(reference, ref_tops, 3))
    with pytest.raises(LayerError, match="shard 2 of 2 does not exist"):
        layer.set_shard(2, 2)


def test_error_in_the_prefetch_thread_reaches_forward(tmp_path):
    with LmdbWriter(tmp_path / "db") as writer:
        for i in range(8):
            shape = (1, 2, 2) if i != 5 else (1, 3, 3)
            writer.put_datum(b"%08d" % i, array_to_datum(np.zeros(shape, np.uint8), i))
    layer, tops = data_layer(tmp_path / "db")
    layer.forward([], tops)
    with pytest.raises(DataError, match="record b'00000005' is uint8 \\(1, 3, 3\\)"):
        layer.forward([], tops)
    layer.close()


# -- Data: error lines -------------------------------------------------------------------------------
def data_error(source, extra="", transform="", **kwargs):
    with pytest.raises(MinicaffeError) as excinfo:
        data_layer(source, extra, transform, **kwargs)
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith("layer 'data' (Data): ")
    return message.removeprefix("layer 'data' (Data): "), excinfo.type


def test_data_layer_error_lines(tmp_path, idx_images):
    path, _ = idx_images
    message, kind = data_error("no/such_lmdb")
    assert kind is DataError
    assert message == f"data_param.source 'no/such_lmdb': no such file or directory " \
                      f"({os.path.abspath('no/such_lmdb')})"
    assert data_error(path, "backend: LEVELDB")[0] == (
        "LEVELDB is not supported; convert the data to LMDB (tools/convert_mnist IMAGES LABELS OUTPUT_DB "
        "--backend=lmdb)")
    (tmp_path / "leveldb").mkdir()
    (tmp_path / "leveldb" / "CURRENT").write_text("MANIFEST-000001\n")
    assert "looks like a LevelDB database; LEVELDB is not supported" in data_error(tmp_path / "leveldb")[0]
    labels = str(path).replace("images-idx3", "labels-idx1")
    assert "is an IDX labels file; name the images file there" in data_error(labels)[0]
    (tmp_path / "notes.txt").write_text("hello")
    assert "is neither an LMDB directory, an IDX images file nor a dataset reference" \
        in data_error(tmp_path / "notes.txt")[0]
    os.rename(labels, labels + ".moved")
    assert data_error(path)[0] == f"{labels}: no such file"
    write_idx(tmp_path / "plain.gz", np.zeros((2, 2, 2)), 0x803)
    assert "set data_param.label_source" in data_error(tmp_path / "plain.gz")[0]
    assert "crop_size 9 is larger than the input images (6x5)" in data_error(
        path, f'label_source: "{labels}.moved"', "crop_size: 9")[0]
    assert data_error(path, batch_size=0)[0] == "data_param.batch_size must be set to a positive number"
    assert data_error("nope:train")[0].startswith("unknown dataset 'nope'")
    assert data_error("")[0] == "data_param.source is not set"
