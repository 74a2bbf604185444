"""The data path below the layers: IDX files, LMDB Datum databases and convert_mnist, the dataset
lookup and download, the transformer and the record schedule / prefetch thread. No network."""
import gc
import gzip
import io
import os
import struct
import threading

import lmdb
import numpy as np
import pytest

from minicaffe.blob import Blob
from minicaffe.data import datasets, lmdb_db
from minicaffe.data.commands import convert_mnist_main, get_data_main
from minicaffe.data.idx import inspect_file, read_images, read_labels, read_pair
from minicaffe.data.lmdb_db import LmdbReader, LmdbWriter, array_to_datum
from minicaffe.data.prefetch import Prefetcher, RecordSchedule
from minicaffe.data.transformer import DataTransformer
from minicaffe.errors import DataError
from minicaffe.proto import minicaffe_pb2 as pb

SYSTEM_FASHION = "/usr/share/datasets/fashion-mnist"


# -- helpers -----------------------------------------------------------------------------------------
def idx_bytes(array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path, array, magic, compress=True, payload=None):
    data = payload if payload is not None else idx_bytes(array, magic)
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if compress else data)
    return path


def write_pair(directory, count=25, rows=5, cols=4, seed=0, prefix="train", compress=True):
    """Synthetic images (non-square, so rows and columns cannot be swapped unnoticed) and labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    images_path = write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x803, compress)
    labels_path = write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 0x801, compress)
    return images_path, labels_path, images, labels


def single_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# -- IDX ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    images_path, labels_path, images, labels = write_pair(tmp_path, compress=compress)
    read = read_images(images_path)
    assert read.dtype == np.uint8 and read.shape == (25, 1, 5, 4)
    np.testing.assert_array_equal(read[:, 0], images)
    np.testing.assert_array_equal(read_labels(labels_path), labels)
    dataset = read_pair(images_path, labels_path)
    assert dataset.count == 25 and dataset.item_shape == (1, 5, 4)
    assert inspect_file(images_path, "images") == (25, 5, 4)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("damage, expected", [
    (lambda b: b[:-3], "truncated: the header announces 25x5x4 = 500 bytes of data, the file holds 497"),
    (lambda b: b + b"xyz", "trailing bytes"),
    (lambda b: b[:10], "truncated: the file ends inside the dimensions"),
    (lambda b: b[:2], "truncated: the file ends inside the magic number"),
    (lambda b: b"\x00\x00\x0d\x03" + b[4:], "bad magic number 0x00000d03"),
    (lambda b: b"\x00\x00\x08\x01" + b[4:], "is an IDX labels file (magic 0x00000801), expected images"),
])
def test_idx_damaged_images_file(tmp_path, compress, damage, expected):
    images = np.zeros((25, 5, 4), np.uint8)
    path = write_idx(tmp_path / "x-images", None, 0, compress, payload=damage(idx_bytes(images, 0x803)))
    for read in (read_images, lambda p: inspect_file(p, "images")):
        with pytest.raises(DataError) as excinfo:
            read(path)
        message = single_line_error(excinfo)
        assert message.startswith(str(path)) and expected in message


def test_idx_corrupt_gzip_stream(tmp_path):
    compressed = gzip.compress(idx_bytes(np.arange(5000, dtype=np.uint8).reshape(50, 10, 10), 0x803))
    cut = write_idx(tmp_path / "cut.gz", None, 0, compress=False, payload=compressed[:len(compressed) // 2])
    flipped = bytearray(compressed)
    flipped[len(flipped) // 2] ^= 0xFF
    bad = write_idx(tmp_path / "bad.gz", None, 0, compress=False, payload=bytes(flipped))
    for path in (cut, bad):
        with pytest.raises(DataError) as excinfo:
            read_images(path)
        assert str(path) in single_line_error(excinfo)


def test_idx_missing_file_and_count_mismatch(tmp_path):
    with pytest.raises(DataError, match="nope-images: no such file"):
        read_images(tmp_path / "nope-images")
    images_path, _, _, _ = write_pair(tmp_path, count=25)
    _, labels_path, _, _ = write_pair(tmp_path, count=24, prefix="other")
    with pytest.raises(DataError) as excinfo:
        read_pair(images_path, labels_path)
    assert "holds 25 images" in single_line_error(excinfo) and "24 labels" in str(excinfo.value)


@pytest.mark.skipif(not os.path.isdir(SYSTEM_FASHION), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_test_set(monkeypatch, tmp_path):
    monkeypatch.delenv("MINICAFFE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    images, labels = datasets.resolve_reference("fashion-mnist:test")
    assert str(images).startswith(SYSTEM_FASHION)
    dataset = read_pair(images, labels)
    assert dataset.images.shape == (10000, 1, 28, 28)
    assert dataset.labels.min() == 0 and dataset.labels.max() == 9
    np.testing.assert_array_equal(np.bincount(dataset.labels), [1000] * 10)


# -- LMDB and convert_mnist --------------------------------------------------------------------------
def datum_wire_bytes(channels, height, width, data, label):
    """A Datum encoded by hand, fields in number order as Caffe's C++ serializer writes them."""
    def varint(n):
        out = b""
        while True:
            byte, n = n & 0x7F, n >> 7
            out += bytes([byte | (0x80 if n else 0)])
            if not n:
                return out
    return (b"\x08" + varint(channels) + b"\x10" + varint(height) + b"\x18" + varint(width)
            + b"\x22" + varint(len(data)) + data + b"\x28" + varint(label))


