"""MemoryData, ImageData and HDF5Data layers: batches, order, shuffling, resuming, transforms, errors."""
import sys

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import rng
from minicaffe.blob import Blob
from minicaffe.errors import DataError, LayerError, MinicaffeError
from minicaffe.layer import create_layer
from minicaffe.layers.image_data import resize_bilinear
from minicaffe.net import Net
from minicaffe.proto import minicaffe_pb2 as pb
from conftest import assert_same_batches, batches

h5py = pytest.importorskip("h5py")
Image = pytest.importorskip("PIL.Image")


def make_layer(text, phase=pb.TRAIN, num_tops=2, seed=7):
    param = text_format.Parse(text, pb.LayerParameter())
    layer = create_layer(param, phase)
    tops = [Blob(name=f"top{i}") for i in range(num_tops)]
    rng.set_seed(seed)
    layer.layer_setup([], tops)
    return layer, tops


def error_of(make, *args, **kwargs):
    with pytest.raises(MinicaffeError) as excinfo:
        make(*args, **kwargs)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# -- MemoryData --------------------------------------------------------------------------------------
def memory_layer(transform="", phase=pb.TRAIN, batch_size=2, shape=(3, 2, 2)):
    channels, height, width = shape
    return make_layer(f'name: "mem" type: "MemoryData" memory_data_param {{ batch_size: {batch_size} '
                      f'channels: {channels} height: {height} width: {width} }} '
                      f'transform_param {{ {transform} }}', phase)


def test_memory_data_walks_the_arrays_and_wraps_around():
    layer, tops = memory_layer()
    assert tops[0].shape == (2, 3, 2, 2) and tops[1].shape == (2,)
    data = np.random.default_rng(0).standard_normal((6, 3, 2, 2)).astype(np.float32)
    labels = np.arange(6, dtype=np.float32).reshape(6, 1, 1, 1)  # pycaffe's 4-D labels
    layer.reset(data, labels)
    got = batches(layer, tops, 4)
    for (images, tags), rows in zip(got, [[0, 1], [2, 3], [4, 5], [0, 1]]):
        np.testing.assert_array_equal(images, data[rows])
        np.testing.assert_array_equal(tags, rows)
    assert layer.position == 4
    data[2:4] = 9  # the layer keeps the caller's arrays, as Caffe does
    layer.set_position(1)
    layer.forward([], tops)
    np.testing.assert_array_equal(tops[0].data, 9)
    layer.reset(data[:2].copy(), np.array([7, 8], np.float32))  # a reset starts from the first row
    assert layer.position == 0
    layer.forward([], tops)
    np.testing.assert_array_equal(tops[1].data, [7, 8])


def test_memory_data_add_images_applies_transform_param():
    layer, tops = memory_layer("crop_size: 2 mean_value: 10 mean_value: 20 mean_value: 30 scale: 0.5",
                               phase=pb.TEST)
    images = np.random.default_rng(1).integers(0, 256, (4, 3, 4, 5)).astype(np.uint8)
    layer.add_images(images, [1, 2, 3, 4])
    got = batches(layer, tops, 2)
    mean = np.array([10, 20, 30], np.float32).reshape(1, 3, 1, 1)
    expected = (images[:, :, 1:3, 1:3].astype(np.float32) - mean) * 0.5  # TEST: the center crop
    np.testing.assert_allclose(np.concatenate([b[0] for b in got]), expected)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), [1, 2, 3, 4])

    layer, tops = memory_layer("crop_size: 2 mirror: true")  # TRAIN: random crops and flips
    layer.add_images(images, np.zeros(4))
    crops = np.concatenate([b[0] for b in batches(layer, tops, 2)])
    for image, crop in zip(images, crops):
        windows = [image[:, r:r + 2, c:c + 2] for r in range(3) for c in range(4)]
        assert any(np.array_equal(crop, w) or np.array_equal(crop, w[:, :, ::-1]) for w in windows)


def test_memory_data_reset_does_not_transform_as_in_caffe(capsys):
    layer, tops = memory_layer("scale: 2")
    data = np.ones((2, 3, 2, 2), np.float32)
    for _ in range(2):
        layer.reset(data, np.zeros(2, np.float32))
    layer.forward([], tops)
    np.testing.assert_array_equal(tops[0].data, 1)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "transform_param" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "layer 'mem' (MemoryData): transform_param is not applied to arrays given to reset/set_input_arrays "
        "(as in Caffe); use add_images")