def test_convert_mnist_writes_caffes_record_layout(tmp_path, capsys):
    images_path, labels_path, images, labels = write_pair(tmp_path)
    db = tmp_path / "train_lmdb"
    assert convert_mnist_main([str(images_path), str(labels_path), str(db), "--backend=lmdb"]) == 0
    assert sorted(os.listdir(db)) == ["data.mdb", "lock.mdb"]
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]
    with lmdb.open(str(db), readonly=True, lock=False) as env, env.begin() as txn:
        records = list(txn.cursor())
    assert [key for key, _ in records] == [b"%08d" % i for i in range(25)]
    assert records[3][0] == b"00000003"
    for i, (_, value) in enumerate(records):
        assert value == datum_wire_bytes(1, 5, 4, images[i].tobytes(), int(labels[i]))
        datum = pb.Datum.FromString(value)
        assert (datum.channels, datum.height, datum.width, datum.label) == (1, 5, 4, labels[i])
        assert not datum.encoded and not datum.float_data

    reader = LmdbReader(db)
    assert reader.count == 25 and reader.item_shape == (1, 5, 4) and reader.dtype == np.uint8
    pixels, label = reader.read(7)
    np.testing.assert_array_equal(pixels[0], images[7])
    assert label == labels[7]
    out_images, out_labels = np.empty((3, 1, 5, 4), np.uint8), np.empty(3, np.float32)
    reader.gather([24, 0, 7], out_images, out_labels)
    np.testing.assert_array_equal(out_images[:, 0], images[[24, 0, 7]])
    np.testing.assert_array_equal(out_labels, labels[[24, 0, 7]])
    # A train and a test net may read one database: the readers share lmdb's one environment.
    second = LmdbReader(db)
    reader.close()
    reader.close()
    assert second.read(24)[1] == labels[24]
    second.close()
    assert LmdbReader(db).count == 25


def run_command(main, argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_mnist_errors(tmp_path, capsys):
    images_path, labels_path, _, _ = write_pair(tmp_path)
    db = tmp_path / "db"
    args = [str(images_path), str(labels_path), str(db)]
    code, _, err = run_command(convert_mnist_main, args + ["--backend=leveldb"], capsys)
    assert code == 1 and err == "convert_mnist: --backend=leveldb is not supported, use lmdb (the default)\n"
    assert not db.exists()

    code, _, err = run_command(convert_mnist_main, [args[0], str(tmp_path / "missing-labels"), args[2]],
                               capsys)
    assert code == 1 and err.startswith("convert_mnist: ") and err.count("\n") == 1
    assert "missing-labels: no such file" in err
    assert not db.exists() and not [p for p in os.listdir(tmp_path) if "partial" in p]

    code, _, err = run_command(convert_mnist_main, [args[0]], capsys)
    assert code == 1 and err.startswith("convert_mnist: ") and err.count("\n") == 1

    assert convert_mnist_main(args) == 0
    capsys.readouterr()
    before = (db / "data.mdb").stat().st_mtime_ns
    code, _, err = run_command(convert_mnist_main, args, capsys)
    assert code == 1 and err == f"convert_mnist: {db} already exists; remove it or choose another OUTPUT_DB\n"
    assert (db / "data.mdb").stat().st_mtime_ns == before


def test_convert_mnist_tool_script(tmp_path):
    import subprocess
    import sys
    images_path, labels_path, _, _ = write_pair(tmp_path)
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "convert_mnist")
    run = lambda *extra: subprocess.run([sys.executable, tool, str(images_path), str(labels_path),
                                         str(tmp_path / "db"), *extra], capture_output=True, text=True)
    first = run()
    assert first.returncode == 0 and "A total of 25 items." in first.stderr
    second = run()
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert second.stderr.strip().startswith("convert_mnist: ") and "already exists" in second.stderr


def test_lmdb_float_data_encoded_and_mixed_records(tmp_path):
    floats = np.arange(12, dtype=np.float32).reshape(3, 2, 2) / 7
    with LmdbWriter(tmp_path / "f") as writer:
        writer.put_datum(b"a", array_to_datum(floats, 4))
        writer.put_datum(b"b", array_to_datum(np.zeros((3, 2, 3), np.float32), 5))
        encoded = pb.Datum(channels=3, height=2, width=2, data=b"\xff\xd8jpeg", encoded=True)
        writer.put_datum(b"c", encoded)
    reader = LmdbReader(tmp_path / "f")
    assert reader.dtype == np.float32 and reader.item_shape == (3, 2, 2)
    pixels, label = reader.read(0)
    np.testing.assert_array_equal(pixels, floats)
    assert label == 4
    images, labels = np.empty((1, 3, 2, 2), np.float32), np.empty(1, np.float32)
    with pytest.raises(DataError) as excinfo:
        reader.gather([1], images, labels)
    assert "record b'b' is float32 (3, 2, 3)" in single_line_error(excinfo)
    with pytest.raises(DataError) as excinfo:
        reader.read(2)
    assert "encoded images" in single_line_error(excinfo) and "not supported yet" in str(excinfo.value)


def test_lmdb_writer_grows_the_map(tmp_path, monkeypatch):
    monkeypatch.setattr(lmdb_db, "_INITIAL_MAP_SIZE", 1 << 16)
    record = np.full((1, 100, 100), 3, np.uint8)
    with LmdbWriter(tmp_path / "big") as writer:
        for i in range(60):  # 600 kB, ten times the initial map
            writer.put_datum(b"%08d" % i, array_to_datum(record, i))
    reader = LmdbReader(tmp_path / "big")
    assert reader.count == 60 and reader.read(59)[1] == 59


def test_lmdb_reader_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        LmdbReader(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"not an LMDB database \(no data.mdb in it\)"):
        LmdbReader(tmp_path / "empty")
    with LmdbWriter(tmp_path / "junk") as writer:
        writer.put(b"k", b"\xff\xff\xff")
    with pytest.raises(DataError, match="record b'k': not a serialized Datum"):
        LmdbReader(tmp_path / "junk")


# -- dataset lookup and download ---------------------------------------------------------------------
TINY_SPLITS = (("train", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 6),
               ("test", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 2))