def test_memory_data_in_a_net():
    net = Net(text_format.Parse(
        'layer { name: "mem" type: "MemoryData" top: "data" top: "label" '
        '        memory_data_param { batch_size: 2 channels: 1 height: 1 width: 3 } } '
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
        '        inner_product_param { num_output: 1 weight_filler { type: "constant" value: 1 } } }',
        pb.NetParameter()))
    data = np.arange(12, dtype=np.float32).reshape(4, 1, 1, 3)
    net.layers[0].reset(data, np.arange(4, dtype=np.float32))
    np.testing.assert_allclose(net.forward()["ip"].ravel(), [3, 12])
    np.testing.assert_allclose(net.forward()["ip"].ravel(), [21, 30])
    np.testing.assert_array_equal(net.blobs["label"].data, [2, 3])


@pytest.mark.parametrize("data, labels, message", [
    (np.zeros((4, 3, 2, 2)), np.zeros(4, np.float32), "data array must be float32, got float64"),
    (np.zeros((4, 3, 2, 4), np.float32)[..., ::2], np.zeros(4, np.float32), "data array must be C contiguous"),
    (np.zeros((4, 3, 4), np.float32), np.zeros(4, np.float32),
     "data array must be [N, 3, 2, 2] as memory_data_param says, got shape (4, 3, 4)"),
    (np.zeros((4, 1, 2, 2), np.float32), np.zeros(4, np.float32), "got shape (4, 1, 2, 2)"),
    ([[0.0]], np.zeros(4, np.float32), "data must be a NumPy array, got list"),
    (np.zeros((4, 3, 2, 2), np.float32), np.zeros((4, 2), np.float32),
     "labels array must be [N] or [N, 1, 1, 1], got shape (4, 2)"),
    (np.zeros((4, 3, 2, 2), np.float32), np.zeros(3, np.float32),
     "data and labels must have the same first dimension, got 4 and 3"),
    (np.zeros((3, 3, 2, 2), np.float32), np.zeros(3, np.float32),
     "the first dimension of the input arrays (3) must be a positive multiple of batch_size (2)"),
    (np.zeros((0, 3, 2, 2), np.float32), np.zeros(0, np.float32), "(0) must be a positive multiple"),
])
def test_memory_data_reset_errors(data, labels, message):
    layer, _ = memory_layer()
    with pytest.raises(LayerError) as excinfo:
        layer.reset(data, labels)
    assert str(excinfo.value) == f"layer 'mem' (MemoryData): {message}" or message in str(excinfo.value)
    assert str(excinfo.value).startswith("layer 'mem' (MemoryData): ")


def test_memory_data_other_errors():
    layer, tops = memory_layer()
    assert "has no data yet: call reset(data, labels)" in error_of(layer.forward, [], tops)
    assert "batch_size, channels, height and width must all be set" in error_of(
        make_layer, 'name: "mem" type: "MemoryData" memory_data_param { batch_size: 2 channels: 1 }')
    assert "transform_param turns (3, 4, 4) images into (3, 3, 3), but memory_data_param says (3, 2, 2)" \
        in error_of(memory_layer("crop_size: 3")[0].add_images, np.zeros((2, 3, 4, 4), np.uint8), [0, 1])
    assert "add_images takes [N, 3, height, width] images, got shape (2, 1, 4, 4)" in error_of(
        layer.add_images, np.zeros((2, 1, 4, 4)), [0, 1])


# -- ImageData ---------------------------------------------------------------------------------------
NUM_IMAGES = 5


@pytest.fixture
def image_set(tmp_path):
    """NUM_IMAGES 6x4 RGB PNGs (one with a space in its name) and a list file labelling image i as 10+i."""
    pictures = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, 6, 4, 3)).astype(np.uint8)
    folder = tmp_path / "pics"
    folder.mkdir()
    names = [f"img {i}.png" if i == 2 else f"img{i}.png" for i in range(NUM_IMAGES)]
    for name, picture in zip(names, pictures):
        Image.fromarray(picture).save(folder / name)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{name} {10 + i}\n" + ("\n" if i == 1 else "") for i, name in enumerate(names)))
    return listing, folder, pictures


def image_layer(listing, folder, extra="", transform="", phase=pb.TRAIN, batch_size=2, seed=7):
    return make_layer(f'name: "img" type: "ImageData" image_data_param {{ source: "{listing}" '
                      f'root_folder: "{folder}/" batch_size: {batch_size} {extra} }} '
                      f'transform_param {{ {transform} }}', phase, seed=seed)


def bgr(pictures):
    """[N, H, W, RGB] pictures as Caffe's OpenCV lays them out: [N, BGR, H, W]."""
    return pictures[..., ::-1].transpose(0, 3, 1, 2)


def test_image_data_decodes_in_list_order_as_bgr(image_set):
    listing, folder, pictures = image_set
    layer, tops = image_layer(listing, folder, transform="scale: 0.5", phase=pb.TEST)
    assert tops[0].shape == (2, 3, 6, 4) and tops[1].shape == (2,)
    got = batches(layer, tops, 3)
    for (images, labels), records in zip(got, [[0, 1], [2, 3], [4, 0]]):
        np.testing.assert_array_equal(images, bgr(pictures[records]) * np.float32(0.5))
        np.testing.assert_array_equal(labels, np.add(records, 10))
    layer.close()


def test_image_data_gray_and_resized(image_set):
    listing, folder, pictures = image_set
    layer, tops = image_layer(listing, folder, "is_color: false", phase=pb.TEST)
    layer.forward([], tops)
    assert tops[0].shape == (2, 1, 6, 4)
    luma = pictures[:2].astype(np.float64) @ [0.299, 0.587, 0.114]
    assert np.abs(tops[0].data[:, 0] - luma).max() <= 1
    layer.close()

    # Halving with INTER_LINEAR conventions averages 2x2 blocks.
    layer, tops = image_layer(listing, folder, "new_height: 3 new_width: 2", phase=pb.TEST)
    layer.forward([], tops)
    blocks = pictures[:2].reshape(2, 3, 2, 2, 2, 3).astype(np.float64).mean(axis=(2, 4))
    np.testing.assert_array_equal(tops[0].data, bgr(np.floor(blocks + 0.5)))
    layer.close()


def opencv_linear_reference(image, height, width):
    """cv::resize INTER_LINEAR written pixel by pixel: half-pixel centers, edges clamped."""
    source_height, source_width = image.shape[:2]
    out = np.zeros((height, width) + image.shape[2:])

    def tap(position, size):
        first = int(np.floor(position))
        weight = position - first
        if first < 0:
            return 0, 0, 0.0
        if first >= size - 1:
            return size - 1, size - 1, 0.0
        return first, first + 1, weight

    for y in range(height):
        y0, y1, wy = tap((y + 0.5) * source_height / height - 0.5, source_height)
        for x in range(width):
            x0, x1, wx = tap((x + 0.5) * source_width / width - 0.5, source_width)
            out[y, x] = ((1 - wy) * ((1 - wx) * image[y0, x0] + wx * image[y0, x1])
                         + wy * ((1 - wx) * image[y1, x0] + wx * image[y1, x1]))
    return np.floor(out + 0.5)


@pytest.mark.parametrize("shape, size", [((6, 4, 3), (9, 7)), ((7, 5), (3, 2)), ((5, 9, 3), (5, 4))])
def test_resize_bilinear_matches_opencv_conventions(shape, size):
    image = np.random.default_rng(2).integers(0, 256, shape).astype(np.uint8)
    resized = resize_bilinear(image, *size)
    assert resized.dtype == np.uint8 and resized.shape == size + shape[2:]
    assert np.abs(resized - opencv_linear_reference(image, *size)).max() <= 1  # float32 rounding
    if size[0] >= shape[0] and size[1] >= shape[1]:
        # When enlarging, Pillow's bilinear filter uses the same conventions.
        pillow = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
        assert np.abs(resized.astype(int) - pillow).max() <= 1


def test_image_data_shuffle_is_deterministic_and_resumable(image_set):
    listing, folder, _ = image_set
    args = (listing, folder, "shuffle: true rand_skip: 3", "crop_size: 3 mirror: true")
    stream = batches(*image_layer(*args), 6)
    assert_same_batches(stream, batches(*image_layer(*args), 6))
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(stream, batches(*image_layer(*args, seed=8), 6)))
    layer, tops = image_layer(*args)
    for start in (4, 1):
        layer.set_position(start)
        assert_same_batches(batches(layer, tops, 2), stream[start:start + 2])
    layer.close()

    layer, tops = image_layer(listing, folder, "shuffle: true", batch_size=NUM_IMAGES)
    epochs = [labels for _, labels in batches(layer, tops, 3)]
    for labels in epochs:
        assert sorted(labels) == list(range(10, 10 + NUM_IMAGES))
    assert any(not np.array_equal(epochs[0], labels) for labels in epochs[1:])
    layer.close()