def write_tiny(directory, compress=True, skip=()):
    """A complete 'tiny' dataset (6 train and 2 test images of 3x3)."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, images_name, labels_name, count in TINY_SPLITS:
        if split in skip:
            continue
        strip = (lambda n: n) if compress else (lambda n: n.removesuffix(".gz"))
        write_idx(directory / strip(images_name), np.full((count, 3, 3), count, np.uint8), 0x803, compress)
        write_idx(directory / strip(labels_name), np.arange(count, dtype=np.uint8), 0x801, compress)
    return directory


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """Registers a 'tiny' dataset with a system dir, a cache and MINICAFFE_DATA all under tmp_path."""
    spec = datasets.DatasetSpec(name="tiny", mirrors=((tmp_path / "server").as_uri() + "/",),
                                system_dir=str(tmp_path / "system"), apt_package="dataset-tiny",
                                image_size=(3, 3), splits=TINY_SPLITS)
    monkeypatch.setitem(datasets.DATASETS, "tiny", spec)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MINICAFFE_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(datasets, "_checked", set())
    return spec


def located_dir(name="tiny", **kwargs):
    found = datasets.locate(name, **kwargs)
    directories = {path.parent for path in found.values()}
    assert len(directories) == 1
    return directories.pop()


def test_lookup_order(tmp_path, tiny):
    for place in ("env/tiny", "env", "cache/minicaffe/tiny", "system"):
        write_tiny(tmp_path / place)
    for expected in ("env/tiny", "env", "cache/minicaffe/tiny", "system"):
        assert located_dir() == tmp_path / expected
        for f in (tmp_path / expected).glob("*.gz"):
            f.unlink()
    with pytest.raises(DataError) as excinfo:
        datasets.locate("tiny")
    message = single_line_error(excinfo)
    for part in ("dataset tiny not found", str(tmp_path / "env"), str(tmp_path / "cache/minicaffe/tiny"),
                 str(tmp_path / "system"), "tools/get_data tiny", "apt-get install dataset-tiny",
                 "set MINICAFFE_DATA", "t10k-labels-idx1-ubyte.gz"):
        assert part in message


def test_lookup_validates_content_and_accepts_unpacked_files(tmp_path, tiny, monkeypatch):
    write_tiny(tmp_path / "env")
    # Six train images, but only 2 rows each: right magic numbers, wrong content.
    write_idx(tmp_path / "env/train-images-idx3-ubyte.gz", np.zeros((6, 2, 3), np.uint8), 0x803)
    write_tiny(tmp_path / "cache/minicaffe/tiny", compress=False)
    assert located_dir() == tmp_path / "cache/minicaffe/tiny"
    write_tiny(tmp_path / "env/tiny", skip=("test",))  # incomplete: passed over
    assert located_dir() == tmp_path / "cache/minicaffe/tiny"
    assert located_dir(splits=["train"]) == tmp_path / "env/tiny"
    # Only the test split is needed for a test reference; a train-less directory qualifies.
    for f in (tmp_path / "env/tiny").iterdir():
        f.unlink()
    write_tiny(tmp_path / "env/tiny", skip=("train",))
    images, labels = datasets.resolve_reference("tiny:test")
    assert images == tmp_path / "env/tiny/t10k-images-idx3-ubyte.gz"
    assert labels == tmp_path / "env/tiny/t10k-labels-idx1-ubyte.gz"
    for f in (tmp_path / "cache/minicaffe/tiny").iterdir():
        f.unlink()
    monkeypatch.delenv("MINICAFFE_DATA")
    with pytest.raises(DataError) as excinfo:
        datasets.locate("tiny")
    assert "(MINICAFFE_DATA is not set)" in single_line_error(excinfo)


def test_references(tiny):
    assert datasets.is_reference("tiny:train") and datasets.is_reference("fashion-mnist:test")
    assert not datasets.is_reference("some/path.gz")
    with pytest.raises(DataError, match="has no split 'valid'"):
        datasets.resolve_reference("tiny:valid")
    with pytest.raises(DataError, match=r"unknown dataset 'nope' \(known: .*fashion-mnist"):
        datasets.resolve_reference("nope:train")
    with pytest.raises(DataError, match="run `tools/get_data tiny`"):
        datasets.resolve_reference("tiny:train")


def test_download_from_mirrors_into_the_cache(tmp_path, tiny, monkeypatch):
    write_tiny(tmp_path / "server")
    broken = (tmp_path / "nowhere").as_uri() + "/"
    spec = datasets.DatasetSpec(name="tiny", mirrors=(broken,) + tiny.mirrors, system_dir=tiny.system_dir,
                                image_size=(3, 3), splits=TINY_SPLITS)
    monkeypatch.setitem(datasets.DATASETS, "tiny", spec)
    progress = io.StringIO()
    assert located_dir(download=True, progress=progress) == tmp_path / "cache/minicaffe/tiny"
    assert sorted(os.listdir(tmp_path / "cache/minicaffe/tiny")) == sorted(
        name for split in TINY_SPLITS for name in split[1:3])
    lines = progress.getvalue().splitlines()
    assert len(lines) == 8  # per file: the broken mirror fails, the second one works
    assert lines[0].startswith(f"downloading {broken}train-images-idx3-ubyte.gz") and "failed" in lines[0]
    assert lines[1].startswith(f"downloading {tiny.mirrors[0]}train-images") and lines[1].endswith("done")
    # Found in the cache now, without downloading again.
    assert located_dir(download=True, fetch=lambda *a: pytest.fail("downloaded twice")) \
        == tmp_path / "cache/minicaffe/tiny"


def test_download_rejects_bad_content_and_leaves_nothing(tmp_path, tiny):
    def fake_fetch(url, out, report):
        out.write(gzip.compress(idx_bytes(np.zeros(5, np.uint8), 0x801)))  # a labels file, wrong count
        report(10, 10)
    with pytest.raises(DataError) as excinfo:
        datasets.locate("tiny", download=True, fetch=fake_fetch, progress=None)
    message = single_line_error(excinfo)
    assert message.startswith("could not download tiny file train-images-idx3-ubyte.gz")
    assert "expected images" in message and "apt-get install dataset-tiny" in message
    assert os.listdir(tmp_path / "cache/minicaffe/tiny") == []


def test_get_data_command(tmp_path, tiny, capsys):
    code, _, err = run_command(get_data_main, ["tiny", "--no-download"], capsys)
    assert code == 1 and err.startswith("get_data: dataset tiny not found") and err.count("\n") == 1
    write_tiny(tmp_path / "server")
    code, out, err = run_command(get_data_main, ["tiny"], capsys)
    assert code == 0 and out == f"{tmp_path / 'cache/minicaffe/tiny'}\n" and "downloading" in err
    code, _, err = run_command(get_data_main, ["imagenet"], capsys)
    assert code == 1 and err.startswith("get_data: argument dataset: invalid choice")


# -- transformer -------------------------------------------------------------------------------------
def transform_param(**fields):
    param = pb.TransformationParameter()
    for name, value in fields.items():
        if name == "mean_value":
            param.mean_value.extend(value)
        else:
            setattr(param, name, value)
    return param


def test_transformer_scale_and_mean_values():
    images = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    transformer = DataTransformer(transform_param(scale=0.5, mean_value=[1, 10]), pb.TRAIN, (2, 2, 3))
    out = np.empty((2, 2, 2, 3), np.float32)
    transformer.transform(images, out, np.random.default_rng(0))
    assert out[1, 1, 0, 2] == (images[1, 1, 0, 2] - 10) * 0.5 == (20 - 10) * 0.5
    assert out[0, 0, 1, 0] == (3 - 1) * 0.5
    one_mean = DataTransformer(transform_param(mean_value=[4]), pb.TEST, (2, 2, 3))
    one_mean.transform(images, out, np.random.default_rng(0))
    np.testing.assert_array_equal(out, images.astype(np.float32) - 4)
    cropped = DataTransformer(transform_param(mean_value=[4], crop_size=1), pb.TEST, (2, 2, 3))
    out = np.empty((2, 2, 1, 1), np.float32)
    cropped.transform(images, out, np.random.default_rng(0))
    np.testing.assert_array_equal(out, images[:, :, 0:1, 1:2].astype(np.float32) - 4)  # center: (0, 1)
    with pytest.raises(DataError, match="mean_value: 2 values for 3 channels"):
        DataTransformer(transform_param(mean_value=[1, 2]), pb.TRAIN, (3, 2, 2))


def write_mean_file(path, mean):
    blob = Blob(mean.shape)
    blob.data[...] = mean
    path.write_bytes(blob.to_proto(pb.BlobProto()).SerializeToString())
    return str(path)


def test_transformer_mean_file_with_center_crop_at_test(tmp_path):
    image = np.array([[[[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]]], np.uint8)
    mean = np.full((1, 1, 4, 4), 0.5, np.float32)
    mean[0, 0, 1, 1] = 6  # the center crop starts at (1, 1)
    mean_file = write_mean_file(tmp_path / "m", mean)
    param = transform_param(crop_size=2, scale=2, mirror=True, mean_file=mean_file)
    transformer = DataTransformer(param, pb.TEST, (1, 4, 4))
    assert transformer.output_shape == (1, 2, 2)
    out = np.empty((1, 1, 2, 2), np.float32)
    transformer.transform(image, out, np.random.default_rng(0))
    # Mirror is off at TEST; (6 - 6) * 2, (7 - .5) * 2, ...
    np.testing.assert_array_equal(out[0, 0], [[0, 13], [19, 21]])
    assert not transformer.draw(np.random.default_rng(0), 100).flips.any()

    with pytest.raises(DataError, match=r"the mean is \(1, 1, 4, 4\), the data is \(1, 5, 5\)"):
        DataTransformer(param, pb.TEST, (1, 5, 5))
    with pytest.raises(DataError, match="cannot both be given"):
        DataTransformer(transform_param(mean_file="m", mean_value=[1]), pb.TEST, (1, 4, 4))
    with pytest.raises(DataError, match="crop_size 5 is larger than the input images"):
        DataTransformer(transform_param(crop_size=5), pb.TEST, (1, 4, 4))
    with pytest.raises(DataError, match="mean_file '.*nothing': cannot read"):
        DataTransformer(transform_param(mean_file=str(tmp_path / "nothing")), pb.TEST, (1, 4, 4))


def test_transformer_mirror_by_hand():
    image = np.array([[[[1, 2, 3]], [[4, 5, 6]]]], np.uint8)  # 1 image, 2 channels, 1x3
    transformer = DataTransformer(transform_param(mirror=True), pb.TRAIN, (2, 1, 3))
    out = np.empty((1, 2, 1, 3), np.float32)
    choices = transformer.draw(np.random.default_rng(0), 1)
    choices.flips[:] = True
    transformer.apply(image, out, choices)
    np.testing.assert_array_equal(out[0], [[[3, 2, 1]], [[6, 5, 4]]])


def test_transformer_random_crop_and_mirror_match_a_loop_reference(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(64, 3, 7, 6), dtype=np.uint8)
    mean = rng.uniform(0, 255, size=(3, 7, 6)).astype(np.float32)
    param = transform_param(crop_size=4, mirror=True, scale=0.25,
                            mean_file=write_mean_file(tmp_path / "mean", mean[np.newaxis]))
    transformer = DataTransformer(param, pb.TRAIN, (3, 7, 6))
    choices = transformer.draw(np.random.default_rng(2), 64)
    out = np.empty((64, 3, 4, 4), np.float32)
    transformer.apply(images, out, choices)
    for i in range(64):
        r, c = choices.row_offsets[i], choices.col_offsets[i]
        expected = (images[i, :, r:r + 4, c:c + 4] - mean[:, r:r + 4, c:c + 4]) * 0.25
        if choices.flips[i]:
            expected = expected[:, :, ::-1]
        np.testing.assert_allclose(out[i], expected, rtol=1e-6)
    # Every offset in [0, 3] x [0, 2] and both flip values are drawn.
    assert set(choices.row_offsets) == {0, 1, 2, 3} and set(choices.col_offsets) == {0, 1, 2}
    assert 10 < choices.flips.sum() < 54
    # A slice of a larger draw is what the same image gets there.
    np.testing.assert_array_equal(choices[5:9].row_offsets, choices.row_offsets[5:9])


# -- record schedule and prefetching -----------------------------------------------------------------
def test_schedule_sequential_wraps_around():
    schedule = RecordSchedule(count=10, batch_size=4, seed=1)
    assert [schedule.records(b).tolist() for b in range(4)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5]]


def test_schedule_shuffle_rand_skip_and_shards():
    schedule = RecordSchedule(count=10, batch_size=5, seed=3, shuffle=True)
    stream = np.concatenate([schedule.records(b) for b in range(6)])
    epochs = stream.reshape(3, 10)
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[0], np.arange(10))

    skipped = RecordSchedule(count=10, batch_size=4, seed=3, rand_skip=7)
    assert 0 <= skipped.skip < 7
    assert skipped.records(0).tolist() == [(skipped.skip + i) % 10 for i in range(4)]

    whole = RecordSchedule(count=10, batch_size=6, seed=3, shuffle=True)
    shards = [RecordSchedule(count=10, batch_size=2, seed=3, shuffle=True, rank=r, num_ranks=3)
              for r in range(3)]
    for b in range(5):
        np.testing.assert_array_equal(np.concatenate([s.records(b) for s in shards]), whole.records(b))


class Producer:
    """Batch b holds the value b; raises at ``fail_at``; records the threads it ran in."""

    def __init__(self, fail_at=None):
        self.fail_at = fail_at
        self.error = DataError("bad record")
        self.threads = set()

    def produce(self, batch_index, buffer):
        self.threads.add(threading.current_thread().name)
        if batch_index == self.fail_at:
            raise self.error
        buffer[0][...] = batch_index


def fetch(prefetcher):
    out = np.empty(3)
    index = prefetcher.fetch_into((out,))
    assert (out == index).all()
    return index


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_prefetcher_order_restart_and_error(depth):
    producer = Producer(fail_at=6)
    prefetcher = Prefetcher(producer.produce, lambda: (np.empty(3),), depth)
    prefetcher.start(0)
    assert [fetch(prefetcher) for _ in range(3)] == [0, 1, 2]
    prefetcher.start(4)
    assert [fetch(prefetcher) for _ in range(2)] == [4, 5]
    for _ in range(2):  # the original error, again on every later fetch
        with pytest.raises(DataError) as excinfo:
            fetch(prefetcher)
        assert excinfo.value is producer.error
    prefetcher.start(1)
    assert fetch(prefetcher) == 1
    prefetcher.stop()
    expected = {"minicaffe-prefetch"} if depth else {threading.current_thread().name}
    assert producer.threads == expected


def test_prefetch_thread_ends_with_its_owner():
    producer = Producer()
    prefetcher = Prefetcher(producer.produce, lambda: (np.empty(3),), 2)
    prefetcher.start(0)
    thread = prefetcher._thread
    assert thread.is_alive()
    del producer, prefetcher
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