def test_image_data_list_and_setup_errors(tmp_path, image_set, monkeypatch):
    listing, folder, _ = image_set

    def message(source, extra="", root=folder):
        text = error_of(image_layer, source, root, extra)
        assert text.startswith("layer 'img' (ImageData): ")
        return text.removeprefix("layer 'img' (ImageData): ")

    assert message(tmp_path / "none.txt").startswith(
        f"image_data_param.source '{tmp_path}/none.txt': no such file")
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert message(tmp_path / "empty.txt") == f"image_data_param.source '{tmp_path}/empty.txt' lists no images"
    (tmp_path / "bad.txt").write_text("img0.png 1\nimg1.png one\n")
    assert message(tmp_path / "bad.txt") == (f"{tmp_path}/bad.txt:2: expected 'image_path label' with an "
                                             "integer label, got 'img1.png one'")
    (tmp_path / "nolabel.txt").write_text("img0.png\n")
    assert "nolabel.txt:1: expected 'image_path label' with an integer label" in message(tmp_path / "nolabel.txt")
    (tmp_path / "missing.txt").write_text("gone.png 0\n")
    assert message(tmp_path / "missing.txt") == f"image '{folder}/gone.png': no such file"
    text = error_of(make_layer, f'name: "img" type: "ImageData" image_data_param {{ source: "{listing}" '
                    f'root_folder: "{folder}" batch_size: 1 }}')
    assert text.endswith(f"(root_folder '{folder}' is prefixed as is; end it with '/')")
    (folder / "junk.png").write_bytes(b"not an image")
    (tmp_path / "junk.txt").write_text("junk.png 0\n")
    assert message(tmp_path / "junk.txt").startswith(f"image '{folder}/junk.png': cannot decode it (")
    assert message(listing, "new_height: 4") == (
        "image_data_param: set new_height and new_width together, or neither")
    assert message(listing, "mirror: true") == ("image_data_param.mirror is deprecated and ignored by Caffe; "
                                                "use transform_param.mirror")
    image_layer(listing, folder, "mirror: false scale: 1")[0].close()  # explicit defaults are harmless
    assert error_of(image_layer, listing, folder, batch_size=0).endswith(
        "image_data_param.batch_size must be a positive number")
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert message(listing) == "reading images needs Pillow, which is not installed: pip install Pillow"


def test_image_data_errors_in_later_batches_reach_forward(image_set):
    listing, folder, pictures = image_set
    Image.fromarray(pictures[3][:5]).save(folder / "img3.png")  # 5x4 instead of 6x4
    (folder / "img4.png").unlink()
    layer, tops = image_layer(listing, folder)
    layer.forward([], tops)
    with pytest.raises(DataError) as excinfo:
        layer.forward([], tops)
    assert str(excinfo.value) == (f"layer 'img' (ImageData): image '{folder}/img3.png' is 5x4 with 3 channels, "
                                  "the first image is 6x4 with 3 channels; set image_data_param new_height and "
                                  "new_width to resize them all")
    layer.close()
    layer, tops = image_layer(listing, folder, "new_height: 6 new_width: 4", batch_size=5, seed=1)
    with pytest.raises(DataError, match=f"image '{folder}/img4.png': no such file"):
        layer.forward([], tops)
    layer.close()


# -- HDF5Data ----------------------------------------------------------------------------------------
ROWS = (5, 0, 3)  # rows of the files a.h5, empty.h5, b.h5


def write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, values in datasets.items():
            f.create_dataset(name, data=values)
    return path


@pytest.fixture
def h5_set(tmp_path):
    """Files whose row r of file f holds 100 f + r everywhere; the list names them relative to itself."""
    names = []
    for f, (name, rows) in enumerate(zip(("a.h5", "empty.h5", "b.h5"), ROWS)):
        ids = 100 * f + np.arange(rows)
        write_h5(tmp_path / name, data=np.broadcast_to(ids[:, None, None], (rows, 2, 3)).astype(np.float64),
                 label=ids.astype(np.int32))
        names.append(name)
    listing = tmp_path / "list.txt"
    listing.write_text(" ".join(names[:2]) + "\n" + names[2] + "\n")
    return listing


def hdf5_layer(listing, extra="", batch_size=3, tops=("data", "label"), seed=7, more=""):
    top_text = " ".join(f'top: "{t}"' for t in tops)
    return make_layer(f'name: "h5" type: "HDF5Data" {top_text} hdf5_data_param {{ source: "{listing}" '
                      f'batch_size: {batch_size} {extra} }} {more}', num_tops=len(tops), seed=seed)


ALL_ROWS = [0, 1, 2, 3, 4, 200, 201, 202]


def test_hdf5_data_reads_files_then_rows(h5_set):
    layer, tops = hdf5_layer(h5_set)
    assert tops[0].shape == (3, 2, 3) and tops[1].shape == (3,)
    got = batches(layer, tops, 4)
    stream = np.concatenate([labels for _, labels in got])
    np.testing.assert_array_equal(stream, (ALL_ROWS * 2)[:12])
    for data, labels in got:
        np.testing.assert_array_equal(data, np.broadcast_to(labels[:, None, None], data.shape))
    layer.close()

    layer, tops = hdf5_layer(h5_set, tops=("label",), batch_size=8)
    layer.forward([], tops)
    np.testing.assert_array_equal(tops[0].data, ALL_ROWS)
    layer.close()


def test_hdf5_data_shuffles_files_and_rows(h5_set):
    layer, tops = hdf5_layer(h5_set, "shuffle: true", batch_size=4, tops=("label",))
    epochs = np.concatenate([b[0] for b in batches(layer, tops, 6)]).reshape(3, 8).astype(int)
    layer.close()
    for epoch in epochs:
        assert sorted(epoch) == ALL_ROWS
        files = epoch // 100
        assert (np.diff(files) != 0).sum() == 1  # each file's rows stay together, as in Caffe
    assert len({tuple(epoch // 100) for epoch in epochs}) > 1  # the file order changes...
    assert len({tuple(epoch[epoch < 100]) for epoch in epochs}) > 1  # ...and so do the rows' orders

    stream = batches(*hdf5_layer(h5_set, "shuffle: true"), 6)
    assert_same_batches(stream, batches(*hdf5_layer(h5_set, "shuffle: true"), 6))
    layer, tops = hdf5_layer(h5_set, "shuffle: true")
    for start in (3, 0, 5):
        layer.set_position(start)
        assert_same_batches(batches(layer, tops, 1), stream[start:start + 1])
    layer.close()


def test_hdf5_data_shards_make_up_the_global_batch(h5_set):
    whole = batches(*hdf5_layer(h5_set, "shuffle: true", batch_size=4), 3)
    shards = []
    for rank in range(2):
        layer, tops = hdf5_layer(h5_set, "shuffle: true", batch_size=2)
        layer.set_shard(rank, 2)
        shards.append(batches(layer, tops, 3))
        layer.close()
    for b in range(3):
        for top in range(2):
            np.testing.assert_array_equal(np.concatenate([s[b][top] for s in shards]), whole[b][top])


def test_hdf5_data_errors(tmp_path, h5_set, monkeypatch):
    def message(listing, **kwargs):
        text = error_of(hdf5_layer, listing, **kwargs)
        assert text.startswith("layer 'h5' (HDF5Data): ")
        return text.removeprefix("layer 'h5' (HDF5Data): ")

    def listing_of(*names):
        path = tmp_path / f"list{len(list(tmp_path.iterdir()))}.txt"
        path.write_text("\n".join(map(str, names)))
        return path

    assert message(tmp_path / "none.txt").startswith(
        f"hdf5_data_param.source '{tmp_path}/none.txt': no such file")
    assert message(listing_of()).endswith("lists no HDF5 files")
    assert message(tmp_path / "a.h5").endswith(
        "is not a text file (name a text file listing .h5 files, not an .h5 file)")
    assert message(listing_of("gone.h5")) == "HDF5 file 'gone.h5': no such file"
    assert message(listing_of(h5_set)).startswith(f"HDF5 file '{h5_set}': cannot read it (")
    assert message(h5_set, tops=("data", "labels")) == (f"{tmp_path}/a.h5: has no dataset 'labels' for the top "
                                                        "of that name (its datasets: data, label)")
    write_h5(tmp_path / "ragged.h5", data=np.zeros((4, 2, 3)), label=np.zeros(3))
    assert message(listing_of(tmp_path / "ragged.h5")) == (
        f"{tmp_path}/ragged.h5: the datasets have different numbers of rows ('data' 4, 'label' 3); they must "
        "have the same first dimension")
    write_h5(tmp_path / "wide.h5", data=np.zeros((4, 2, 4)), label=np.zeros(4))
    assert message(listing_of("a.h5", "wide.h5")) == (f"{tmp_path}/wide.h5: dataset 'data' has rows of shape "
                                                      f"(2, 4), but (2, 3) in {tmp_path}/a.h5")
    write_h5(tmp_path / "scalar.h5", data=np.float32(1), label=np.zeros(1))
    assert "dataset 'data' must be an array of numbers" in message(listing_of("scalar.h5"))
    assert message(listing_of("empty.h5")).endswith("hold no rows")
    assert message(h5_set, batch_size=0) == "hdf5_data_param.batch_size must be a positive number"
    assert message(h5_set, more="transform_param { scale: 2 }") == (
        "HDF5Data does not transform data; remove transform_param")
    monkeypatch.setitem(sys.modules, "h5py", None)
    assert message(h5_set) == "reading HDF5 files needs h5py, which is not installed: pip install h5py"
